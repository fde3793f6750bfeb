//! systemd's service notification protocol (`sd_notify(3)`), in one place
//! for `quorate server` and `quorate agent`: `READY=1` once the process is
//! of use, `STOPPING=1` when its shutdown begins, `STATUS=...` lines, and
//! `WATCHDOG=1` keep-alives when the unit sets `WatchdogSec=`.
//!
//! Without `NOTIFY_SOCKET` in the environment every call is a no-op, so the
//! processes behave the same outside systemd (Kubernetes, compose, tests).
//!
//! The datagrams are sent by a thread of its own, never by the caller: a
//! send to a unix datagram socket whose queue is full blocks the sender
//! until the service manager reads, and no task of a server or agent
//! (Raft, lease renewals, the role loop) may wait on that. Callers only put
//! a message on a small bounded queue; when it is full the message is
//! dropped and logged (a lost keep-alive is repeated at the next interval;
//! `READY=1` and `STOPPING=1` come first, onto an empty queue).

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tracing::{info, warn};

/// Messages waiting for the sender thread; keep-alives at most every
/// second or so, so a handful is plenty.
const QUEUE: usize = 16;

/// How long [`Notifier::close`] waits for the sender thread to finish what
/// is queued (it only blocks while the service manager does not read).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// `READY=1` with a `STATUS=` line saying why.
    Ready(String),
    /// `STOPPING=1`.
    Stopping,
    /// `WATCHDOG=1`.
    Watchdog,
    /// `STATUS=...` alone.
    Status(String),
}

impl Note {
    fn states(&self) -> Vec<NotifyState<'_>> {
        match self {
            Note::Ready(status) => vec![NotifyState::Ready, NotifyState::Status(status)],
            Note::Stopping => vec![NotifyState::Stopping],
            Note::Watchdog => vec![NotifyState::Watchdog],
            Note::Status(status) => vec![NotifyState::Status(status)],
        }
    }
}

/// The process's notifier: shared by the tasks that notify, closed once by
/// the owner of the process's run (which also owns its sender thread).
#[derive(Debug, Default)]
pub struct Notifier {
    tx: Mutex<Option<SyncSender<Note>>>,
    thread: Mutex<Option<(JoinHandle<()>, Receiver<()>)>>,
    /// Half of `WATCHDOG_USEC`, when the service manager asks for
    /// keep-alives (and `WATCHDOG_PID`, if set, is this process).
    watchdog_every: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing: for servers run inside another
    /// process (in-process tests), which are not a unit of their own.
    pub fn disabled() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The notifier of this process: sends to `NOTIFY_SOCKET` when it is
    /// set, else nothing. Starts the sender thread only when it is set.
    pub fn from_env() -> Arc<Self> {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Self::disabled();
        }
        let watchdog_every = sd_notify::watchdog_enabled().map(|d| d / 2).filter(|d| !d.is_zero());
        let (tx, rx) = mpsc::sync_channel::<Note>(QUEUE);
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("sd-notify".into()).spawn(move || {
            let mut failing = false;
            for note in rx {
                match sd_notify::notify(&note.states()) {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
            let _ = done_tx.send(());
        });
        match thread {
            Ok(handle) => {
                if let Some(every) = watchdog_every {
                    info!(
                        every_ms = every.as_millis() as u64,
                        "systemd watchdog: keep-alives at half of WATCHDOG_USEC"
                    );
                }
                Arc::new(Self { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some((handle, done_rx))), watchdog_every })
            }
            Err(e) => {
                // Without the thread there is no sending that cannot block;
                // the service manager then times the start out, which says
                // more than a process that pretends to be ready.
                warn!("cannot start the sd-notify thread, not notifying the service manager: {e}");
                Self::disabled()
            }
        }
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// How often [`Self::watchdog`] sends a keep-alive, if at all.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog_every.filter(|_| self.enabled())
    }

    /// Queues `note`; never blocks.
    pub fn send(&self, note: Note) {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else { return };
        match tx.try_send(note) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(note)) => {
                warn!(?note, "the service manager is not reading notifications; dropped one");
            }
        }
    }

    /// `READY=1`, with `status` as the unit's status line.
    pub fn ready(&self, status: &str) {
        info!(status, "ready");
        self.send(Note::Ready(status.to_owned()));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send(Note::Stopping);
    }

    /// Sends `WATCHDOG=1` every [`Self::watchdog_every`] while `healthy`
    /// says so, until `stop`. A process that is not healthy sends none, so
    /// that the service manager restarts it after `WatchdogSec=`; a stuck
    /// runtime sends none either, as this runs on it. Returns at once when
    /// no watchdog is asked for.
    pub async fn watchdog(&self, healthy: impl Fn() -> Result<(), String>, mut stop: watch::Receiver<bool>) {
        let Some(every) = self.watchdog_every() else { return };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut withheld = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::shutdown::stopped(&mut stop) => return,
            }
            match healthy() {
                Ok(()) => {
                    if withheld {
                        info!("healthy again: systemd watchdog keep-alives resumed");
                        withheld = false;
                    }
                    self.send(Note::Watchdog);
                }
                Err(why) => {
                    if !withheld {
                        warn!("not healthy ({why}): withholding systemd watchdog keep-alives");
                        withheld = true;
                    }
                }
            }
        }
    }

    /// Stops the sender thread once it has sent what is queued, waiting at
    /// most [`CLOSE_WAIT`] (a service manager that does not read could hold
    /// it forever; the process is exiting then, which ends it). Later
    /// notes are dropped.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let Some((handle, done)) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        match done.recv_timeout(CLOSE_WAIT) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = handle.join();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warn!("the sd-notify thread is still blocked on the service manager; leaving it to the exit");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disabled_notifier_sends_nothing_and_asks_for_no_watchdog() {
        let n = Notifier::disabled();
        assert!(!n.enabled());
        assert_eq!(n.watchdog_every(), None);
        n.ready("x");
        n.stopping();
        n.close();
    }

    #[test]
    fn each_note_is_the_protocol_lines_systemd_reads() {
        let lines = |n: Note| n.states().iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(lines(Note::Ready("leader 2".into())), ["READY=1", "STATUS=leader 2"]);
        assert_eq!(lines(Note::Stopping), ["STOPPING=1"]);
        assert_eq!(lines(Note::Watchdog), ["WATCHDOG=1"]);
    }
}

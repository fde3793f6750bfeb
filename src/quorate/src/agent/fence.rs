//! The fencer: stops the data service's writes at the lease deadline.
//!
//! A primary whose lease ends must stop taking writes *at its deadline*,
//! whatever else its agent is doing: waiting for an unreachable
//! coordinator, a slow driver command, a switchover. So fencing is not a
//! step of the role loop. The fencer runs on an OS thread of its own with
//! its own single-threaded runtime and its own connection to the *local*
//! data service; it never talks to the coordinators, and no other task can
//! hold it up. The role loop only tells it things ([`Fencer::arm`] with each
//! new deadline, [`Fencer::open`] after a promotion, [`Fencer::fence_now`],
//! [`Fencer::disarm`] before following a new primary); a deadline that
//! passes without a newer one fences by itself.
//!
//! For Redis a fence is `CLIENT PAUSE <24h> WRITE` (writes block, reads
//! go on), then `CLIENT KILL TYPE normal`, so clients are disconnected and
//! look the primary up again instead of hanging on a paused node (Redis
//! Sentinel does the same on every reconfiguration; a demotion without a
//! fence, as in a switchover, disconnects them in the driver's `follow`,
//! sparing the fencer's connection, named `quorate-fencer`). For the exec driver it
//! is the fence hook. Each fence applied while a deadline was armed logs
//! `deadline fence applied` with `late_us` (applied minus deadline; negative
//! when before it): the fault suite collects these.
//!
//! While writes are open the fencer also keeps the lease key
//! (`quorate:lease:{G}`, the epoch, expiring at the deadline) that
//! `deploy/redis/fenced_set.lua` checks; those writes are sent without
//! being awaited, so a slow reply never delays a fence.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use quorate_core::election::Role;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument, info, warn};

use super::driver::{DRIVER_TIMEOUT, DriverError, FENCER_NAME, SharedRole, connect_redis, run_hook};
use crate::redis_access::RedisAccess;
use crate::wire::keys::lease_key;

/// How often a failed fence is retried.
const FENCE_RETRY: Duration = Duration::from_millis(10);

/// Commands queued to the fencer at most; the role loop waits for each
/// answer, so this never fills in practice.
const QUEUE: usize = 16;

/// How a fence, an opening and the lease key are done on one data service.
#[derive(Debug)]
pub enum FenceOps {
    Redis { url: String, group: String, access: Arc<RedisAccess>, conn: Option<MultiplexedConnection> },
    Exec { group: String, member: String, command: String, role: SharedRole },
    None,
}

impl FenceOps {
    async fn conn(&mut self) -> Result<Option<MultiplexedConnection>, DriverError> {
        match self {
            FenceOps::Redis { url, access, conn, .. } => {
                if conn.is_none() {
                    let c = connect_redis(access, url).await?;
                    // Named so that a demotion's disconnection of clients
                    // spares it; sent without waiting, like the lease key.
                    let mut named = c.clone();
                    tokio::spawn(async move {
                        let mut name = redis::cmd("CLIENT");
                        name.arg("SETNAME").arg(FENCER_NAME);
                        let _ = tokio::time::timeout(DRIVER_TIMEOUT, name.query_async::<()>(&mut named)).await;
                    });
                    *conn = Some(c);
                }
                Ok(conn.clone())
            }
            _ => Ok(None),
        }
    }

    async fn query(&mut self, cmd: redis::Cmd) -> Result<(), DriverError> {
        let Some(mut c) = self.conn().await? else { return Ok(()) };
        let res = tokio::time::timeout(DRIVER_TIMEOUT, cmd.query_async::<redis::Value>(&mut c)).await;
        let err = match res {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => DriverError(format!("fence: {e}")),
            Err(_) => DriverError("fence: the data service did not answer".into()),
        };
        if let FenceOps::Redis { conn, .. } = self {
            *conn = None;
        }
        Err(err)
    }

    /// Stops writes.
    async fn fence(&mut self) -> Result<(), DriverError> {
        match self {
            FenceOps::Redis { .. } => {
                let mut pause = redis::cmd("CLIENT");
                pause.arg("PAUSE").arg(24 * 3600 * 1000u64).arg("WRITE");
                self.query(pause).await?;
                // Our own connection is spared (SKIPME yes is the default).
                let mut kill = redis::cmd("CLIENT");
                kill.arg("KILL").arg("TYPE").arg("normal");
                self.query(kill).await
            }
            FenceOps::Exec { group, member, command, role } => {
                run_hook(group, member, "fence", command, 0, "fenced").await?;
                role.set(Role::Unknown);
                Ok(())
            }
            FenceOps::None => Ok(()),
        }
    }

    /// Lets writes in again (after a promotion under a valid lease).
    async fn open(&mut self) -> Result<(), DriverError> {
        let mut unpause = redis::cmd("CLIENT");
        unpause.arg("UNPAUSE");
        self.query(unpause).await
    }

    /// Sets the lease key to expire at the deadline, without waiting for
    /// the reply, and only over a connection already open: connecting can
    /// take up to DRIVER_TIMEOUT, and the deadline timer must not wait for
    /// it (the next fence or opening reconnects; the key expires by itself).
    async fn keep_key(&mut self, epoch: u64, valid_for: Duration) {
        let FenceOps::Redis { group, conn: Some(c), .. } = self else { return };
        let key = lease_key(group);
        let mut c = c.clone();
        let ms = valid_for.as_millis().max(1) as u64;
        tokio::spawn(async move {
            let mut set = redis::cmd("SET");
            set.arg(key).arg(epoch).arg("PX").arg(ms);
            if let Ok(Err(e)) = tokio::time::timeout(DRIVER_TIMEOUT, set.query_async::<()>(&mut c)).await {
                warn!("cannot refresh the lease key: {e}");
            }
        });
    }
}

enum Cmd {
    Arm { epoch: u64, deadline: Instant, done: oneshot::Sender<()> },
    Open { epoch: u64, done: oneshot::Sender<Result<(), DriverError>> },
    FenceNow { done: oneshot::Sender<Result<(), DriverError>> },
    Disarm { done: oneshot::Sender<()> },
}

/// The handle the role loop holds; dropping it stops the fencer thread.
#[derive(Debug)]
pub struct Fencer {
    tx: mpsc::Sender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy)]
struct Armed {
    epoch: u64,
    deadline: Instant,
    /// Writes were opened under this epoch.
    open: bool,
}

/// Why the fencer is not running the normal way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceMode {
    Normal,
    /// UNSAFE, for the fault suite's negative control only: never fence.
    TestOnlyNever,
}

impl Fencer {
    /// Starts the fencer thread for `ops`.
    /// `delay` records how late after each deadline its fence was applied
    /// (the metric `quorate_agent_fence_delay_seconds`).
    pub fn spawn(
        ops: FenceOps,
        mode: FenceMode,
        span: tracing::Span,
        delay: Option<Histogram>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new()
            .name("quorate-fencer".into())
            .spawn(move || rt.block_on(run(ops, mode, rx, delay).instrument(span)))?;
        Ok(Self { tx, thread: Some(thread) })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Option<T> {
        let (done, rx) = oneshot::channel();
        self.tx.send(make(done)).await.ok()?;
        rx.await.ok()
    }

    /// The lease of `epoch` is valid until `deadline`: fence then unless a
    /// later deadline comes first.
    pub async fn arm(&self, epoch: u64, deadline: Instant) {
        self.ask(|done| Cmd::Arm { epoch, deadline, done }).await;
    }

    /// Opens writes under `epoch`, if its deadline has not passed.
    pub async fn open(&self, epoch: u64) -> Result<(), DriverError> {
        self.ask(|done| Cmd::Open { epoch, done }).await.unwrap_or_else(|| Err(stopped()))
    }

    /// Fences now.
    pub async fn fence_now(&self) -> Result<(), DriverError> {
        self.ask(|done| Cmd::FenceNow { done }).await.unwrap_or_else(|| Err(stopped()))
    }

    /// Forgets the deadline (the service is about to follow a new primary,
    /// which makes it refuse writes by itself).
    pub async fn disarm(&self) {
        self.ask(|done| Cmd::Disarm { done }).await;
    }
}

impl Drop for Fencer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn stopped() -> DriverError {
    DriverError("the fencer has stopped".into())
}

fn micros_between(later: Instant, earlier: Instant) -> i64 {
    if later >= earlier {
        i64::try_from((later - earlier).as_micros()).unwrap_or(i64::MAX)
    } else {
        -i64::try_from((earlier - later).as_micros()).unwrap_or(i64::MAX)
    }
}

async fn run(mut ops: FenceOps, mode: FenceMode, mut rx: mpsc::Receiver<Cmd>, delay: Option<Histogram>) {
    // Connect early: the first fence should not pay for a connection.
    let _ = ops.conn().await;
    let mut armed: Option<Armed> = None;
    // A fence that failed and is owed (retried every FENCE_RETRY).
    let mut owed: Option<(Option<Armed>, &'static str)> = None;
    loop {
        let wake = match (owed.is_some(), armed) {
            (true, _) => Some(Instant::now() + FENCE_RETRY),
            (false, Some(a)) if mode == FenceMode::Normal => Some(a.deadline),
            _ => None,
        };
        let cmd = tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(c) => Some(c),
                None => return,
            },
            () = sleep_until(wake) => None,
        };
        match cmd {
            None => {
                // The deadline passed with no newer one, or a retry is due.
                let (what, by) = owed.take().unwrap_or((armed, "deadline"));
                armed = None;
                if let Err(e) = apply_fence(&mut ops, what, by, delay.as_ref()).await {
                    warn!("fence failed, retrying: {e}");
                    owed = Some((what, by));
                }
            }
            Some(Cmd::Arm { epoch, deadline, done }) => {
                // The keeper arms first and the role loop repeats it, so an
                // older deadline of the same epoch can arrive late: it must
                // not shorten the lease. A deadline already past has been
                // fenced for (or belongs to a lease already lost).
                let stale = armed.is_some_and(|a| a.epoch == epoch && a.deadline >= deadline);
                if !stale && let Some(valid_for) = deadline.checked_duration_since(Instant::now()) {
                    let open = armed.is_some_and(|a| a.epoch == epoch && a.open);
                    if open {
                        ops.keep_key(epoch, valid_for).await;
                    }
                    armed = Some(Armed { epoch, deadline, open });
                }
                let _ = done.send(());
            }
            Some(Cmd::Open { epoch, done }) => {
                let res = match armed {
                    Some(a) if a.epoch == epoch && Instant::now() < a.deadline => match ops.open().await {
                        Ok(()) => {
                            armed = Some(Armed { open: true, ..a });
                            if let Some(valid_for) = a.deadline.checked_duration_since(Instant::now()) {
                                ops.keep_key(epoch, valid_for).await;
                            }
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    _ => Err(DriverError(format!("not opening writes: the lease of epoch {epoch} is not valid"))),
                };
                let _ = done.send(res);
            }
            Some(Cmd::FenceNow { done }) => {
                if mode == FenceMode::TestOnlyNever {
                    warn!("test-only: not fencing");
                    armed = None;
                    let _ = done.send(Ok(()));
                    continue;
                }
                let what = armed.take();
                let res = apply_fence(&mut ops, what, "keeper", delay.as_ref()).await;
                owed = None;
                let _ = done.send(res);
            }
            Some(Cmd::Disarm { done }) => {
                armed = None;
                owed = None;
                let _ = done.send(());
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Fences, and logs how late against the deadline it was applied.
async fn apply_fence(
    ops: &mut FenceOps,
    armed: Option<Armed>,
    by: &'static str,
    delay: Option<&Histogram>,
) -> Result<(), DriverError> {
    let started = Instant::now();
    ops.fence().await?;
    let applied = Instant::now();
    if let (Some(a), Some(h)) = (armed, delay) {
        h.observe(applied.saturating_duration_since(a.deadline).as_secs_f64());
    }
    match armed {
        Some(a) => info!(
            epoch = a.epoch,
            late_us = micros_between(applied, a.deadline),
            took_us = micros_between(applied, started),
            by,
            "deadline fence applied"
        ),
        None => info!(took_us = micros_between(applied, started), by, "fence applied"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The fencer with an exec fence hook that appends a line to a file:
    //! real time, real threads, generous bounds.

    use super::*;

    fn fencer(dir: &std::path::Path, mode: FenceMode) -> (Fencer, std::path::PathBuf) {
        let log = dir.join("fenced");
        let ops = FenceOps::Exec {
            group: "g".into(),
            member: "m".into(),
            command: format!("echo fenced >> {}", log.display()),
            role: SharedRole::default(),
        };
        (Fencer::spawn(ops, mode, tracing::Span::none(), None).unwrap(), log)
    }

    fn fences(log: &std::path::Path) -> usize {
        std::fs::read_to_string(log).map_or(0, |s| s.lines().count())
    }

    #[tokio::test]
    async fn a_deadline_without_a_newer_one_fences_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (f, log) = fencer(dir.path(), FenceMode::Normal);
        let start = Instant::now();
        f.arm(1, start + Duration::from_millis(300)).await;
        // A newer deadline postpones the fence; an older one is ignored.
        tokio::time::sleep(Duration::from_millis(100)).await;
        f.arm(1, start + Duration::from_millis(600)).await;
        f.arm(1, start + Duration::from_millis(200)).await;
        f.open(1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(fences(&log), 0, "fenced before the newest deadline");
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert_eq!(fences(&log), 1, "no fence within 1.2 s of the deadline");
        // Once fenced, writes are not opened again under that lease.
        assert!(f.open(1).await.is_err());
    }

    #[tokio::test]
    async fn disarmed_or_disabled_fencers_do_not_fence_and_fence_now_does() {
        let dir = tempfile::tempdir().unwrap();
        let (f, log) = fencer(dir.path(), FenceMode::Normal);
        f.arm(1, Instant::now() + Duration::from_millis(100)).await;
        f.disarm().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(fences(&log), 0);
        f.fence_now().await.unwrap();
        assert_eq!(fences(&log), 1);
        // A deadline that has already passed arms nothing.
        f.arm(2, Instant::now() - Duration::from_millis(1)).await;
        assert!(f.open(2).await.is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fences(&log), 1);

        let dir = tempfile::tempdir().unwrap();
        let (f, log) = fencer(dir.path(), FenceMode::TestOnlyNever);
        f.arm(1, Instant::now() + Duration::from_millis(50)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.fence_now().await.unwrap();
        assert_eq!(fences(&log), 0, "the test-only mode fenced");
    }
}

//! `quorate bench failover-probe`: one kill -9 failover, measured as a
//! client sees it. The same probe measures quorate and Redis Sentinel
//! (deploy/bench/failover.sh runs both), so that neither is charged for a
//! different client.
//!
//! Before the clock starts it opens everything it will listen on and
//! checks that each is live: a `+switch-master` subscription on every
//! `--sentinel` (the subscription is confirmed), quorate's `Watch` stream on
//! `--watch-group` (its first event, the lease as it is, has arrived), and a
//! connection to `--write-to` (which must still refuse a `SET`: it is the
//! replica). Then it records t0, SIGKILLs every `--kill-pid`, and
//! concurrently:
//!
//! - **writable**: a `SET` on `--write-to` every millisecond until one is
//!   accepted;
//! - **told (watch)**: the first event naming a new lease holder (another
//!   holder, a higher epoch);
//! - **told (sentinel)**: the first `+switch-master` message for
//!   `--master-name` on each subscription.
//!
//! Each is `null` when not seen within `--timeout-s`. The watch's events
//! on the way (verdicts, designations) are kept with their times too: where
//! quorate's time goes, as its client sees it. Pure measurement: it
//! changes nothing but the one key it writes and the processes it is told
//! to kill. Its options live here, flattened into `quorate bench`'s, so
//! that the CLI module only forwards them.

use std::time::Duration;

use futures::StreamExt as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use tokio::time::Instant;

use crate::client::{Client, ClientError};
use crate::pb::v1 as pb;

/// How long each setup step (connect, subscribe, first watch event) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one `SET` may take before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a (re)connection to the write target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// The write poll's period.
const WRITE_PERIOD: Duration = Duration::from_millis(1);
/// Pause before reopening a watch stream that ended, so that a node that
/// refuses it is not hammered.
const REWATCH_PAUSE: Duration = Duration::from_millis(20);
/// At most this many watch events are kept for the timeline.
const TIMELINE_EVENTS: usize = 64;
/// The key the probe writes.
const PROBE_KEY: &str = "quorate-bench:failover-probe";

/// The probe's options (`quorate bench failover-probe ...`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProbeArgs {
    /// failover-probe: a process to SIGKILL at t0 (repeatable: the host's
    /// data Redis, heartbeat Redis, agent).
    #[arg(long = "kill-pid")]
    pub kill_pids: Vec<u32>,
    /// failover-probe: HOST:PORT of the replica expected to become writable.
    #[arg(long)]
    pub write_to: Option<String>,
    /// failover-probe: a Sentinel (or quorate's Sentinel-compatible
    /// endpoint) to follow `+switch-master` on, HOST:PORT (repeatable).
    #[arg(long = "sentinel")]
    pub sentinels: Vec<String>,
    /// failover-probe: the master name the `+switch-master` message must
    /// carry.
    #[arg(long)]
    pub master_name: Option<String>,
    /// failover-probe: a group whose lease to follow with `Watch` (through
    /// the usual --endpoints/--ca/--cert/--key).
    #[arg(long)]
    pub watch_group: Option<String>,
    /// failover-probe: how long to wait for each measurement after the kill.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// What one probe measured; times in ms after t0, `None` when not seen
/// within the timeout (or not asked for).
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub writable_ms: Option<f64>,
    pub told_watch_ms: Option<f64>,
    /// The earliest of `told_sentinel_each_ms`.
    pub told_sentinel_ms: Option<f64>,
    /// One per `--sentinel`, in order.
    pub told_sentinel_each_ms: Vec<Option<f64>>,
    /// The first `+switch-master` payload seen.
    pub switch_master: Option<String>,
    /// The lease holder and epoch before the kill, and the one the watch
    /// learned.
    pub holder_before: Option<(String, u64)>,
    pub holder_after: Option<(String, u64)>,
    /// Every watch event after t0 up to the new holder (at most
    /// [`TIMELINE_EVENTS`]).
    pub watch_events: Vec<TimedEvent>,
    /// `SET`s sent after t0, and the last refusal (READONLY, a timeout...).
    pub write_attempts: u64,
    pub last_write_error: Option<String>,
    pub killed: Vec<u32>,
    /// t0 on the wall clock, ms since the Unix epoch.
    pub t0_unix_ms: f64,
    pub timeout_s: u64,
}

/// One watch event on the probe's timeline.
#[derive(Debug, Clone, Serialize)]
pub struct TimedEvent {
    pub ms: f64,
    /// `verdict`, `election`, `acquired`, `expired`, ...
    pub kind: String,
    /// For a verdict, the member and its new state (`db-1 down`); for an
    /// election, the designated member; for a lease event, the holder.
    pub detail: String,
}

impl TimedEvent {
    fn of(ms: f64, ev: &pb::WatchEvent) -> Self {
        let kind = pb::EventKind::try_from(ev.kind)
            .map_or_else(|_| ev.kind.to_string(), |k| k.as_str_name().trim_start_matches("EVENT_KIND_").to_lowercase());
        let detail = match (&ev.verdict, &ev.election) {
            (Some(v), _) => {
                let state = v.to.as_ref().map_or(0, |t| t.state);
                format!("{} {}", v.member, crate::render::verdict_name(state))
            }
            (None, Some(e)) => format!("designated {}", e.designated),
            (None, None) => {
                ev.lease.as_ref().map(|l| format!("holder {} epoch {}", l.holder, l.epoch)).unwrap_or_default()
            }
        };
        Self { ms, kind, detail }
    }
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
        write!(
            f,
            "failover-probe: writable {}, told (watch) {}, told (sentinel) {}, {} writes",
            ms(self.writable_ms),
            ms(self.told_watch_ms),
            ms(self.told_sentinel_ms),
            self.write_attempts
        )
    }
}

/// Why the probe could not measure (a measurement not seen in time is a
/// `None` in the report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Invalid(String),
    #[error("write target {addr}: {message}")]
    Target { addr: String, message: String },
    #[error("sentinel {addr}: cannot subscribe to +switch-master: {message}")]
    Subscribe { addr: String, message: String },
    #[error("watch of {group}: {message}")]
    Watch { group: String, message: String },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("pid {pid}: {errno}; nothing was killed")]
    NoProcess { pid: u32, errno: nix::errno::Errno },
}

/// Runs one probe. `client` is used only with `--watch-group`.
pub async fn run(client: &Client, args: &ProbeArgs) -> Result<ProbeReport, ProbeError> {
    if args.kill_pids.is_empty() {
        return Err(ProbeError::Invalid("failover-probe needs at least one --kill-pid".into()));
    }
    if args.write_to.is_none() && args.sentinels.is_empty() && args.watch_group.is_none() {
        return Err(ProbeError::Invalid(
            "failover-probe: nothing to measure (--write-to, --sentinel, --watch-group)".into(),
        ));
    }
    let master_name = match (&args.master_name, args.sentinels.is_empty()) {
        (Some(m), _) => m.clone(),
        (None, true) => String::new(),
        (None, false) => return Err(ProbeError::Invalid("--sentinel needs --master-name".into())),
    };
    let timeout = Duration::from_secs(args.timeout_s.max(1));

    // Everything is open and live before the clock starts.
    let mut subscriptions = Vec::new();
    for addr in &args.sentinels {
        subscriptions.push(subscribe(addr).await?);
    }
    let watch = match &args.watch_group {
        Some(group) => Some(open_watch(client, group).await?),
        None => None,
    };
    let target = match &args.write_to {
        Some(addr) => Some(Target::ready(addr).await?),
        None => None,
    };
    let pids = checked_pids(&args.kill_pids)?;

    // The wall clock too, so that the logs' timestamps can be put on t0's
    // timeline.
    let t0_unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let t0 = Instant::now();
    for pid in &pids {
        // Checked just above; a process that died since is dead already.
        let _ = kill(*pid, Signal::SIGKILL);
    }
    let deadline = t0 + timeout;

    let writable = async {
        match target {
            Some(t) => Some(t.poll_until_writable(deadline).await),
            None => None,
        }
    };
    let told_watch = async {
        match (watch, &args.watch_group) {
            (Some(w), Some(group)) => Some(w.until_new_holder(client, group, deadline).await),
            _ => None,
        }
    };
    let told_sentinels =
        futures::future::join_all(subscriptions.into_iter().map(|s| switch_master(s, &master_name, deadline)));
    let (writable, told_watch, told_sentinels) = tokio::join!(writable, told_watch, told_sentinels);

    let since = |at: Instant| (at - t0).as_secs_f64() * 1000.0;
    let round = |ms: f64| (ms * 10.0).round() / 10.0;
    let each: Vec<Option<f64>> = told_sentinels.iter().map(|s| s.as_ref().map(|(at, _)| round(since(*at)))).collect();
    let first = told_sentinels.iter().flatten().min_by_key(|(at, _)| *at);
    let (write_attempts, last_write_error, writable_at) = match writable {
        Some(w) => (w.attempts, w.last_error, w.ok_at),
        None => (0, None, None),
    };
    let (holder_before, learned, seen) = match told_watch {
        Some(w) => (w.before, w.learned, w.events),
        None => (None, None, Vec::new()),
    };
    let watch_events = seen.iter().map(|(at, ev)| TimedEvent::of(round(since(*at)), ev)).collect();
    Ok(ProbeReport {
        writable_ms: writable_at.map(|at| round(since(at))),
        told_watch_ms: learned.as_ref().map(|(at, _)| round(since(*at))),
        told_sentinel_ms: first.map(|(at, _)| round(since(*at))),
        told_sentinel_each_ms: each,
        switch_master: first.map(|(_, payload)| payload.clone()),
        holder_before,
        holder_after: learned.map(|(_, h)| h),
        watch_events,
        write_attempts,
        last_write_error,
        killed: args.kill_pids.clone(),
        t0_unix_ms: (t0_unix_ms * 1000.0).round() / 1000.0,
        timeout_s: timeout.as_secs(),
    })
}

/// The pids as nix wants them, each checked to be a live process (signal 0)
/// so that a typo kills nothing rather than half a host.
fn checked_pids(pids: &[u32]) -> Result<Vec<Pid>, ProbeError> {
    pids.iter()
        .map(|&pid| {
            let raw = i32::try_from(pid).map_err(|_| ProbeError::Invalid(format!("pid {pid} is out of range")))?;
            let p = Pid::from_raw(raw);
            kill(p, None).map_err(|errno| ProbeError::NoProcess { pid, errno })?;
            Ok(p)
        })
        .collect()
}

/// A confirmed `+switch-master` subscription on one sentinel.
struct Subscription {
    stream: redis::aio::PubSubStream,
}

async fn subscribe(addr: &str) -> Result<Subscription, ProbeError> {
    let err = |message: String| ProbeError::Subscribe { addr: addr.to_owned(), message };
    let open = async {
        let client = redis::Client::open(format!("redis://{addr}")).map_err(|e| err(e.to_string()))?;
        let mut pubsub = client.get_async_pubsub().await.map_err(|e| err(e.to_string()))?;
        // Returns once the server has confirmed the subscription.
        pubsub.subscribe("+switch-master").await.map_err(|e| err(e.to_string()))?;
        Ok(Subscription { stream: pubsub.into_on_message() })
    };
    tokio::time::timeout(SETUP_TIMEOUT, open).await.map_err(|_| err(format!("no answer within {SETUP_TIMEOUT:?}")))?
}

/// When the first `+switch-master` for `master` arrived, and its payload.
async fn switch_master(mut sub: Subscription, master: &str, deadline: Instant) -> Option<(Instant, String)> {
    let prefix = format!("{master} ");
    let wait = async {
        while let Some(msg) = sub.stream.next().await {
            let at = Instant::now();
            let payload: String = msg.get_payload().unwrap_or_default();
            if payload.starts_with(&prefix) {
                return Some((at, payload));
            }
        }
        // The connection closed: nothing more will be told on it.
        None
    };
    tokio::time::timeout_at(deadline, wait).await.ok().flatten()
}

/// A live watch and the lease it started from.
struct Watch {
    stream: tonic::Streaming<pb::WatchEvent>,
    before: Option<(String, u64)>,
    epoch: u64,
}

/// The holder a lease names, if any.
fn holder_of(lease: Option<&pb::Lease>) -> Option<(String, u64)> {
    lease.filter(|l| !l.holder.is_empty()).map(|l| (l.holder.clone(), l.epoch))
}

async fn open_watch(client: &Client, group: &str) -> Result<Watch, ProbeError> {
    let err = |message: String| ProbeError::Watch { group: group.to_owned(), message };
    let open = async {
        let mut stream = client.watch(group).await?;
        // The first event of every stream is the lease as it is now: the
        // stream is live once it has arrived.
        let first = stream.message().await.map_err(|s| err(s.message().to_owned()))?;
        let first = first.ok_or_else(|| err("the stream ended before its first event".into()))?;
        let epoch = first.lease.as_ref().map_or(0, |l| l.epoch);
        Ok(Watch { stream, before: holder_of(first.lease.as_ref()), epoch })
    };
    tokio::time::timeout(SETUP_TIMEOUT, open)
        .await
        .map_err(|_| err(format!("no first event within {SETUP_TIMEOUT:?}")))?
}

/// What the watch saw after t0.
struct Followed {
    before: Option<(String, u64)>,
    /// When an event first named the new holder, and who.
    learned: Option<(Instant, (String, u64))>,
    events: Vec<(Instant, pb::WatchEvent)>,
}

impl Watch {
    /// The holder before, and when an event first named another holder at a
    /// higher epoch (with it). A stream that ends is reopened (its first
    /// event counts: it is when this client learns), until the deadline.
    async fn until_new_holder(mut self, client: &Client, group: &str, deadline: Instant) -> Followed {
        let before = self.before.clone();
        let mut events = Vec::new();
        let is_new = |h: &(String, u64)| h.1 > self.epoch && Some(&h.0) != before.as_ref().map(|b| &b.0);
        let wait = async {
            loop {
                match self.stream.message().await {
                    Ok(Some(ev)) => {
                        let at = Instant::now();
                        let new = holder_of(ev.lease.as_ref()).filter(is_new);
                        if events.len() < TIMELINE_EVENTS {
                            events.push((at, ev));
                        }
                        if let Some(h) = new {
                            return Some((at, h));
                        }
                    }
                    Ok(None) | Err(_) => loop {
                        tokio::time::sleep(REWATCH_PAUSE).await;
                        if let Ok(s) = client.watch(group).await {
                            self.stream = s;
                            break;
                        }
                    },
                }
            }
        };
        let learned = tokio::time::timeout_at(deadline, wait).await.ok().flatten();
        Followed { before: before.clone(), learned, events }
    }
}

/// The replica the probe writes to.
struct Target {
    addr: String,
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
}

/// What the write poll saw.
struct Polled {
    ok_at: Option<Instant>,
    attempts: u64,
    last_error: Option<String>,
}

impl Target {
    /// Connected, and still refusing a `SET` (a target that accepts one
    /// before the kill would measure nothing).
    async fn ready(addr: &str) -> Result<Self, ProbeError> {
        let err = |message: String| ProbeError::Target { addr: addr.to_owned(), message };
        let client = redis::Client::open(format!("redis://{addr}")).map_err(|e| err(e.to_string()))?;
        let mut t = Self { addr: addr.to_owned(), client, conn: None };
        let conn = tokio::time::timeout(SETUP_TIMEOUT, t.connect())
            .await
            .map_err(|_| err(format!("no connection within {SETUP_TIMEOUT:?}")))?
            .map_err(|e| err(e.to_string()))?;
        t.conn = Some(conn);
        match t.set().await {
            Ok(()) => Err(err("accepts writes before the kill: it is not a replica".into())),
            Err(_) => Ok(t),
        }
    }

    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(WRITE_TIMEOUT));
        self.client.get_multiplexed_async_connection_with_config(&config).await
    }

    /// One `SET`, reconnecting first if the last one broke the connection.
    async fn set(&mut self) -> Result<(), String> {
        let mut conn = match self.conn.clone() {
            Some(c) => c,
            None => {
                let c = self.connect().await.map_err(|e| format!("connect: {e}"))?;
                self.conn = Some(c.clone());
                c
            }
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(PROBE_KEY).arg(std::process::id());
        match tokio::time::timeout(WRITE_TIMEOUT, cmd.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.conn = None;
                }
                Err(e.to_string())
            }
            Err(_) => {
                self.conn = None;
                Err(format!("no answer within {WRITE_TIMEOUT:?}"))
            }
        }
    }

    /// A `SET` every [`WRITE_PERIOD`] until one is accepted or the deadline.
    async fn poll_until_writable(mut self, deadline: Instant) -> Polled {
        let mut tick = tokio::time::interval(WRITE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut polled = Polled { ok_at: None, attempts: 0, last_error: None };
        while Instant::now() < deadline {
            tick.tick().await;
            polled.attempts += 1;
            match self.set().await {
                Ok(()) => {
                    polled.ok_at = Some(Instant::now());
                    break;
                }
                Err(e) => polled.last_error = Some(format!("{}: {e}", self.addr)),
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_holder_needs_a_name_and_is_read_from_the_lease() {
        assert_eq!(holder_of(None), None);
        let free = pb::Lease { holder: String::new(), epoch: 3, ..Default::default() };
        assert_eq!(holder_of(Some(&free)), None);
        let held = pb::Lease { holder: "db-2".into(), epoch: 4, ..Default::default() };
        assert_eq!(holder_of(Some(&held)), Some(("db-2".into(), 4)));
    }

    #[test]
    fn pids_are_checked_before_anything_is_killed() {
        // Our own pid is alive (signal 0 only checks); i32::MAX is above
        // any pid_max, so no process.
        assert!(checked_pids(&[std::process::id()]).is_ok());
        assert!(matches!(checked_pids(&[u32::MAX]), Err(ProbeError::Invalid(_))));
        assert!(matches!(checked_pids(&[i32::MAX as u32]), Err(ProbeError::NoProcess { .. })));
    }
}

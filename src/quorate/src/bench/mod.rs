//! `quorate bench`: load generators against a running cluster.
//!
//! `lease-get` and `acquire-renew` are closed loops (this file); `ingest`
//! measures what observations cost the coordinators ([`ingest`]); `groups`
//! whether writes keep committing with thousands of groups ([`groups`]);
//! `--target etcd` runs the closed loops against etcd ([`etcd`]);
//! `read-gap` and `leader` measure reads across a leader change
//! ([`read_gap`]); `failover-probe` one kill -9 failover as a client sees it ([`failover`]).
//!
//! N clients (each with its own connection) issue calls back to back for the
//! given duration; every latency is recorded and the report gives throughput
//! and p50/p99/max. Numbers, not assertions: this is how the README's
//! figures are produced.

pub mod etcd;
pub mod failover;
pub mod groups;
pub mod ingest;
pub mod read_gap;

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{Client, ClientError};
use crate::pb::v1 as pb;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchKind {
    /// `GetLease` on one group, at the given consistency.
    LeaseGet,
    /// Each client acquires its own group once, then renews as fast as it can.
    AcquireRenew,
    /// Simulated members and agents; measures coordinator CPU per observation.
    Ingest,
    /// Creates `--count` groups, then renews leases: write latency with many groups.
    Groups,
    /// One client reads every `--interval-ms`: the longest gap between successes.
    ReadGap,
    /// Prints the current leader (id and endpoint) and exits.
    Leader,
    /// Kills a primary's host and measures when the replica is writable and
    /// when clients are told (see [`failover`]).
    FailoverProbe,
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub kind: BenchKind,
    pub consistency: String,
    pub clients: usize,
    pub duration_s: f64,
    pub ops: u64,
    pub errors: u64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            BenchKind::LeaseGet => format!("lease-get ({})", self.consistency),
            BenchKind::AcquireRenew => "acquire-renew (renewals)".to_owned(),
            BenchKind::Ingest => "ingest".to_owned(),
            BenchKind::Groups => "groups".to_owned(),
            BenchKind::ReadGap => "read-gap".to_owned(),
            BenchKind::Leader => "leader".to_owned(),
            BenchKind::FailoverProbe => "failover-probe".to_owned(),
        };
        write!(
            f,
            "{what}: {} clients, {:.1} s: {:.0} ops/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {} ops, {} errors",
            self.clients, self.duration_s, self.ops_per_s, self.p50_ms, self.p99_ms, self.max_ms, self.ops, self.errors
        )
    }
}

/// Runs the benchmark against the cluster `client` points at.
pub async fn run(
    client: &Client,
    kind: BenchKind,
    clients: usize,
    duration: Duration,
    consistency: pb::Consistency,
) -> Result<BenchReport, ClientError> {
    let clients = clients.max(1);
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let c = client.another()?;
        tasks.spawn(async move { worker(c, kind, i, end, consistency).await });
    }
    let mut latencies_us: Vec<u32> = Vec::new();
    let mut errors = 0;
    while let Some(res) = tasks.join_next().await {
        let (lat, errs) = res.map_err(|e| ClientError::Unavailable { attempts: 0, last: e.to_string() })??;
        latencies_us.extend(lat);
        errors += errs;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (p50_ms, p99_ms, max_ms) = percentiles(&mut latencies_us);
    Ok(BenchReport {
        kind,
        consistency: match (kind, consistency) {
            (BenchKind::AcquireRenew, _) => "write".to_owned(),
            (_, pb::Consistency::LeaseRead) => "lease-read".to_owned(),
            (_, pb::Consistency::ReadIndex) => "read-index".to_owned(),
            (_, pb::Consistency::Stale) => "stale".to_owned(),
            _ => "linearizable".to_owned(),
        },
        clients,
        duration_s: elapsed,
        ops: latencies_us.len() as u64,
        errors,
        ops_per_s: latencies_us.len() as f64 / elapsed,
        p50_ms,
        p99_ms,
        max_ms,
    })
}

/// p50, p99 and max of latencies in µs, in ms (zeros when empty).
pub(crate) fn percentiles(latencies_us: &mut [u32]) -> (f64, f64, f64) {
    latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies_us.is_empty() {
            return 0.0;
        }
        let idx = ((latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(latencies_us[idx]) / 1000.0
    };
    (pct(0.5), pct(0.99), pct(1.0))
}

/// One closed-loop client. Returns its latencies and its error count.
async fn worker(
    c: Client,
    kind: BenchKind,
    i: usize,
    end: Instant,
    consistency: pb::Consistency,
) -> Result<(Vec<u32>, u64), ClientError> {
    let mut lat = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    let group = format!("bench-{i}");
    let holder = c.holder_for(&format!("bench-{}-{i}", std::process::id()));
    let mut epoch = 0;
    if kind == BenchKind::AcquireRenew {
        let resp = c.acquire(&group, &holder, 10_000, Some(Duration::from_secs(15))).await?;
        epoch = resp.lease.map_or(0, |l| l.epoch);
    }
    while Instant::now() < end {
        let t = Instant::now();
        let ok = match kind {
            BenchKind::LeaseGet
            | BenchKind::Ingest
            | BenchKind::Groups
            | BenchKind::ReadGap
            | BenchKind::Leader
            | BenchKind::FailoverProbe => c.get_lease("bench", consistency).await.is_ok(),
            BenchKind::AcquireRenew => c.renew(&group, &holder, epoch).await.is_ok(),
        };
        if ok {
            lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
        } else {
            errors += 1;
        }
    }
    if kind == BenchKind::AcquireRenew {
        let _ = c.release(&group, &holder, epoch).await;
    }
    Ok((lat, errors))
}

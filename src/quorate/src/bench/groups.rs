//! `quorate bench groups`: many groups, and whether writes keep committing.
//!
//! Creates `count` two-member groups (`clients` ApplyGroup calls at a time)
//! whose heartbeats point at one store (a redis-server it starts, unless
//! `--heartbeat-url` is given; no member beats, so every coordinator
//! observes every member as down and reports on every group each report
//! interval: the load that made commits freeze at about 5,700 groups). Then,
//! for `duration`, it renews one lease per client back to back. It reports
//! the latency of the creations and of the renewals, and the Raft entries
//! applied per second in the renewal window. Numbers, not assertions.

use std::time::{Duration, Instant};

use quorate_core::group::{GroupSpec, MemberSpec, Policy};
use serde::Serialize;

use super::ingest::{IngestError, applied_index, start_redis};
use super::percentiles;
use crate::client::Client;
use crate::wire::convert::spec_pb;

/// Options of one run.
#[derive(Debug, Clone)]
pub struct GroupsOptions {
    pub count: usize,
    pub clients: usize,
    pub duration: Duration,
    pub heartbeat_url: Option<String>,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct GroupsReport {
    pub groups: usize,
    pub create_s: f64,
    pub create_p50_ms: f64,
    pub create_p99_ms: f64,
    pub create_max_ms: f64,
    pub create_errors: u64,
    pub renewals: u64,
    pub renew_p50_ms: f64,
    pub renew_p99_ms: f64,
    pub renew_max_ms: f64,
    pub renew_errors: u64,
    /// Raft entries applied per second while renewing (renewals, the
    /// coordinators' reports).
    pub entries_per_s: f64,
}

impl std::fmt::Display for GroupsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "groups: created {} in {:.1} s (p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors); then {} renewals \
             (p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors), {:.0} Raft entries/s",
            self.groups,
            self.create_s,
            self.create_p50_ms,
            self.create_p99_ms,
            self.create_max_ms,
            self.create_errors,
            self.renewals,
            self.renew_p50_ms,
            self.renew_p99_ms,
            self.renew_max_ms,
            self.renew_errors,
            self.entries_per_s
        )
    }
}

/// Runs the benchmark against the cluster `client` points at.
pub async fn run(client: &Client, opts: &GroupsOptions) -> Result<GroupsReport, IngestError> {
    let clients = opts.clients.clamp(1, 256);
    let (_own, url) = match &opts.heartbeat_url {
        Some(u) => (None, u.clone()),
        None => {
            let (r, u) = start_redis()?;
            (Some(r), u)
        }
    };
    let started = Instant::now();
    let (mut create, create_errors) = create_groups(client, clients, opts.count, &url).await?;
    let create_s = started.elapsed().as_secs_f64();

    // Renewals with every group in place.
    let applied0 = applied_index(client).await?;
    let t0 = Instant::now();
    let (mut renew, renew_errors) = renew_until(client, clients, t0 + opts.duration).await?;
    let window = t0.elapsed().as_secs_f64();
    let applied1 = applied_index(client).await?;
    let (c50, c99, cmax) = percentiles(&mut create);
    let (r50, r99, rmax) = percentiles(&mut renew);
    Ok(GroupsReport {
        groups: opts.count,
        create_s,
        create_p50_ms: c50,
        create_p99_ms: c99,
        create_max_ms: cmax,
        create_errors,
        renewals: renew.len() as u64,
        renew_p50_ms: r50,
        renew_p99_ms: r99,
        renew_max_ms: rmax,
        renew_errors,
        entries_per_s: applied1.saturating_sub(applied0) as f64 / window,
    })
}

/// Creates groups `bench-group-0..count` (two members beating into `url`),
/// `clients` workers each taking the next number in turn; returns each
/// creation's latency in microseconds and the number that failed.
async fn create_groups(base: &Client, clients: usize, count: usize, url: &str) -> Result<(Vec<u32>, u64), IngestError> {
    let spec = |g: usize, url: &str| GroupSpec {
        name: format!("bench-group-{g}"),
        members: (0..2)
            .map(|i| MemberSpec {
                id: format!("m{i}"),
                heartbeat: url.to_owned(),
                priority: 1,
                data: None,
                announce: None,
            })
            .collect(),
        policy: Policy::default(),
        failover: None,
    };
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let c = base.another()?;
        let next = next.clone();
        let url = url.to_owned();
        tasks.spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0u64);
            loop {
                let g = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if g >= count {
                    return (lat, errors);
                }
                let t = Instant::now();
                match c.apply_group(spec_pb(&spec(g, &url))).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u32),
                    Err(_) => errors += 1,
                }
            }
        });
    }
    gather(tasks).await
}

/// `clients` workers each hold a lease of their own and renew it in a
/// closed loop until `end`; returns each renewal's latency in microseconds
/// and the number that failed.
async fn renew_until(base: &Client, clients: usize, end: Instant) -> Result<(Vec<u32>, u64), IngestError> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let c = base.another()?;
        tasks.spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0u64);
            let group = format!("bench-groups-lease-{i}");
            let Ok(a) = c.acquire(&group, "bench", 10_000, None).await else { return (lat, 1) };
            let epoch = a.lease.map_or(0, |l| l.epoch);
            while Instant::now() < end {
                let t = Instant::now();
                match c.renew(&group, "bench", epoch).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u32),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        });
    }
    gather(tasks).await
}

/// Every worker's latencies together, and the sum of their failures.
async fn gather(mut tasks: tokio::task::JoinSet<(Vec<u32>, u64)>) -> Result<(Vec<u32>, u64), IngestError> {
    let (mut all, mut errors) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r.map_err(|e| IngestError::Setup(e.to_string()))?;
        all.extend(l);
        errors += e;
    }
    Ok((all, errors))
}

//! `quorate bench ingest`: what observations cost the coordinators.
//!
//! Simulates N members in groups of K, all publishing heartbeats into one
//! heartbeat store (a redis-server it starts, unless `--heartbeat-url` is
//! given): one pipelined round trip per heartbeat interval sets every key.
//! Simulated agents send what real agents without a data driver send: one
//! report per member per report interval, with its view of its peers, in
//! full the first time (and whenever the leader could not renew it), then,
//! their peers' observations unchanged, as a refresh of that view. The coordinators do their
//! real work: observe every member of every group, ingest every report
//! through Raft. The bench measures, over the window after a warm-up:
//! the CPU time of every `quorate server` process on this machine (from
//! /proc), committed reports per second, observations per second, and
//! whether every view stayed fresh.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quorate_core::group::{GroupSpec, MemberSpec, Policy, heartbeat_key};
use quorate_core::observe::{Beat, ObsState, Observation, Reason};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::client::{Client, ClientError};
use crate::pb::v1 as pb;
use crate::wire::convert::{observation_pb, spec_pb};

/// Options of one ingestion run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub members: usize,
    pub group_size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// An existing heartbeat store; else the bench starts a redis-server.
    pub heartbeat_url: Option<String>,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    pub members: usize,
    pub groups: usize,
    pub coordinators: usize,
    pub heartbeat_interval_ms: u64,
    pub report_interval_ms: u64,
    pub window_s: f64,
    /// Raft entries applied per second (agent and coordinator reports).
    pub entries_per_s: f64,
    /// Observations (matrix cells) ingested per second.
    pub observations_per_s: f64,
    /// CPU of all coordinator processes, in % of the whole machine.
    pub coordinator_cpu_pct_of_machine: f64,
    /// Coordinator CPU per 1,000 observations/s, in % of one core.
    pub cpu_pct_of_core_per_1000_obs_per_s: f64,
    pub agent_reports_failed: u64,
    /// Sampled groups whose every member had a fresh report from every
    /// observer at the end of the run, out of those sampled.
    pub fresh_groups: usize,
    pub sampled_groups: usize,
    pub cores: usize,
}

impl std::fmt::Display for IngestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ingest: {} members in {} groups, {} coordinators, heartbeat {} ms: {:.0} observations/s in {:.0} Raft entries/s; \
             coordinator CPU {:.1}% of the machine ({} cores), {:.2}% of a core per 1,000 observations/s; \
             fresh: {}/{} sampled groups; {} agent reports failed",
            self.members,
            self.groups,
            self.coordinators,
            self.heartbeat_interval_ms,
            self.observations_per_s,
            self.entries_per_s,
            self.coordinator_cpu_pct_of_machine,
            self.cores,
            self.cpu_pct_of_core_per_1000_obs_per_s,
            self.fresh_groups,
            self.sampled_groups,
            self.agent_reports_failed
        )
    }
}

/// Why the bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Setup(String),
}

/// Process ids of every `quorate server` on this machine.
fn server_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"quorate")) && args.iter().any(|a| *a == b"server")
        })
        .collect()
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): state is 3rd.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn clock_ticks_per_s() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A redis-server started for the bench, stopped on drop.
pub(super) struct OwnRedis {
    child: std::process::Child,
    _dir: std::path::PathBuf,
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn start_redis() -> Result<(OwnRedis, String), IngestError> {
    let redis = crate::local::find_redis_server().map_err(|e| IngestError::Setup(e.to_string()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| IngestError::Setup(e.to_string()))?
        .port();
    let dir = std::env::temp_dir().join(format!("quorate-bench-redis-{port}"));
    std::fs::create_dir_all(&dir).map_err(|e| IngestError::Setup(e.to_string()))?;
    let child = std::process::Command::new(redis)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| IngestError::Setup(format!("cannot start redis-server: {e}")))?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(IngestError::Setup("redis-server did not start".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((OwnRedis { child, _dir: dir }, format!("redis://127.0.0.1:{port}")))
}

/// Publishes every member's heartbeat each interval in one pipeline.
async fn publish_all(
    url: String,
    keys: Vec<String>,
    incarnation: u64,
    interval: Duration,
    ttl_ms: u64,
    until: Instant,
) -> Result<(), IngestError> {
    let client = redis::Client::open(url.as_str()).map_err(|e| IngestError::Setup(e.to_string()))?;
    let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| IngestError::Setup(e.to_string()))?;
    let mut seq = 0;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < until {
        tick.tick().await;
        seq += 1;
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let value = Beat { incarnation, seq, unix_ms }.encode();
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.cmd("SET").arg(k).arg(&value).arg("PX").arg(ttl_ms).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(|e| IngestError::Setup(format!("publishing: {e}")))?;
    }
    Ok(())
}

/// Runs the ingestion benchmark against the cluster `client` points at.
pub async fn run(client: &Client, opts: &IngestOptions) -> Result<IngestReport, IngestError> {
    let k = opts.group_size.max(1);
    let groups = opts.members.div_ceil(k);
    let (_own, url) = match &opts.heartbeat_url {
        Some(u) => (None, u.clone()),
        None => {
            let (r, u) = start_redis()?;
            (Some(r), u)
        }
    };
    let policy = Policy::default();
    let specs = create_groups(client, groups, k, &url, policy).await?;
    let keys: Vec<String> =
        specs.iter().flat_map(|s| s.members.iter().map(|m| heartbeat_key(&s.name, &m.id))).collect();
    // Keep members beating a little past the window, so the freshness check
    // at its end sees a live system.
    let total = opts.warmup + opts.duration + Duration::from_secs(3);
    let until = Instant::now() + total;
    // One incarnation for every simulated member: agents report what they
    // would read.
    let incarnation: u64 = rand::random();
    let publisher = tokio::spawn(publish_all(
        url.clone(),
        keys,
        incarnation,
        Duration::from_millis(policy.heartbeat_interval_ms),
        policy.heartbeat_ttl_ms(),
        until,
    ));
    let agents = Agents::new(client, &specs, policy, incarnation, until)?;
    let failed = agents.failed.clone();
    let agents = tokio::spawn(agents.run());

    tokio::time::sleep(opts.warmup).await;
    let window = Window::measure(client, opts.duration, &failed).await?;
    let sample: Vec<&GroupSpec> = specs.iter().step_by((groups / 20).max(1)).collect();
    let fresh_groups = count_fresh(client, &sample).await?;
    let _ = agents.await;
    publisher.await.map_err(|e| IngestError::Setup(e.to_string()))??;

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu_s = window.cpu_ticks as f64 / clock_ticks_per_s();
    let cpu_pct_machine = 100.0 * cpu_s / window.secs / cores as f64;
    let entries_per_s = window.applied as f64 / window.secs;
    // Agents: one view of K-1 peers per member per interval; coordinators:
    // one view of every member per interval each.
    let per_interval = (opts.members * (k - 1) + window.coordinators * opts.members) as f64;
    let observations_per_s = per_interval / (policy.report_interval_ms as f64 / 1000.0);
    let cpu_pct_core = 100.0 * cpu_s / window.secs;
    Ok(IngestReport {
        members: opts.members,
        groups,
        coordinators: window.coordinators,
        heartbeat_interval_ms: policy.heartbeat_interval_ms,
        report_interval_ms: policy.report_interval_ms,
        window_s: window.secs,
        entries_per_s,
        observations_per_s,
        coordinator_cpu_pct_of_machine: cpu_pct_machine,
        cpu_pct_of_core_per_1000_obs_per_s: cpu_pct_core / (observations_per_s / 1000.0),
        agent_reports_failed: window.failed_reports,
        fresh_groups,
        sampled_groups: sample.len(),
        cores,
    })
}

/// Creates groups `ingest-0..groups` of `k` members each, every member
/// beating into `url`.
async fn create_groups(
    client: &Client,
    groups: usize,
    k: usize,
    url: &str,
    policy: Policy,
) -> Result<Vec<GroupSpec>, IngestError> {
    let specs: Vec<GroupSpec> = (0..groups)
        .map(|g| GroupSpec {
            name: format!("ingest-{g}"),
            members: (0..k)
                .map(|i| MemberSpec {
                    id: format!("m{g}-{i}"),
                    heartbeat: url.to_owned(),
                    priority: 1,
                    data: None,
                    announce: None,
                })
                .collect(),
            policy,
            failover: None,
        })
        .collect();
    for s in &specs {
        client.apply_group(spec_pb(s)).await?;
    }
    Ok(specs)
}

/// Simulated agents: each member reports its view of its peers once per
/// report interval, spread over the interval, through a few connections.
struct Agents {
    conns: Vec<Arc<Client>>,
    /// (group, member, the member's peers) for every member.
    members: Vec<(String, String, Vec<String>)>,
    report_interval: Duration,
    incarnation: u64,
    until: Instant,
    in_flight: Arc<Semaphore>,
    /// Reports that failed.
    failed: Arc<AtomicU64>,
    /// Per member (in the order of `members`), the token of its view the
    /// leader stored; 0 until one got through, and after a missed refresh.
    tokens: Arc<Vec<AtomicU64>>,
}

impl Agents {
    fn new(
        client: &Client,
        specs: &[GroupSpec],
        policy: Policy,
        incarnation: u64,
        until: Instant,
    ) -> Result<Self, IngestError> {
        let conns: Vec<Arc<Client>> = (0..8).map(|_| client.another().map(Arc::new)).collect::<Result<_, _>>()?;
        let members: Vec<(String, String, Vec<String>)> = specs
            .iter()
            .flat_map(|s| {
                s.members.iter().map(|m| {
                    let peers = s.members.iter().filter(|p| p.id != m.id).map(|p| p.id.clone()).collect();
                    (s.name.clone(), m.id.clone(), peers)
                })
            })
            .collect();
        let tokens: Arc<Vec<AtomicU64>> = Arc::new((0..members.len()).map(|_| AtomicU64::new(0)).collect());
        Ok(Self {
            conns,
            tokens,
            members,
            report_interval: Duration::from_millis(policy.report_interval_ms),
            incarnation,
            until,
            in_flight: Arc::new(Semaphore::new(128)),
            failed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Sends reports until `until`, at most 128 in flight.
    async fn run(self) {
        let members = &self.members;
        let per_member = self.report_interval / members.len().max(1) as u32;
        let mut tick = tokio::time::interval(per_member.max(Duration::from_micros(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut i = 0usize;
        while Instant::now() < self.until {
            tick.tick().await;
            let at = i % members.len();
            let (group, member, peers) = &members[at];
            i += 1;
            let token = self.tokens[at].load(Ordering::Relaxed);
            let (req, sent) = if token == 0 {
                // Tokens need only differ between this member's views.
                (self.report(group, member, peers, i as u64), i as u64)
            } else {
                (self.refresh(group, member, token), token)
            };
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else { break };
            let c = self.conns[i % self.conns.len()].clone();
            let failed = self.failed.clone();
            let tokens = self.tokens.clone();
            tokio::spawn(async move {
                let full = req.refresh.is_empty();
                match c.report_view(req).await {
                    Ok(resp) => {
                        let stored = full || resp.refreshed == 1;
                        tokens[at].store(if stored { sent } else { 0 }, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(permit);
            });
        }
    }

    /// `member`'s report: every peer up, heartbeat advancing at `seq`.
    fn report(&self, group: &str, member: &str, peers: &[String], seq: u64) -> pb::ReportRequest {
        let cells = peers
            .iter()
            .map(|p| {
                observation_pb(
                    p,
                    &Observation {
                        state: ObsState::Up,
                        reason: Reason::Advancing,
                        state_age_ms: 1_000,
                        incarnation: Some(self.incarnation),
                        seq: Some(seq),
                        restarts: 0,
                    },
                )
            })
            .collect();
        pb::ReportRequest {
            observer: member.to_owned(),
            observer_incarnation: self.incarnation,
            views: vec![pb::GroupView { group: group.to_owned(), cells, version: seq }],
            status: None,
            refresh: Vec::new(),
        }
    }

    /// `member`'s refresh of the view it sent under `token`.
    fn refresh(&self, group: &str, member: &str, token: u64) -> pb::ReportRequest {
        pb::ReportRequest {
            observer: member.to_owned(),
            observer_incarnation: self.incarnation,
            views: Vec::new(),
            status: None,
            refresh: vec![pb::ViewRefresh { group: group.to_owned(), version: token }],
        }
    }
}

/// What the coordinators did over the measured window.
struct Window {
    /// `quorate server` processes on this machine.
    coordinators: usize,
    /// Their CPU time together, in clock ticks.
    cpu_ticks: u64,
    /// Raft entries applied.
    applied: u64,
    failed_reports: u64,
    secs: f64,
}

impl Window {
    /// Measures over `duration` from now.
    async fn measure(client: &Client, duration: Duration, failed: &AtomicU64) -> Result<Self, IngestError> {
        let pids = server_pids();
        let cpu0: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
        let applied0 = applied_index(client).await?;
        let failed0 = failed.load(Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(duration).await;
        let secs = t0.elapsed().as_secs_f64();
        let cpu1: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
        let applied1 = applied_index(client).await?;
        Ok(Self {
            coordinators: pids.len(),
            cpu_ticks: cpu1 - cpu0,
            applied: applied1 - applied0,
            failed_reports: failed.load(Ordering::Relaxed) - failed0,
            secs,
        })
    }
}

/// Freshness: how many of `sample` have every member with a fresh report
/// from every configured observer.
async fn count_fresh(client: &Client, sample: &[&GroupSpec]) -> Result<usize, IngestError> {
    let mut fresh_groups = 0;
    for s in sample {
        let m = client.get_matrix(&s.name, pb::Consistency::Stale).await?;
        if m.verdicts.iter().all(|v| v.silent == 0 && v.state == pb::VerdictState::VerdictUp as i32) {
            fresh_groups += 1;
        }
    }
    Ok(fresh_groups)
}

pub(super) async fn applied_index(client: &Client) -> Result<u64, ClientError> {
    // The highest applied index any node reports.
    let mut best = BTreeMap::new();
    for e in client.endpoints() {
        if let Ok(mut raw) = client.raw(e)
            && let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), raw.status(pb::StatusRequest {})).await
        {
            best.insert(e.clone(), s.into_inner().last_applied);
        }
    }
    best.values().max().copied().ok_or(ClientError::Unavailable { attempts: 1, last: "no node answered Status".into() })
}

//! `quorate demo`: a live local cluster doing real failovers.
//!
//! Starts three coordinators and a managed Redis primary/replica pair (data
//! Redis, heartbeat store and agent per member, as `local up --redis-pair`),
//! runs a writer (a fenced `SET` carrying the fencing epoch, then `WAIT 1`),
//! and plays scenarios, printing each step on a millisecond timeline with the
//! matrix:
//!
//! 1. kill -9 of the primary (data Redis, heartbeat store, agent): failover;
//! 2. the old primary comes back: it rejoins as a replica, no failover back;
//! 3. a planned switchover back to it;
//! 4. a pause of the primary's agent shorter than `down_after_ms`: no failover.
//!
//! Before and after the failover it asks a node's Sentinel-compatible
//! endpoint what an unmodified Redis client would (`SENTINEL
//! get-master-addr-by-name demo`) and prints the answer as a discovery line.
//!
//! It ends with a summary: failover and switchover times, epochs, writes
//! acknowledged by a replica (`WAIT 1` >= 1) and how many of them are missing
//! from the final primary (must be 0).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use tokio::time::Instant;

use super::{ClusterFile, LocalError, UpOptions};
use crate::client::Client;
use crate::pb::v1 as pb;
use crate::wire::keys::lease_key;

/// The fenced write, shipped in deploy/redis/fenced_set.lua.
pub const FENCED_SET_LUA: &str = include_str!("../../../../deploy/redis/fenced_set.lua");

const GROUP: &str = "demo";

/// Options of `quorate demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: PathBuf,
    pub base_port: u16,
    pub keep_running: bool,
    /// Print the step-by-step story (off for `--json`).
    pub narrate: bool,
    /// Plain text instead of mutual TLS (`--insecure`).
    pub insecure: bool,
}

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The summary `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// Whether every coordinator and agent connection was mutual TLS.
    pub tls: bool,
    /// kill -9 of the primary to the first write accepted by the new one.
    pub failover_ms: Option<u64>,
    /// The switchover call, request to the target holding the lease.
    pub switchover_ms: Option<u64>,
    /// Writes acknowledged by a replica (`WAIT 1` >= 1).
    pub acked_writes: u64,
    /// Of those, how many are missing from the final primary.
    pub acked_writes_lost: u64,
    /// Every epoch the writer wrote under, in order.
    pub epochs: Vec<u64>,
    /// What the Sentinel-compatible endpoint answered before and after the
    /// failover.
    pub discovery: Vec<Discovery>,
    pub scenarios: Vec<ScenarioResult>,
}

/// One answer of `SENTINEL get-master-addr-by-name` from a node's
/// Sentinel-compatible endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Discovery {
    /// `before failover` or `after failover`.
    pub when: String,
    /// The endpoint that answered.
    pub sentinel: String,
    /// The primary's address it named (`HOST:PORT`), if it named one.
    pub master: Option<String>,
    /// The member whose data Redis has that address.
    pub member: Option<String>,
}

/// Why the demo failed to run (scenarios that do not go as expected are
/// results, not errors).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("{0}")]
    Step(String),
}

#[derive(Debug, Clone)]
enum WriteOutcome {
    /// Accepted by the primary and acknowledged by `n` replicas.
    Accepted {
        member: String,
        epoch: u64,
        replicas: i64,
    },
    Failed(String),
}

#[derive(Debug, Clone)]
struct WriteRecord {
    seq: u64,
    at: Instant,
    outcome: WriteOutcome,
}

/// The writer: finds the primary through quorate, writes with its epoch.
struct Writer {
    client: Client,
    data: BTreeMap<String, String>,
    conns: BTreeMap<String, MultiplexedConnection>,
    primary: Option<(String, u64)>,
    log: Arc<Mutex<Vec<WriteRecord>>>,
}

impl Writer {
    async fn conn(&mut self, member: &str) -> Result<MultiplexedConnection, String> {
        if let Some(c) = self.conns.get(member) {
            return Ok(c.clone());
        }
        let addr = self.data.get(member).ok_or_else(|| format!("no data address for {member}"))?;
        let client = redis::Client::open(format!("redis://{addr}")).map_err(|e| e.to_string())?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(200)))
            .set_response_timeout(Some(Duration::from_millis(500)));
        let c = client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())?;
        self.conns.insert(member.to_owned(), c.clone());
        Ok(c)
    }

    async fn write_one(&mut self, seq: u64) -> WriteOutcome {
        if self.primary.is_none() {
            match self.client.get_lease(GROUP, pb::Consistency::Linearizable).await {
                Ok(r) => {
                    let l = r.lease.unwrap_or_default();
                    if l.holder.is_empty() {
                        return WriteOutcome::Failed("no primary holds the lease".into());
                    }
                    self.primary = Some((l.holder, l.epoch));
                }
                Err(e) => return WriteOutcome::Failed(format!("cannot ask quorate: {e}")),
            }
        }
        let (member, epoch) = self.primary.clone().expect("set above");
        let mut conn = match self.conn(&member).await {
            Ok(c) => c,
            Err(e) => {
                self.primary = None;
                return WriteOutcome::Failed(e);
            }
        };
        let mut eval = redis::cmd("EVAL");
        eval.arg(FENCED_SET_LUA).arg(2).arg(format!("demo:w:{seq}")).arg(lease_key(GROUP)).arg(seq).arg(epoch);
        let res: Result<(), _> = eval.query_async(&mut conn).await;
        if let Err(e) = res {
            // Stale routing, a lost lease, a dead node: ask again.
            self.primary = None;
            self.conns.remove(&member);
            return WriteOutcome::Failed(e.to_string());
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(200);
        let replicas: i64 = wait.query_async(&mut conn).await.unwrap_or(0);
        WriteOutcome::Accepted { member, epoch, replicas }
    }

    async fn run(mut self, stop: tokio::sync::watch::Receiver<bool>) {
        let mut seq = 0;
        while !*stop.borrow() {
            seq += 1;
            let outcome = self.write_one(seq).await;
            let failed = matches!(outcome, WriteOutcome::Failed(_));
            self.log.lock().unwrap_or_else(|p| p.into_inner()).push(WriteRecord { seq, at: Instant::now(), outcome });
            tokio::time::sleep(Duration::from_millis(if failed { 20 } else { 5 })).await;
        }
    }
}

/// Prints the story when narrating.
struct Story {
    on: bool,
    start: Instant,
}

impl Story {
    fn step(&self, text: &str) {
        if self.on {
            println!("\n\x1b[1m== {text}\x1b[0m");
        }
    }
    fn at(&self, text: &str) {
        if self.on {
            println!("[{:>+7} ms] {text}", self.start.elapsed().as_millis());
        }
    }
    fn show(&self, text: &str) {
        if self.on {
            println!("{text}");
        }
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

async fn election(client: &Client) -> Option<pb::ElectionStatus> {
    client.get_election(GROUP, pb::Consistency::Linearizable).await.ok()
}

async fn holder(client: &Client) -> Option<(String, u64)> {
    let l = client.get_lease(GROUP, pb::Consistency::Linearizable).await.ok()?.lease?;
    (!l.holder.is_empty()).then_some((l.holder, l.epoch))
}

async fn matrix_text(client: &Client) -> String {
    match client.get_matrix(GROUP, pb::Consistency::Linearizable).await {
        Ok(m) => crate::render::render_matrix(&m, std::io::IsTerminal::is_terminal(&std::io::stdout())),
        Err(e) => format!("(matrix unavailable: {e})"),
    }
}

/// How long one discovery question may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the nodes' Sentinel-compatible endpoints, in order, what a Redis
/// Sentinel client asks first (`SENTINEL get-master-addr-by-name`); the
/// first endpoint that answers wins. `None` when none is configured or none
/// answers.
async fn discover(file: &ClusterFile, when: &str) -> Option<Discovery> {
    for addr in file.nodes.iter().filter_map(|n| n.sentinel_addr.as_deref()) {
        let ask = async {
            let c = redis::Client::open(format!("redis://{addr}")).ok()?;
            let mut conn = c.get_multiplexed_async_connection().await.ok()?;
            let mut cmd = redis::cmd("SENTINEL");
            cmd.arg("get-master-addr-by-name").arg(GROUP);
            cmd.query_async::<Option<(String, String)>>(&mut conn).await.ok()
        };
        let Ok(Some(answer)) = tokio::time::timeout(DISCOVERY_TIMEOUT, ask).await else { continue };
        let master = answer.map(|(host, port)| format!("{host}:{port}"));
        let member = master
            .as_ref()
            .and_then(|m| file.members.iter().find(|e| e.data_redis_addr.as_ref() == Some(m)).map(|e| e.id.clone()));
        return Some(Discovery { when: when.into(), sentinel: addr.into(), master, member });
    }
    None
}

impl Story {
    /// The discovery line: what an unmodified Redis client is told.
    fn discovery(&self, d: Option<&Discovery>) {
        match d {
            Some(d) => self.at(&format!(
                "discovery: SENTINEL get-master-addr-by-name {GROUP} at {} -> {} ({})",
                d.sentinel,
                d.master.as_deref().unwrap_or("nil"),
                d.member.as_deref().unwrap_or("no member")
            )),
            None => self.at("discovery: no Sentinel-compatible endpoint answered"),
        }
    }
}

/// Waits until `pred` holds on the election, polling; bounded.
async fn wait_for<F: Fn(&pb::ElectionStatus) -> bool>(client: &Client, within: Duration, pred: F) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(e) = election(client).await
            && pred(&e)
        {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn member_synced(e: &pb::ElectionStatus, member: &str, epoch: u64) -> bool {
    e.members.iter().any(|m| {
        m.member == member
            && m.status.as_ref().is_some_and(|s| s.role == "replica" && s.link_up && s.synced_epoch == Some(epoch))
    })
}

/// Runs the demo.
pub async fn run(opts: &DemoOptions) -> Result<DemoSummary, DemoError> {
    let story = Story { on: opts.narrate, start: Instant::now() };
    story.step(&format!(
        "starting 3 coordinators and a managed Redis pair {GROUP}-1 (primary) / {GROUP}-2 (replica) in {}",
        opts.dir.display()
    ));
    if opts.dir.join("cluster.json").exists() {
        // A fresh start: the demo's scenarios assume a new group.
        super::down(&opts.dir).await.ok();
        std::fs::remove_dir_all(&opts.dir).ok();
    }
    let up = UpOptions {
        nodes: 3,
        dir: opts.dir.clone(),
        base_port: opts.base_port,
        group: Some((GROUP.into(), 2)),
        data: true,
        insecure: opts.insecure,
        restore: None,
    };
    let mut file: ClusterFile = super::up(&up).await?;
    let result = scenarios(&story, &up, &mut file).await;
    if !opts.keep_running {
        super::down(&opts.dir).await.ok();
    } else if opts.narrate {
        println!("\nthe cluster keeps running:\n{}", file.usage());
        println!("  quorate matrix {GROUP}\n  quorate failover status {GROUP}\n  quorate history {GROUP}");
        println!("  quorate local down --dir {}", opts.dir.display());
    }
    result
}

/// Plays the scenarios in order on the cluster `local up` started, with the
/// writer running throughout.
async fn scenarios(story: &Story, up: &UpOptions, file: &mut ClusterFile) -> Result<DemoSummary, DemoError> {
    let client = file.admin_client()?;
    let first = format!("{GROUP}-1");
    let second = format!("{GROUP}-2");
    let ready = wait_for(&client, Duration::from_secs(30), |e| {
        e.lease.as_ref().is_some_and(|l| l.holder == first) && member_synced(e, &second, 1)
    })
    .await;
    if ready.is_none() {
        return Err(DemoError::Step(format!(
            "{first} never became primary with {second} in sync; see the logs in {}",
            up.dir.display()
        )));
    }
    story.at(&format!("{first} is primary at epoch 1, {second} replicates from it"));
    story.show(&matrix_text(&client).await);
    let mut discovery = Vec::new();
    let before = discover(file, "before failover").await;
    story.discovery(before.as_ref());
    discovery.extend(before);

    let data: BTreeMap<String, String> =
        file.members.iter().filter_map(|m| Some((m.id.clone(), m.data_redis_addr.clone()?))).collect();
    let writer = RunningWriter::start(story, file, data.clone()).await?;
    let stage = Stage { story, client, first, second, log: writer.log.clone() };
    let mut results = Vec::new();
    let (failover, failover_ms) = stage.failover(file).await?;
    results.push(failover);
    // The endpoint follows the committed primary; give it the moment a
    // client's retry would take.
    let after = stage.discovered(file, &stage.second).await;
    story.discovery(after.as_ref());
    results.push(ScenarioResult {
        name: "Sentinel-compatible discovery names the new primary".into(),
        ok: after.as_ref().is_some_and(|d| d.member.as_ref() == Some(&stage.second))
            && discovery.first().is_some_and(|d| d.member.as_ref() == Some(&stage.first)),
        detail: format!(
            "before: {:?}, after: {:?}",
            discovery.first().and_then(|d| d.member.clone()),
            after.as_ref().and_then(|d| d.member.clone())
        ),
    });
    discovery.extend(after);
    results.push(stage.rejoin(up, file).await?);
    let (switchover, switchover_ms) = stage.switchover_back().await;
    results.push(switchover);
    results.push(stage.short_pause(file).await);

    // Stop writing; check every acknowledged write on the final primary.
    let records = writer.stop().await;
    let acked: Vec<u64> = records
        .iter()
        .filter_map(|r| match r.outcome {
            WriteOutcome::Accepted { replicas, .. } if replicas >= 1 => Some(r.seq),
            _ => None,
        })
        .collect();
    let lost = count_missing(&data, &stage.client, &acked).await?;
    story.step("summary");
    let summary = DemoSummary {
        tls: file.tls.is_some(),
        failover_ms,
        switchover_ms,
        acked_writes: acked.len() as u64,
        acked_writes_lost: lost,
        epochs: epochs_written(&records),
        discovery,
        scenarios: results,
    };
    if story.on {
        print_summary(&summary);
    }
    Ok(summary)
}

/// The writer running in the background, and its log.
struct RunningWriter {
    log: Arc<Mutex<Vec<WriteRecord>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningWriter {
    /// Starts the writer and lets it write for 2 s, so that the scenarios
    /// begin with writes acknowledged.
    async fn start(story: &Story, file: &ClusterFile, data: BTreeMap<String, String>) -> Result<Self, DemoError> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let writer =
            Writer { client: file.admin_client()?, data, conns: BTreeMap::new(), primary: None, log: log.clone() };
        let task = tokio::spawn(writer.run(stop_rx));
        story.step("a writer starts: fenced SET with the lease epoch (deploy/redis/fenced_set.lua), then WAIT 1");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let acked_now = log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| matches!(r.outcome, WriteOutcome::Accepted { replicas, .. } if replicas >= 1))
            .count();
        story.at(&format!("{acked_now} writes acknowledged so far"));
        Ok(Self { log, stop, task })
    }

    /// Stops the writer; returns every write it made.
    async fn stop(self) -> Vec<WriteRecord> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What every scenario works with: the story, quorate, the two members
/// (`first` is primary at the start) and the writer's log.
struct Stage<'a> {
    story: &'a Story,
    client: Client,
    first: String,
    second: String,
    log: Arc<Mutex<Vec<WriteRecord>>>,
}

impl Stage<'_> {
    /// Scenario 1: kill -9 of the primary; returns the result and the time
    /// from the kill to the first write accepted by the new primary.
    async fn failover(&self, file: &ClusterFile) -> Result<(ScenarioResult, Option<u64>), DemoError> {
        let (story, client, first, second) = (self.story, &self.client, &self.first, &self.second);
        story.step(&format!("scenario 1: kill -9 of {first} (data Redis, heartbeat store and agent)"));
        let victim = file
            .members
            .iter()
            .find(|m| m.id == *first)
            .cloned()
            .ok_or_else(|| DemoError::Step("no first member".into()))?;
        let killed_at = Instant::now();
        for pid in
            [Some(victim.agent_pid), Some(victim.heartbeat_redis_pid), victim.data_redis_pid].into_iter().flatten()
        {
            signal(pid, Signal::SIGKILL);
        }
        story.at(&format!("killed {first}"));
        let promoted = wait_for(client, Duration::from_secs(15), |e| {
            e.lease.as_ref().is_some_and(|l| l.holder == *second && l.epoch >= 2)
        })
        .await;
        let failover_ms = self.first_write_on(second, killed_at).await.map(|t| (t - killed_at).as_millis() as u64);
        if let Some(p) = promoted {
            story.at(&format!("quorate's lease names {second} (epoch 2) {} ms after the kill", p.as_millis()));
        }
        if let Some(ms) = failover_ms {
            story.at(&format!("the writer's first write on {second} succeeded {ms} ms after the kill"));
        }
        let refused = self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|r| r.at > killed_at).find_map(
            |r| match &r.outcome {
                WriteOutcome::Failed(why) => Some(why.clone()),
                WriteOutcome::Accepted { .. } => None,
            },
        );
        if let Some(why) = refused {
            story.at(&format!("meanwhile the writer's attempts failed, e.g.: {why}"));
        }
        story.show(&matrix_text(client).await);
        let e = election(client).await;
        if let Some(h) = e.as_ref().and_then(|e| e.history.last()) {
            story.show(&format!("decision (revision {}): {}", h.revision, h.reason));
        }
        let result = ScenarioResult {
            name: "failover after kill -9 of the primary".into(),
            ok: promoted.is_some() && failover_ms.is_some_and(|ms| ms <= 2_500),
            detail: format!("new primary writable after {failover_ms:?} ms (bound 2500)"),
        };
        Ok((result, failover_ms))
    }

    /// Discovery once it names `member`, asking for up to 5 s (the
    /// endpoint answers from committed state, which the failover's
    /// scenario has already seen; this only absorbs a slow node).
    async fn discovered(&self, file: &ClusterFile, member: &str) -> Option<Discovery> {
        let start = Instant::now();
        loop {
            let d = discover(file, "after failover").await;
            if d.as_ref().is_some_and(|d| d.member.as_deref() == Some(member))
                || start.elapsed() > Duration::from_secs(5)
            {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// When the writer's first write accepted by `member` after `since`
    /// was made; waits up to 15 s for one.
    async fn first_write_on(&self, member: &str, since: Instant) -> Option<Instant> {
        let start = Instant::now();
        loop {
            let hit = self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().find_map(|r| match &r.outcome {
                WriteOutcome::Accepted { member: m, .. } if m == member && r.at > since => Some(r.at),
                _ => None,
            });
            if hit.is_some() || start.elapsed() > Duration::from_secs(15) {
                return hit;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Scenario 2: the old primary comes back (restarted by `local up`,
    /// which refreshes `file`); it must rejoin as a replica, with no
    /// failover back.
    async fn rejoin(&self, up: &UpOptions, file: &mut ClusterFile) -> Result<ScenarioResult, DemoError> {
        let (story, client, first, second) = (self.story, &self.client, &self.first, &self.second);
        story.step(&format!("scenario 2: {first} comes back (empty: no persistence)"));
        *file = super::up(up).await?;
        let rejoined = wait_for(client, Duration::from_secs(20), |e| member_synced(e, first, 2)).await;
        story.at(&format!(
            "{first} {}",
            if rejoined.is_some() {
                "rejoined as a replica of the new primary and resynced"
            } else {
                "did not rejoin in time"
            }
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let still = holder(client).await;
        story.show(&matrix_text(client).await);
        Ok(ScenarioResult {
            name: "the old primary rejoins as a replica".into(),
            ok: rejoined.is_some() && still.as_ref().is_some_and(|(h, ep)| h == second && *ep == 2),
            detail: format!("primary after its return: {still:?} (expected {second} at epoch 2)"),
        })
    }

    /// Scenario 3: a planned switchover back to the first member; returns
    /// the result and the switchover's duration.
    async fn switchover_back(&self) -> (ScenarioResult, Option<u64>) {
        let (story, first) = (self.story, &self.first);
        story
            .step(&format!("scenario 3: planned switchover back to {first} (quorate switchover {GROUP} --to {first})"));
        let sw = self.client.switchover(GROUP, Some(first), Duration::from_secs(30)).await;
        let switchover_ms = sw.as_ref().ok().map(|r| r.took_ms);
        match &sw {
            Ok(r) => story.at(&format!("{} holds the lease at epoch {} after {} ms", r.to, r.epoch, r.took_ms)),
            Err(e) => story.at(&format!("switchover failed: {e}")),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let result = ScenarioResult {
            name: "planned switchover back".into(),
            ok: sw.as_ref().is_ok_and(|r| r.to == *first && r.epoch == 3),
            detail: match &sw {
                Ok(r) => format!("{} at epoch {} in {} ms", r.to, r.epoch, r.took_ms),
                Err(e) => e.to_string(),
            },
        };
        (result, switchover_ms)
    }

    /// Scenario 4: the primary's agent paused for less than
    /// `down_after_ms`; nothing must move.
    async fn short_pause(&self, file: &ClusterFile) -> ScenarioResult {
        let (story, client, first) = (self.story, &self.client, &self.first);
        story.step(&format!("scenario 4: SIGSTOP {first}'s agent for 300 ms (< down_after_ms 500)"));
        let before = election(client).await.map(|e| e.history.len());
        let agent = file.members.iter().find(|m| m.id == *first).map(|m| m.agent_pid).unwrap_or(0);
        signal(agent, Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(300)).await;
        signal(agent, Signal::SIGCONT);
        story.at("resumed; watching for 3 s");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = election(client).await;
        let unchanged = after.as_ref().is_some_and(|e| {
            Some(e.history.len()) == before && e.lease.as_ref().is_some_and(|l| l.holder == *first && l.epoch == 3)
        });
        story.at(if unchanged { "no failover" } else { "the primary moved!" });
        ScenarioResult {
            name: "a short agent pause causes no failover".into(),
            ok: unchanged,
            detail: format!("primary after the pause: {:?}", after.and_then(|e| e.lease).map(|l| (l.holder, l.epoch))),
        }
    }
}

/// Every epoch the writer wrote under, in order.
fn epochs_written(records: &[WriteRecord]) -> Vec<u64> {
    let mut epochs: Vec<u64> = Vec::new();
    for r in records {
        if let WriteOutcome::Accepted { epoch, .. } = r.outcome
            && epochs.last() != Some(&epoch)
        {
            epochs.push(epoch);
        }
    }
    epochs
}

fn print_summary(summary: &DemoSummary) {
    println!("failover: {} ms, switchover: {} ms", fmt_opt(summary.failover_ms), fmt_opt(summary.switchover_ms));
    println!("epochs written under: {:?}", summary.epochs);
    println!("acknowledged writes: {}, lost: {}", summary.acked_writes, summary.acked_writes_lost);
    for s in &summary.scenarios {
        println!("  [{}] {}: {}", if s.ok { "ok" } else { "FAILED" }, s.name, s.detail);
    }
}

fn fmt_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |x| x.to_string())
}

/// How many of the `acked` writes are missing from the current primary.
async fn count_missing(data: &BTreeMap<String, String>, client: &Client, acked: &[u64]) -> Result<u64, DemoError> {
    let (primary, _) = holder(client).await.ok_or_else(|| DemoError::Step("no primary at the end".into()))?;
    let addr = data.get(&primary).ok_or_else(|| DemoError::Step(format!("no data address for {primary}")))?;
    let c = redis::Client::open(format!("redis://{addr}")).map_err(|e| DemoError::Step(e.to_string()))?;
    let mut conn = c.get_multiplexed_async_connection().await.map_err(|e| DemoError::Step(e.to_string()))?;
    let mut missing = 0;
    for chunk in acked.chunks(500) {
        let keys: Vec<String> = chunk.iter().map(|s| format!("demo:w:{s}")).collect();
        let mut mget = redis::cmd("MGET");
        mget.arg(&keys);
        let values: Vec<Option<String>> =
            mget.query_async(&mut conn).await.map_err(|e| DemoError::Step(e.to_string()))?;
        missing += values.iter().zip(chunk).filter(|(v, s)| v.as_deref() != Some(&s.to_string())).count() as u64;
    }
    Ok(missing)
}

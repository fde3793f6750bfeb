//! Scenarios: a fault schedule, the checks that apply, and the runner.
//!
//! Each scenario gets a fresh system in fresh namespaces: warm-up, the
//! fault, healing, a settling period, then the final state (who is primary,
//! what every coordinator says, which acknowledged writes, fenced and plain,
//! are on the primary) is recorded and every checker runs over the merged
//! history; the deadline-fence check runs over the agents' logs. Besides
//! the verdicts, each report carries what was measured: failover times,
//! dual-primary windows, the longest write gap, lost plain writes and how
//! late each deadline fence was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use quorate::client::Client;
use quorate::pb::v1 as pb;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;

use crate::checkers::{self, CheckResult, DeadlineFence};
use crate::history::{self, Op, OpType, Recorder};
use crate::net::{Grudge, grudges};
use crate::system::{COORDINATORS, MEMBERS, PAIR, System, SystemOptions};

/// What a scenario must show besides safety.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    /// Only the safety checks.
    Safety,
    /// A crash: a new primary within the bound.
    Failover,
    /// A quorum still sees the primary: it must not move.
    NoFailover,
}

/// The fault.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    None,
    /// kill -9 of the primary host's processes; restarted after the window.
    KillPrimaryHost,
    /// kill -9 of the Raft leader; restarted after the window.
    KillRaftLeader,
    /// SIGSTOP of the primary's agent for the window.
    PausePrimaryAgent,
    /// SIGSTOP of one coordinator for `ms`.
    PauseObserver {
        ms: u64,
    },
    /// The primary's host cut off from the coordinators and the other
    /// member, both ways (the client host still reaches it).
    IsolatePrimary,
    /// The Raft leader's host (whoever leads when the fault starts) cut off
    /// from every other host, the client host included, both ways.
    IsolateRaftLeader,
    /// A coordinator that does not lead when the fault starts, cut off
    /// from every other host, both ways.
    IsolateFollowerCoordinator,
    /// Every coordinator drops packets from the primary's host (one way;
    /// the replica and the client host still reach it both ways).
    CoordinatorsDropPrimary,
    /// The primary's host drops packets from every coordinator (one way,
    /// the other direction).
    PrimaryDropsCoordinators,
    RandomHalves,
    MajoritiesRing,
    Bridge,
    /// The replica stops hearing the primary host (one way).
    OneWayReplicaBlind,
    /// Only the primary-replica link is cut, both ways.
    PrimaryReplicaLink,
    /// Random loss on every host, in percent.
    Loss {
        percent: u32,
    },
    /// A compromised member: for the window, the replica's certificate
    /// forges everything it can: its own reports saying the primary is
    /// down (with a replication offset of u64::MAX for itself), reports in
    /// the names of a coordinator and of the primary, a switchover to
    /// itself, maintenance, an acquire of the pair's lease and a release of
    /// the primary's. One member's certificate must not move the primary.
    ForgedReports,
    /// A follower coordinator killed and its data directory deleted; under
    /// `percent` loss on every host, restarted after a few seconds of
    /// writes, and watched until it is caught up.
    WipeFollowerUnderLoss {
        percent: u32,
    },
}

/// A negative control: a run the checkers must flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Control {
    SkipLeaseWait,
    DriftBeyondBound,
    /// Agents started with `--test-only-no-deadline-fence`: they do not
    /// fence at their lease deadline, so a primary cut off from the
    /// coordinators keeps accepting plain writes after the failover.
    NoDeadlineFence,
}

impl Control {
    /// The check that must flag this control; None: any check.
    pub fn flagged_by(self) -> Option<&'static str> {
        match self {
            Control::NoDeadlineFence => Some("no_dual_primary_plain"),
            Control::SkipLeaseWait | Control::DriftBeyondBound => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub fault: Fault,
    pub expect: Expect,
    /// Lease clients' clock skew (ppm slow).
    pub skew_ppm: u64,
    pub control: Option<Control>,
    /// The longest stretch without an accepted plain write the scenario
    /// allows (`write_availability`); None: measured, not checked.
    pub write_gap_bound_ms: Option<u64>,
}

/// Timing of one scenario.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub fault: Duration,
    pub settle: Duration,
}

impl Timing {
    pub fn quick() -> Self {
        Self { warmup: Duration::from_secs(5), fault: Duration::from_secs(15), settle: Duration::from_secs(10) }
    }
    pub fn full() -> Self {
        Self { warmup: Duration::from_secs(10), fault: Duration::from_secs(60), settle: Duration::from_secs(20) }
    }
}

fn s(name: &str, fault: Fault, expect: Expect) -> Scenario {
    Scenario { name: name.into(), fault, expect, skew_ppm: 0, control: None, write_gap_bound_ms: None }
}

/// A scenario whose writes must stay available within `bound_ms`.
fn available(sc: Scenario, bound_ms: u64) -> Scenario {
    Scenario { write_gap_bound_ms: Some(bound_ms), ..sc }
}

/// Write-gap bounds of the faults a quorum sees through (`NoFailover`).
/// Nothing there should stop the primary accepting writes, except:
pub mod gap_bounds {
    /// A fault the primary's lease never notices (one-way or primary-replica
    /// cut, an isolated follower coordinator): a few write intervals, plus
    /// one client timeout (300 ms) should a write be caught in flight.
    pub const UNDISTURBED_MS: u64 = 500;
    /// A Raft leader lost (isolated, or paused when it is the leader): an
    /// election (up to ~0.8 s with Pre-Vote) during which renewals fail; the
    /// primary's one-second lease may lapse (it fences) and be retaken from
    /// the new leader.
    pub const LEADER_LOST_MS: u64 = 1_500;
    /// Random loss on every link: the primary's one-second lease may lapse
    /// and be retaken. A lapse fences ~0.9 s after the last renewal; the
    /// grant may come no earlier than ~1.06 s after it, and then the acquire
    /// goes through Raft and the promotion and the writer's next write cross
    /// lossy links, where each lost segment costs a 200 ms retransmission (a
    /// lost SYN 1 s): about 2.5 s a lapse. At 20% loss two lapses can come
    /// back to back (measured: 1 to 5 lapses in 15 s, longest gap 2.2-3.3
    /// s), so the bound is two lapses: a write pause, never two primaries.
    pub const LOSSY_MS: u64 = 5_000;
    /// Random loss with one coordinator down, then catching up (the wiped
    /// follower): every commit rides the one remaining follower link, so
    /// after a lapse an Acquire can time out (1.25 s) twice before one
    /// completes, and the lapse costs up to ~4.5 s (measured: longest gap
    /// 2.9-5.8 s in six runs). The bound is three lapses.
    pub const DEGRADED_LOSSY_MS: u64 = 7_500;
}

/// The scenarios of a profile; `seed` picks the random parts.
pub fn profile(name: &str, seed: u64) -> anyhow::Result<Vec<Scenario>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let loss = rng.random_range(10..=20);
    use gap_bounds::*;
    let mut list = vec![
        s("kill-primary", Fault::KillPrimaryHost, Expect::Failover),
        s("kill-raft-leader", Fault::KillRaftLeader, Expect::Safety),
        // The documented limit: a frozen agent cannot fence, so its Redis
        // accepts plain writes after the failover (measured and reported).
        s("pause-primary-agent", Fault::PausePrimaryAgent, Expect::Failover),
        s("isolate-primary", Fault::IsolatePrimary, Expect::Failover),
        available(s("isolate-raft-leader", Fault::IsolateRaftLeader, Expect::NoFailover), LEADER_LOST_MS),
        available(
            s("isolate-follower-coordinator", Fault::IsolateFollowerCoordinator, Expect::NoFailover),
            UNDISTURBED_MS,
        ),
        s("coordinators-drop-primary", Fault::CoordinatorsDropPrimary, Expect::Failover),
        s("primary-drops-coordinators", Fault::PrimaryDropsCoordinators, Expect::Failover),
        s("random-halves", Fault::RandomHalves, Expect::Safety),
        s("majorities-ring", Fault::MajoritiesRing, Expect::Safety),
        s("bridge", Fault::Bridge, Expect::Safety),
        available(s("one-way-replica-blind", Fault::OneWayReplicaBlind, Expect::NoFailover), UNDISTURBED_MS),
        available(s("primary-replica-link-cut", Fault::PrimaryReplicaLink, Expect::NoFailover), UNDISTURBED_MS),
        available(s(&format!("packet-loss-{loss}"), Fault::Loss { percent: loss }, Expect::NoFailover), LOSSY_MS),
        available(
            s("wipe-follower-under-loss-20", Fault::WipeFollowerUnderLoss { percent: 20 }, Expect::Safety),
            DEGRADED_LOSSY_MS,
        ),
        s("forged-reports-one-member", Fault::ForgedReports, Expect::NoFailover),
        // c2 may be the Raft leader.
        available(s("pause-observer", Fault::PauseObserver { ms: 4_000 }, Expect::NoFailover), LEADER_LOST_MS),
        Scenario { skew_ppm: 5_000, ..s("clock-drift-within-bound", Fault::None, Expect::Safety) },
        Scenario {
            control: Some(Control::DriftBeyondBound),
            skew_ppm: 400_000,
            ..s("control-drift-beyond-bound", Fault::None, Expect::Safety)
        },
        Scenario { control: Some(Control::SkipLeaseWait), ..s("control-skip-lease-wait", Fault::None, Expect::Safety) },
        // The primary cut off both ways (its clients still reach it): the
        // deadline fence is then the only thing that stops it. With
        // CoordinatorsDropPrimary (one way) the old primary still hears the
        // ELECTION event pushed on its watch stream and follows the new one
        // within a few ms of its promotion, fence or no fence, so that
        // fault no longer shows the bug.
        Scenario {
            control: Some(Control::NoDeadlineFence),
            ..s("control-no-deadline-fence", Fault::IsolatePrimary, Expect::Failover)
        },
    ];
    match name {
        "quick" => {}
        "full" => {
            // Everything, plus heavier loss for the safety checks.
            list.push(s("packet-loss-30", Fault::Loss { percent: 30 }, Expect::Safety));
        }
        other => anyhow::bail!("unknown profile {other:?} (quick or full)"),
    }
    Ok(list)
}

/// What a scenario measured, whatever the verdicts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measured {
    pub failovers: usize,
    pub failover_ms: Vec<u64>,
    /// The longest moment two nodes both accepted plain writes (0 when
    /// never; None when there were no plain writes).
    pub dual_primary_ms: Option<f64>,
    /// Every such moment, merged, in order.
    pub dual_primary_windows_ms: Vec<f64>,
    /// The longest stretch without an accepted plain write, from the fault's
    /// start to the end of the workload.
    pub write_gap_ms: Option<f64>,
    pub write_gap_bound_ms: Option<u64>,
    pub plain_writes_acked: usize,
    /// Acknowledged plain writes missing on the final primary (None: no
    /// final read), and how many of them a documented limit explains.
    pub plain_writes_lost: Option<usize>,
    pub plain_writes_lost_explained: BTreeMap<String, usize>,
    /// How late after its lease deadline each deadline fence was applied
    /// (negative: before), from the agents' logs; fences a frozen agent
    /// delayed (the documented limit) are kept apart, as they measure the
    /// pause, not the fencer.
    pub fence_late_ms: Vec<f64>,
    pub fence_late_frozen_ms: Vec<f64>,
    pub deadline_fences: Vec<DeadlineFence>,
    /// How long a wiped coordinator took to catch up after its restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catch_up_ms: Option<u64>,
}

/// Milliseconds to one decimal, for reports.
fn round_ms(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

/// One scenario's results, as `summary.json` holds them.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub nemesis: Fault,
    pub expect: Expect,
    /// The seed of this scenario's random choices.
    pub seed: u64,
    pub checks: BTreeMap<String, String>,
    #[serde(flatten)]
    pub measured: Measured,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    /// For a control: whether a checker flagged it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flagged: Option<bool>,
    pub error: Option<String>,
}

impl ScenarioReport {
    /// A regular scenario passes when no check failed; a control "passes"
    /// when it was flagged.
    pub fn ok(&self) -> bool {
        match self.control {
            Some(_) => self.flagged == Some(true),
            None => self.error.is_none() && self.checks.values().all(|v| !v.starts_with("fail")),
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub net: std::sync::Arc<crate::net::Net>,
    pub out: PathBuf,
    pub quorate: PathBuf,
    pub me: PathBuf,
    pub seed: u64,
    pub timing: Timing,
}

/// The seed of the scenario at `index` in its profile: the same whether
/// the whole profile runs or only this scenario, so a failure reproduces
/// with `--scenario`.
pub fn scenario_seed(run_seed: u64, index: usize) -> u64 {
    run_seed.wrapping_add(index as u64 * 7919)
}

/// Runs one scenario end to end; `index` is its place in the profile.
pub async fn run_one(ctx: &RunContext, sc: &Scenario, index: usize) -> ScenarioReport {
    let dir = ctx.out.join(&sc.name);
    let mut report = ScenarioReport {
        name: sc.name.clone(),
        nemesis: sc.fault.clone(),
        expect: sc.expect,
        seed: scenario_seed(ctx.seed, index),
        checks: BTreeMap::new(),
        measured: Measured { write_gap_bound_ms: sc.write_gap_bound_ms, ..Measured::default() },
        control: sc.control,
        flagged: None,
        error: None,
    };
    let result = run_inner(ctx, sc, report.seed, &dir).await;
    let _ = std::fs::create_dir_all(&dir);
    match result {
        Ok((checks, measured)) => {
            report.measured = measured;
            if let Some(control) = sc.control {
                let flagged = match control.flagged_by() {
                    Some(check) => checks.get(check).is_some_and(CheckResult::is_fail),
                    None => checks.values().any(CheckResult::is_fail),
                };
                report.flagged = Some(flagged);
            }
            report.checks = checks.into_iter().map(|(k, v)| (k, v.label())).collect();
        }
        Err(e) => report.error = Some(format!("{e:#}")),
    }
    let _ = std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report).unwrap_or_default());
    report
}

/// One scenario, step by step: a fresh system, warm-up under the workload,
/// the fault, healing, settling, the final state, the checks.
async fn run_inner(
    ctx: &RunContext,
    sc: &Scenario,
    seed: u64,
    dir: &Path,
) -> anyhow::Result<(BTreeMap<String, CheckResult>, Measured)> {
    let mut live = Live::start(ctx, sc, seed, dir).await?;
    let t = ctx.timing;
    let mut worker = KillOnDrop(live.sys.spawn_worker(&ctx.me, &worker_args(&live.sys, sc, seed, dir, t))?);
    tokio::time::sleep(t.warmup).await;

    // The fault.
    let targets = Targets::now(&live.client).await;
    let (grudge, about) = live.grudge(&sc.fault, &targets).await;
    let fault_started = std::time::Instant::now();
    let healing = live.act(&sc.fault, &targets, t.fault).await?;
    if let Some(g) = &grudge {
        live.partition(g, &about)?;
    }
    tokio::time::sleep(t.fault.saturating_sub(fault_started.elapsed())).await;

    live.heal(&healing)?;
    tokio::time::sleep(t.settle).await;
    let _ = tokio::task::spawn_blocking(move || worker.0.wait()).await;

    let ops = live.final_history(dir).await?;
    let fences = deadline_fences(&live.sys);
    Ok(check(&ops, sc, &fences))
}

/// A scenario's running system, a client of it, the nemesis history and the
/// scenario's random choices. (Fields in this order so that they drop in
/// the order the scenario made them, newest first.)
struct Live {
    client: Client,
    nem: Recorder,
    sys: System,
    rng: rand::rngs::StdRng,
}

/// The hosts a fault can target, with the primary as it was when the fault
/// started.
#[derive(Debug)]
struct Targets {
    /// The coordinators and the members.
    all: Vec<String>,
    /// Every host, the client host included.
    everyone: Vec<String>,
    coordinators: Vec<String>,
    primary: String,
    replica: String,
}

impl Targets {
    async fn now(client: &Client) -> Self {
        let primary = current_primary(client).await.unwrap_or_else(|| "m1".into());
        let replica = MEMBERS.iter().find(|m| **m != primary).map(|s| (*s).to_owned()).unwrap_or_default();
        Self {
            all: COORDINATORS.iter().chain(MEMBERS.iter()).map(|s| (*s).to_owned()).collect(),
            everyone: System::host_names().iter().map(|s| (*s).to_owned()).collect(),
            coordinators: COORDINATORS.iter().map(|s| (*s).to_owned()).collect(),
            primary,
            replica,
        }
    }
}

/// What healing undoes besides the network: processes a fault killed (to
/// restart) and paused (to resume).
#[derive(Debug, Default)]
struct Healing {
    restart: Vec<String>,
    paused: Vec<String>,
}

/// The worker's command line: the workload runs for warm-up, fault and
/// settling, against this system, with the scenario's seed and skew.
fn worker_args(sys: &System, sc: &Scenario, seed: u64, dir: &Path, t: Timing) -> Vec<String> {
    let total = t.warmup + t.fault + t.settle;
    let data: Vec<String> = MEMBERS.iter().map(|m| format!("{m}={}", sys.data_addr(m))).collect();
    vec![
        "worker".into(),
        "--endpoints".into(),
        sys.endpoints(),
        "--out".into(),
        dir.join("worker.jsonl").display().to_string(),
        "--duration-ms".into(),
        total.as_millis().to_string(),
        "--seed".into(),
        seed.to_string(),
        "--skew-ppm".into(),
        sc.skew_ppm.to_string(),
        "--register".into(),
        sys.register_addr(),
        "--data".into(),
        data.join(","),
        "--tls-dir".into(),
        sys.pki.dir().display().to_string(),
    ]
}

impl Live {
    /// A fresh directory and a fresh system in it, with its Redis pair
    /// ready.
    async fn start(ctx: &RunContext, sc: &Scenario, seed: u64, dir: &Path) -> anyhow::Result<Self> {
        // A fresh directory: an earlier run's data must not leak in.
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir)?;
        let rng = rand::rngs::StdRng::seed_from_u64(seed);
        let opts = SystemOptions {
            skip_lease_wait: sc.control == Some(Control::SkipLeaseWait),
            no_deadline_fence: sc.control == Some(Control::NoDeadlineFence),
        };
        let sys = System::start(ctx.net.clone(), dir, &ctx.quorate, &opts).await.context("starting the system")?;
        let nem = Recorder::create(&dir.join("nemesis.jsonl"))?;
        let client = sys.client("admin")?;
        wait_pair_ready(&client).await?;
        Ok(Self { client, nem, sys, rng })
    }

    /// Records a nemesis event.
    fn info(&self, f: &str, v: serde_json::Value) {
        self.nem.op("nemesis", OpType::Info, f, v);
    }

    /// The partition `fault` makes, if it is one, and whom it targets (for
    /// the nemesis record).
    async fn grudge(&mut self, fault: &Fault, t: &Targets) -> (Option<Grudge>, serde_json::Value) {
        let mut about = json!({});
        let grudge = match fault {
            Fault::IsolatePrimary => Some(grudges::isolate(&t.all, &t.primary)),
            Fault::IsolateRaftLeader => {
                let leader = leader_now(&self.sys).await;
                about = json!({"isolated": leader, "role": "raft-leader"});
                Some(grudges::isolate(&t.everyone, &leader))
            }
            Fault::IsolateFollowerCoordinator => {
                let (leader, victim) = self.random_follower(&t.coordinators).await;
                about = json!({"isolated": victim, "role": "follower", "leader": leader});
                Some(grudges::isolate(&t.everyone, &victim))
            }
            // INPUT drops on c1..c3 of the primary's packets.
            Fault::CoordinatorsDropPrimary => {
                about = json!({"primary": t.primary});
                Some(grudges::drops_from(&t.coordinators, std::slice::from_ref(&t.primary)))
            }
            // INPUT drops on the primary of every coordinator's packets.
            Fault::PrimaryDropsCoordinators => {
                about = json!({"primary": t.primary});
                Some(grudges::drops_from(std::slice::from_ref(&t.primary), &t.coordinators))
            }
            Fault::RandomHalves => {
                let mut shuffled = t.all.clone();
                shuffled.shuffle(&mut self.rng);
                let (a, b) = shuffled.split_at(shuffled.len() / 2);
                Some(grudges::complete(&[a.to_vec(), b.to_vec()]))
            }
            Fault::MajoritiesRing => {
                let mut shuffled = t.all.clone();
                shuffled.shuffle(&mut self.rng);
                Some(grudges::majorities_ring(&shuffled))
            }
            Fault::Bridge => {
                let b = t.all.choose(&mut self.rng).cloned().unwrap_or_default();
                Some(grudges::bridge(&t.all, &b))
            }
            Fault::OneWayReplicaBlind => Some(grudges::one_way(&t.primary, &t.replica)),
            Fault::PrimaryReplicaLink => Some(grudges::complete(&[vec![t.primary.clone()], vec![t.replica.clone()]])),
            _ => None,
        };
        (grudge, about)
    }

    /// The Raft leader now, and a coordinator other than it, picked at
    /// random.
    async fn random_follower(&mut self, coordinators: &[String]) -> (String, String) {
        let leader = leader_now(&self.sys).await;
        let followers: Vec<&String> = coordinators.iter().filter(|c| **c != leader).collect();
        let victim = followers.choose(&mut self.rng).map(|c| (*c).clone()).unwrap_or_else(|| "c3".into());
        (leader, victim)
    }

    /// What `fault` does besides a partition, within `window`; returns what
    /// healing must undo.
    async fn act(&mut self, fault: &Fault, t: &Targets, window: Duration) -> anyhow::Result<Healing> {
        let mut healing = Healing::default();
        match fault {
            Fault::None => self.info("none", json!({})),
            Fault::KillPrimaryHost => healing.restart = self.kill_primary_cycles(&t.primary, window).await?,
            Fault::KillRaftLeader => {
                let leader = self.sys.leader().await.unwrap_or_else(|| "c1".into());
                self.sys.kill(&leader);
                healing.restart.push(leader.clone());
                self.info("kill", json!({"target": leader, "primary": false}));
            }
            Fault::PausePrimaryAgent => {
                let a = format!("{}-agent", t.primary);
                self.sys.pause(&a);
                healing.paused.push(a.clone());
                self.info("pause", json!({"target": a}));
            }
            Fault::PauseObserver { ms } => {
                self.sys.pause("c2");
                self.info("pause", json!({"target": "c2", "ms": ms}));
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                self.sys.resume("c2");
                self.info("resume", json!({"target": "c2"}));
            }
            Fault::Loss { percent } => {
                self.sys.net.loss(f64::from(*percent) / 100.0)?;
                self.info("loss", json!({"percent": percent}));
            }
            Fault::ForgedReports => {
                self.info("forge", json!({"as": t.replica, "primary": t.primary}));
                let tally = forge_as_member(&self.sys, &t.primary, &t.replica, window).await?;
                self.info("forged", tally);
            }
            Fault::WipeFollowerUnderLoss { percent } => {
                let (_, victim) = self.random_follower(&t.coordinators).await;
                let nem = &self.nem;
                let info = |f: &str, v: serde_json::Value| {
                    nem.op("nemesis", OpType::Info, f, v);
                };
                wipe_and_catch_up(&mut self.sys, &self.client, &victim, *percent, window, &info).await?;
            }
            _ => {}
        }
        Ok(healing)
    }

    /// Kills the primary's host in cycles, over `window`: kill the current
    /// primary's host, bring it back after a step (window / (2 × cycles),
    /// 3.75 s in both profiles), let it resync for a step, then kill
    /// whoever is primary next. Returns the last victim's processes: they
    /// come back at healing.
    async fn kill_primary_cycles(&mut self, primary: &str, window: Duration) -> anyhow::Result<Vec<String>> {
        let cycles = (window.as_secs() / 15).max(1) * 2;
        let step = window / (cycles as u32 * 2);
        let mut down = Vec::new();
        for cycle in 0..cycles {
            let victim = current_primary(&self.client).await.unwrap_or_else(|| primary.to_owned());
            let procs = self.sys.procs_of(&victim);
            for p in &procs {
                self.sys.kill(p);
            }
            self.info("kill", json!({"target": victim, "primary": true, "member": victim, "cycle": cycle}));
            tokio::time::sleep(step).await;
            if cycle + 1 < cycles {
                for p in &procs {
                    self.sys.start_proc(p)?;
                }
                self.info("restart", json!({"target": victim}));
                // Let it resync before the next victim is chosen.
                tokio::time::sleep(step).await;
            } else {
                down = procs;
            }
        }
        Ok(down)
    }

    /// Puts `g` in force and records it, with `about`.
    fn partition(&self, g: &Grudge, about: &serde_json::Value) -> anyhow::Result<()> {
        let shown: BTreeMap<&String, Vec<&String>> = g.iter().map(|(k, v)| (k, v.iter().collect())).collect();
        let mut value = json!({"grudge": shown});
        if let (Some(v), Some(a)) = (value.as_object_mut(), about.as_object()) {
            v.extend(a.clone());
        }
        // Stamped before the rules go in: the cut may begin with the first
        // rule, and the checkers treat it as in force from this moment.
        let op = Op::new("nemesis", OpType::Info, "partition", value);
        self.sys.net.partition(g)?;
        self.nem.record(&op);
        Ok(())
    }

    /// Heals the network, resumes what the fault paused and restarts what
    /// it killed.
    fn heal(&mut self, h: &Healing) -> anyhow::Result<()> {
        self.sys.net.heal()?;
        for p in &h.paused {
            self.sys.resume(p);
        }
        for p in &h.restart {
            self.sys.start_proc(p)?;
        }
        self.info("heal", json!({"restarted": h.restart, "resumed": h.paused}));
        Ok(())
    }

    /// Records the final state, stops the system, and writes the merged
    /// history (worker, nemesis, final) to `history.jsonl`; returns it.
    async fn final_history(&mut self, dir: &Path) -> anyhow::Result<Vec<Op>> {
        let fin = Recorder::create(&dir.join("final.jsonl"))?;
        let worker_ops = history::read(&[&dir.join("worker.jsonl")])?;
        final_state(&self.sys, &self.client, &fin, &worker_ops).await;
        fin.flush();
        self.nem.flush();
        self.sys.stop_all();

        let ops = history::read(&[&dir.join("worker.jsonl"), &dir.join("nemesis.jsonl"), &dir.join("final.jsonl")])?;
        let merged = ops.iter().map(|o| serde_json::to_string(o).unwrap_or_default()).collect::<Vec<_>>().join("\n");
        std::fs::write(dir.join("history.jsonl"), merged + "\n")?;
        Ok(ops)
    }
}

/// The forged calls of [`Fault::ForgedReports`], by kind: what the member's
/// certificate may do (its own reports) and what it must be refused.
pub const FORGED_OWN: &str = "own-report";
pub const FORGED_REFUSED: [&str; 6] =
    ["report-as-coordinator", "report-as-primary", "switchover", "maintenance", "acquire", "release-primary"];

/// The forger's pause between rounds of calls (a round of seven calls takes
/// some 20 ms more: about 20 rounds a second, far above a real agent's rate).
const FORGE_INTERVAL: Duration = Duration::from_millis(25);

/// Forges as `member` (with its certificate) for `window`, every
/// [`FORGE_INTERVAL`]; returns per kind of call how many were accepted and
/// refused, and the refusals' codes.
async fn forge_as_member(
    sys: &System,
    primary: &str,
    member: &str,
    window: Duration,
) -> anyhow::Result<serde_json::Value> {
    let me = sys.client(member)?.with_call_timeout(Duration::from_millis(500));
    let epoch = me.get_lease(PAIR, pb::Consistency::Linearizable).await.ok().and_then(|r| r.lease).map(|l| l.epoch);
    let down = |target: &str| pb::Observation {
        target: target.into(),
        state: pb::ObservationState::ObservedDown as i32,
        reason: "heartbeat key missing or expired".into(),
        reason_code: pb::ObservationReason::ReasonMissing as i32,
        state_age_ms: 60_000,
        ..Default::default()
    };
    let report = |observer: &str| pb::ReportRequest {
        observer: observer.into(),
        observer_incarnation: 0xF0F0,
        views: vec![pb::GroupView { group: PAIR.into(), cells: vec![down(primary)], version: 0 }],
        status: Some(pb::MemberStatus {
            role: "replica".into(),
            role_code: pb::MemberRole::Replica as i32,
            offset: u64::MAX,
            link_up: true,
            synced_epoch: epoch,
            healthy: true,
            ..Default::default()
        }),
        refresh: Vec::new(),
    };
    let mut tally: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut count =
        |kind: &'static str, outcome: String| *tally.entry(kind).or_default().entry(outcome).or_default() += 1;
    let outcome = |r: Result<bool, quorate::client::ClientError>| match r {
        Ok(true) => "accepted".to_owned(),
        Ok(false) => "refused:not-granted".to_owned(),
        Err(e) => format!("refused:{:?}", e.code()),
    };
    let until = std::time::Instant::now() + window;
    while std::time::Instant::now() < until {
        count(FORGED_OWN, outcome(me.report_view(report(member)).await.map(|_| true)));
        count("report-as-coordinator", outcome(me.report_view(report("coordinator-1")).await.map(|_| true)));
        count("report-as-primary", outcome(me.report_view(report(primary)).await.map(|_| true)));
        count("switchover", outcome(me.switchover(PAIR, Some(member), Duration::from_millis(100)).await.map(|_| true)));
        count("maintenance", outcome(me.set_maintenance(PAIR, true).await.map(|_| true)));
        count("acquire", outcome(me.acquire(PAIR, member, 1_000, None).await.map(|r| r.acquired)));
        let release = me.release(PAIR, primary, epoch.unwrap_or(1)).await.map(|_| true);
        count("release-primary", outcome(release));
        tokio::time::sleep(FORGE_INTERVAL).await;
    }
    Ok(serde_json::to_value(tally)?)
}

/// The forger got every impersonation and operator call refused, and its
/// own reports through (else the scenario tested a refusal of everything).
pub fn forged_calls_refused(ops: &[Op]) -> CheckResult {
    let Some(tally) = ops.iter().find(|o| o.f == "forged").map(|o| &o.value) else {
        return CheckResult::NotApplicable;
    };
    let n = |kind: &str, outcome: &str| tally[kind][outcome].as_u64().unwrap_or(0);
    for kind in FORGED_REFUSED {
        if n(kind, "accepted") > 0 {
            return CheckResult::Fail(format!("{} forged {kind} calls were accepted: {tally}", n(kind, "accepted")));
        }
    }
    if n(FORGED_OWN, "accepted") == 0 {
        return CheckResult::Fail(format!("none of the member's own reports went through: {tally}"));
    }
    CheckResult::Pass
}

/// The agents' own account of their deadline fences (their logs append
/// across restarts, so every incarnation is there).
fn deadline_fences(sys: &System) -> Vec<DeadlineFence> {
    let mut fences = Vec::new();
    for m in MEMBERS {
        if let Some(path) = sys.log_path(&format!("{m}-agent"))
            && let Ok(bytes) = std::fs::read(&path)
        {
            fences.extend(checkers::parse_deadline_fences(m, &String::from_utf8_lossy(&bytes)));
        }
    }
    fences
}

/// How long a wiped coordinator may take to catch up under loss.
pub const CATCH_UP_BOUND_MS: u64 = 20_000;

/// Kills `victim`, deletes its data directory, turns on loss, restarts it
/// after a few seconds of writes, and polls it (stale reads and status)
/// until it has caught up or the window ends; records what it saw.
async fn wipe_and_catch_up(
    sys: &mut System,
    client: &Client,
    victim: &str,
    percent: u32,
    window: Duration,
    info: &impl Fn(&str, serde_json::Value),
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    sys.kill(victim);
    let data = sys.dir.join(format!("{victim}-data"));
    std::fs::remove_dir_all(&data).with_context(|| format!("cannot wipe {}", data.display()))?;
    info("wipe", json!({"target": victim}));
    sys.net.loss(f64::from(percent) / 100.0)?;
    info("loss", json!({"percent": percent}));
    // Entries accumulate meanwhile (agents' reports, renewals).
    tokio::time::sleep(Duration::from_secs(3)).await;
    // What the cluster holds now: reads from the wiped node must not show
    // less.
    let epoch_then =
        client.get_lease(PAIR, pb::Consistency::Linearizable).await.ok().and_then(|r| r.lease).map(|l| l.epoch);
    let addr = format!("{}:{}", sys.net.host(victim).ip, crate::system::API_PORT);
    sys.start_proc(victim)?;
    let restarted = std::time::Instant::now();
    info("restart-wiped", json!({"target": victim, "epoch": epoch_then}));
    let one = sys.client_of(&addr, "reader")?.with_call_timeout(Duration::from_secs(1));
    let mut older_reads = 0u64;
    let mut served = 0u64;
    let deadline = window.saturating_sub(started.elapsed()).max(Duration::from_secs(5));
    while restarted.elapsed() < deadline {
        if let Ok(r) = one.get_lease(PAIR, pb::Consistency::Stale).await {
            served += 1;
            let epoch = r.lease.map_or(0, |l| l.epoch);
            if epoch_then.is_some_and(|then| epoch < then) {
                older_reads += 1;
            }
        }
        let caught_up = match one.raw(&addr) {
            Ok(mut raw) => tokio::time::timeout(Duration::from_secs(1), raw.status(pb::StatusRequest {}))
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|s| s.into_inner().caught_up),
            Err(_) => false,
        };
        if caught_up {
            let ms = restarted.elapsed().as_millis() as u64;
            info("caught-up", json!({"target": victim, "ms": ms, "older_reads": older_reads, "served": served}));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ms = restarted.elapsed().as_millis() as u64;
    info("not-caught-up", json!({"target": victim, "ms": ms, "older_reads": older_reads, "served": served}));
    Ok(())
}

/// The Raft leader now; asks for a few seconds if an election is under way.
async fn leader_now(sys: &System) -> String {
    for _ in 0..20 {
        if let Some(l) = sys.leader().await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    "c1".into()
}

/// A child process killed when dropped (an interrupted run leaves no worker).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every checker that applies, and what they measured.
pub fn check(ops: &[Op], sc: &Scenario, fences: &[DeadlineFence]) -> (BTreeMap<String, CheckResult>, Measured) {
    let mut c = BTreeMap::new();
    c.insert("no_overlapping_leases".into(), checkers::no_overlapping_leases(ops));
    c.insert("epochs_unique_and_increasing".into(), checkers::epochs_unique_and_increasing(ops));
    c.insert("fenced_register_accepts_only_newest".into(), checkers::fenced_register_accepts_only_newest(ops));
    c.insert("client_epochs_monotonic".into(), checkers::client_epochs_monotonic(ops));
    c.insert("no_acked_write_lost".into(), checkers::no_acked_write_lost(ops));
    c.insert("single_primary_after_heal".into(), checkers::single_primary_after_heal(ops));
    let (dual, windows) = checkers::no_dual_primary_plain(ops);
    c.insert("no_dual_primary_plain".into(), dual.clone());
    let (lost, loss) = checkers::no_acked_plain_write_lost(ops);
    c.insert("no_acked_plain_write_lost".into(), lost);
    let limit = checkers::FENCE_LATE_LIMIT_MS;
    c.insert("deadline_fence_on_time".into(), checkers::deadline_fence_on_time(ops, fences, limit));
    let (running, frozen) = checkers::fences_by_agent_state(ops, fences, limit);
    let late_ms = |fs: Vec<&DeadlineFence>| fs.iter().map(|f| round_ms(f.late_us as f64 / 1e3)).collect();
    let gap = checkers::longest_write_gap(ops);
    if let Some(bound) = sc.write_gap_bound_ms {
        c.insert("write_availability".into(), checkers::write_availability(ops, bound).0);
    }
    let (fo, times) = checkers::failover_times(ops, FAILOVER_BOUND_MS);
    let catch_up = checkers::wiped_node_catches_up(ops, CATCH_UP_BOUND_MS);
    let catch_up_ms = ops.iter().find(|o| o.f == "caught-up").and_then(|o| o.u64("ms"));
    if catch_up != CheckResult::NotApplicable {
        c.insert("wiped_node_catches_up".into(), catch_up);
    }
    let forged = forged_calls_refused(ops);
    if forged != CheckResult::NotApplicable {
        c.insert("forged_calls_refused".into(), forged);
    }
    let measured = Measured {
        failovers: times.len(),
        failover_ms: times,
        dual_primary_ms: (dual != CheckResult::NotApplicable)
            .then(|| round_ms(windows.iter().map(checkers::DualPrimaryWindow::ms).fold(0.0, f64::max))),
        dual_primary_windows_ms: windows.iter().map(|w| round_ms(w.ms())).collect(),
        write_gap_ms: gap.map(|g| round_ms(g.ms())),
        write_gap_bound_ms: sc.write_gap_bound_ms,
        plain_writes_acked: ops.iter().filter(|o| o.f == "plain-write" && o.kind == OpType::Ok).count(),
        plain_writes_lost: loss.as_ref().map(|l| l.lost),
        plain_writes_lost_explained: loss.map(|l| l.explained).unwrap_or_default(),
        fence_late_ms: late_ms(running),
        fence_late_frozen_ms: late_ms(frozen),
        deadline_fences: fences.to_vec(),
        catch_up_ms,
    };
    match sc.expect {
        Expect::Failover => {
            let fo = if fo == CheckResult::NotApplicable { failover_by_primary_change(ops) } else { fo };
            c.insert("failover_within_bound".into(), fo);
        }
        Expect::NoFailover => {
            c.insert("no_failover".into(), checkers::no_failover(ops));
        }
        Expect::Safety => {}
    }
    (c, measured)
}

/// A failover that was not a kill (pause, isolation): the primary moved.
fn failover_by_primary_change(ops: &[Op]) -> CheckResult {
    match checkers::no_failover(ops) {
        CheckResult::Fail(_) => CheckResult::Pass,
        CheckResult::Pass => CheckResult::Fail("the primary never moved".into()),
        other @ (CheckResult::Documented(_) | CheckResult::NotApplicable) => other,
    }
}

/// A new primary must accept writes within `down_after_ms + lease_ttl_ms +
/// 1 s` of a crash, plus the writer's own rediscovery (up to 0.5 s).
pub const FAILOVER_BOUND_MS: u64 = 3_000;

async fn current_primary(client: &Client) -> Option<String> {
    let l = client.get_lease(PAIR, pb::Consistency::Linearizable).await.ok()?.lease?;
    (!l.holder.is_empty()).then_some(l.holder)
}

async fn wait_pair_ready(client: &Client) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(40) {
        if let Ok(e) = client.get_election(PAIR, pb::Consistency::Linearizable).await {
            let primary = e.lease.as_ref().is_some_and(|l| l.holder == "m1");
            let synced = e
                .members
                .iter()
                .any(|m| m.member == "m2" && m.status.as_ref().is_some_and(|s| s.link_up && s.synced_epoch.is_some()));
            if primary && synced {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the Redis pair never got ready (see the logs next to this report)")
}

/// Records what every node says, which Redis are masters, and which
/// acknowledged writes (fenced and plain) the primary has. Waits (bounded)
/// for agreement.
async fn final_state(sys: &System, client: &Client, fin: &Recorder, worker_ops: &[Op]) {
    let start = std::time::Instant::now();
    let mut last = json!({});
    while start.elapsed() < Duration::from_secs(20) {
        let mut nodes = Vec::new();
        for (i, c) in COORDINATORS.iter().enumerate() {
            let addr = format!("{}:{}", sys.net.host(c).ip, crate::system::API_PORT);
            let Ok(one) = sys.client_of(&addr, "reader") else { continue };
            let one = one.with_call_timeout(Duration::from_secs(1));
            if let Ok(r) = one.get_lease(PAIR, pb::Consistency::Stale).await {
                let l = r.lease.unwrap_or_default();
                nodes.push(json!({"node": i + 1, "holder": l.holder, "epoch": l.epoch}));
            }
        }
        let mut masters = Vec::new();
        for m in MEMBERS {
            if role(&sys.data_addr(m)).await.as_deref() == Some("master") {
                masters.push(m);
            }
        }
        let (holder, epoch) = match client.get_lease(PAIR, pb::Consistency::Linearizable).await {
            Ok(r) => r.lease.map(|l| (l.holder, l.epoch)).unwrap_or_default(),
            Err(_) => (String::new(), 0),
        };
        last = json!({"holder": holder, "epoch": epoch, "nodes": nodes, "masters": masters});
        let agreed = masters == [holder.as_str()]
            && nodes.len() == COORDINATORS.len()
            && nodes.iter().all(|n| n["holder"] == holder.as_str() && n["epoch"] == epoch);
        if agreed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fin.op("harness", OpType::Ok, "final-state", last.clone());
    // Which acknowledged writes the final primary has: fenced writes
    // acknowledged by a replica (value = key), and plain writes its node
    // answered OK to (value = seq).
    let holder = last["holder"].as_str().unwrap_or_default().to_owned();
    let acked: BTreeMap<String, String> = worker_ops
        .iter()
        .filter(|o| o.f == "pair-write" && o.kind == OpType::Ok && o.value["acked"] == true)
        .filter_map(|o| o.str("key").map(|k| (k.to_owned(), k.to_owned())))
        .collect();
    let plain: BTreeMap<String, String> = worker_ops
        .iter()
        .filter(|o| o.f == "plain-write" && o.kind == OpType::Ok)
        .filter_map(|o| Some((o.str("key")?.to_owned(), o.u64("seq")?.to_string())))
        .collect();
    let (mut present, mut present_plain) = (Vec::new(), Vec::new());
    if MEMBERS.contains(&holder.as_str())
        && let Ok(c) = redis::Client::open(format!("redis://{}", sys.data_addr(&holder)))
        && let Ok(mut conn) = c.get_multiplexed_async_connection().await
    {
        present = present_keys(&mut conn, &acked).await;
        present_plain = present_keys(&mut conn, &plain).await;
    }
    fin.op("harness", OpType::Ok, "final-read", json!({"member": holder, "present": present}));
    fin.op("harness", OpType::Ok, "final-read-plain", json!({"member": holder, "present": present_plain}));
}

/// The keys of `expected` (key -> value) that hold their value, read with
/// MGET in chunks.
async fn present_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    expected: &BTreeMap<String, String>,
) -> Vec<String> {
    let keys: Vec<(&String, &String)> = expected.iter().collect();
    let mut present = Vec::new();
    for chunk in keys.chunks(500) {
        let mut mget = redis::cmd("MGET");
        for (k, _) in chunk {
            mget.arg(k.as_str());
        }
        if let Ok(values) = mget.query_async::<Vec<Option<String>>>(conn).await {
            present.extend(
                chunk
                    .iter()
                    .zip(values)
                    .filter(|((_, want), got)| got.as_deref() == Some(want.as_str()))
                    .map(|((k, _), _)| (*k).clone()),
            );
        }
    }
    present
}

async fn role(addr: &str) -> Option<String> {
    let c = redis::Client::open(format!("redis://{addr}")).ok()?;
    let mut conn =
        tokio::time::timeout(Duration::from_secs(1), c.get_multiplexed_async_connection()).await.ok()?.ok()?;
    let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix("role:")).map(|r| r.trim().to_owned())
}

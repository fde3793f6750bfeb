//! Agents, heartbeat stores and verdicts with real redis-server processes,
//! `quorate agent` processes and a 3-node cluster.

// Each test holds the process-wide `serial()` guard for its whole run, on
// purpose: it serializes tests that each run on their own runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::{Duration, Instant};

use common::{GroupFixture, serial, signal};
use nix::sys::signal::Signal;
use quorate::pb::v1::VerdictState;

/// The default policy: heartbeat 100 ms, down after 500 ms, report every 1 s.
const DOWN_AFTER: Duration = Duration::from_millis(500);
const REPORT_INTERVAL: Duration = Duration::from_millis(1000);
const SETTLE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_is_down_within_the_bound_and_up_after_it_resumes() {
    let _serial = serial();
    let f = GroupFixture::start(2).await;
    f.wait_verdict("cache-1", VerdictState::VerdictUp, SETTLE).await;
    f.wait_verdict("cache-2", VerdictState::VerdictUp, SETTLE).await;

    signal(f.agent_pid(0), Signal::SIGSTOP);
    let bound = DOWN_AFTER + REPORT_INTERVAL + Duration::from_secs(1);
    let took = f.wait_verdict("cache-1", VerdictState::VerdictDown, Duration::from_secs(30)).await;
    eprintln!("paused agent judged down after {took:?} (bound {bound:?})");
    assert!(took <= bound, "down after {took:?}, bound {bound:?}");
    // Its peer is unaffected.
    assert_eq!(f.verdicts().await.unwrap()["cache-2"], VerdictState::VerdictUp);

    signal(f.agent_pid(0), Signal::SIGCONT);
    let took = f.wait_verdict("cache-1", VerdictState::VerdictUp, Duration::from_secs(30)).await;
    eprintln!("resumed agent judged up after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_heartbeat_store_is_down_and_the_evidence_says_why() {
    let _serial = serial();
    let mut f = GroupFixture::start(2).await;
    f.wait_verdict("cache-2", VerdictState::VerdictUp, SETTLE).await;
    f.redis[1].kill();
    f.wait_verdict("cache-2", VerdictState::VerdictDown, Duration::from_secs(30)).await;
    let e = f.cluster.client().explain("cache", "cache-2").await.unwrap();
    assert!(e.sentence.starts_with("cache-2 is DOWN"), "{}", e.sentence);
    let down = e.evidence.iter().filter(|c| c.reason == "heartbeat store unreachable").count();
    assert!(down >= 3, "evidence: {:?}", e.evidence);
    // The store comes back: so does the member.
    f.redis[1].restart();
    f.wait_verdict("cache-2", VerdictState::VerdictUp, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_shows_a_new_incarnation() {
    let _serial = serial();
    let mut f = GroupFixture::start(2).await;
    f.wait_verdict("cache-1", VerdictState::VerdictUp, SETTLE).await;
    let before = f.matrix().await.unwrap();
    let inc_before = before
        .cells
        .iter()
        .find(|c| c.observer == "coordinator-1" && c.target == "cache-1")
        .and_then(|c| c.incarnation)
        .expect("coordinator-1 has read cache-1's incarnation");

    f.agents[0].take().unwrap().kill();
    f.start_agent(0);
    let start = Instant::now();
    loop {
        let m = f.matrix().await;
        if let Some(r) = m.as_ref().and_then(|m| m.restarts.iter().find(|r| r.member == "cache-1")) {
            assert_eq!(r.from_incarnation, inc_before);
            assert_ne!(r.to_incarnation, inc_before);
            let cells = &m.as_ref().unwrap().cells;
            assert!(cells.iter().any(|c| c.target == "cache-1" && c.incarnation == Some(r.to_incarnation)));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no restart recorded: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = f.cluster.client().explain("cache", "cache-1").await.unwrap();
    assert_eq!(e.restarts.len(), 1, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_raft_leader_flips_no_verdict() {
    let _serial = serial();
    let mut f = GroupFixture::start(2).await;
    f.wait_verdict("cache-1", VerdictState::VerdictUp, SETTLE).await;
    f.wait_verdict("cache-2", VerdictState::VerdictUp, SETTLE).await;
    let leader = f.cluster.wait_for_leader(SETTLE).await;
    // Watch from a node that survives.
    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    let watcher = f.cluster.client_of(&f.cluster.node(survivor).addr, "reader");
    let mut stream = watcher.watch("cache").await.unwrap();

    f.cluster.kill(leader);
    let until = Instant::now() + Duration::from_secs(6);
    let mut reads = 0;
    while Instant::now() < until {
        if let Some(v) = f.verdicts().await {
            reads += 1;
            for (m, s) in &v {
                assert_eq!(*s, VerdictState::VerdictUp, "{m} flipped to {s:?} after the leader was killed");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reads > 10, "only {reads} successful reads in 6 s");
    // The survivor's stream: the current state, the first verdicts, and no
    // verdict change after them.
    let mut verdict_events = Vec::new();
    while let Ok(Some(ev)) =
        tokio::time::timeout(Duration::from_millis(100), stream.message()).await.unwrap_or(Ok(None))
    {
        if let Some(v) = ev.verdict {
            verdict_events.push((v.member, v.from, v.to.map(|t| t.state)));
        }
    }
    assert_eq!(verdict_events.len(), 2, "verdict events on the survivor: {verdict_events:?}");
    assert!(verdict_events.iter().all(|(_, from, to)| *from == 0 && *to == Some(VerdictState::VerdictUp as i32)));
}

//! Cluster membership on real processes: adding a node (a learner until it
//! has caught up), the refusals of a removal, a removed node that comes
//! back, replacing a node for good and a rolling restart of every
//! coordinator, the last two under a held lease and a managed Redis pair.

// Each test holds the process-wide `serial()` guard for its whole run, on
// purpose: it serializes tests that each run on their own runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, PAIR, PairFixture, fenced_set, free_port, missing_on, redis_conn, run_cli, serial, wait_one};
use quorate::client::Client;
use quorate::pb::v1 as pb;
use tonic::Code;

const LEADER_WAIT: Duration = Duration::from_secs(20);

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The membership as the leader sees it, retried for a while (a leader
/// may be changing).
async fn members(cluster: &Cluster) -> pb::ClusterMembersResponse {
    let started = Instant::now();
    loop {
        match cluster.client().cluster_members().await {
            Ok(m) => return m,
            Err(e) => assert!(started.elapsed() < LEADER_WAIT, "no membership for {LEADER_WAIT:?}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `cond` holds of the membership; returns it and how long.
async fn wait_members(
    cluster: &Cluster,
    within: Duration,
    what: &str,
    cond: impl Fn(&pb::ClusterMembersResponse) -> bool,
) -> (pb::ClusterMembersResponse, Duration) {
    let started = Instant::now();
    loop {
        let m = members(cluster).await;
        if cond(&m) {
            return (m, started.elapsed());
        }
        assert!(started.elapsed() < within, "{what} not within {within:?}: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn safe_to_stop(m: &pb::ClusterMembersResponse, id: u64) -> bool {
    m.nodes.iter().any(|n| n.id == id && n.safe_to_stop == "yes")
}

fn all_current(m: &pb::ClusterMembersResponse) -> bool {
    !m.joint && m.nodes.iter().all(|n| n.currency == "current")
}

/// Waits until node `id`'s process has exited; its exit code.
fn wait_exit(cluster: &mut Cluster, id: u64, within: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = cluster.try_wait(id).unwrap() {
            return status.code();
        }
        assert!(started.elapsed() < within, "node {id} still runs after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_is_a_learner_until_caught_up_then_a_voter() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    cluster.wait_for_leader(LEADER_WAIT).await;
    // Some history for the new node to catch up on.
    let client = cluster.client_as("holder");
    for i in 0..200 {
        client.acquire(&format!("g{i}"), "holder", 60_000, None).await.unwrap();
    }
    let id = cluster.add_node_slot();
    cluster.start_node(id);
    let addr = cluster.node(id).addr.clone();
    let (code, out, err) =
        run_cli(&["--json", "cluster", "add-node", "--id", &id.to_string(), "--addr", &addr], &cluster.conn());
    assert_eq!(code, 0, "add-node: {out} {err}");
    let added = json(&out);
    assert_eq!(added["added"], id);
    eprintln!("node {id} caught up in {} ms, a voter after {} ms", added["caught_up_ms"], added["took_ms"]);

    let (code, out, err) = run_cli(&["--json", "cluster", "members"], &cluster.conn());
    assert_eq!(code, 0, "members: {out} {err}");
    let m = json(&out);
    assert_eq!(m["voters"], serde_json::json!([1, 2, 3, id]), "{m}");
    assert_eq!(m["learners"], serde_json::json!([]), "{m}");
    let node = m["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap().clone();
    assert_eq!(node["addr"], addr.as_str());
    assert!(["follower", "leader"].contains(&node["role"].as_str().unwrap()), "{node}");
    assert!(node["safe_to_stop"].is_string() && m["safe_to_stop_now"].is_array(), "{m}");
    // The new node serves what it caught up on.
    let started = Instant::now();
    while !cluster.status_of(id).await.is_some_and(|s| s.caught_up) {
        assert!(started.elapsed() < Duration::from_secs(20), "node {id} never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let own = cluster.client_of(&addr, "reader").get_lease("g199", pb::Consistency::Stale).await.unwrap();
    assert_eq!((own.served_by, own.lease.unwrap().holder.as_str()), (id, "holder"));

    // A node that never runs stays a learner: it is never promoted.
    let ghost = id + 1;
    let ghost_addr = format!("127.0.0.1:{}", free_port());
    let args = ["cluster", "add-node", "--id", &ghost.to_string(), "--addr", &ghost_addr, "--wait-s", "2"];
    let (code, out, err) = run_cli(&args, &cluster.conn());
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("stays a learner"), "{err}");
    let m = members(&cluster).await;
    assert_eq!((m.learners.as_slice(), m.voters.len()), ([ghost].as_slice(), 4), "{m:?}");
    // A learner can always be removed, and its id is then used up.
    let (code, out, err) = run_cli(&["--json", "cluster", "remove-node", "--id", &ghost.to_string()], &cluster.conn());
    assert_eq!(code, 0, "{out} {err}");
    let m = members(&cluster).await;
    assert!(m.learners.is_empty() && m.removed == vec![ghost], "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_that_would_cost_the_quorum_is_refused() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let (dead, live) = (others[0], others[1]);
    cluster.kill(dead);
    // The leader notices the dead node (no contact) before it is judged.
    wait_members(&cluster, Duration::from_secs(10), "the dead node behind", |m| {
        m.nodes.iter().any(|n| n.id == dead && n.currency == "behind")
    })
    .await;

    // Removing a live follower would leave the leader and a dead node.
    let (code, _, err) = run_cli(&["cluster", "remove-node", "--id", &live.to_string()], &cluster.conn());
    assert_eq!(code, 1);
    assert!(err.contains("fewer than the 2 a quorum needs"), "{err}");
    // Only operators change the membership.
    let e = cluster.client_as("reader").remove_node(dead).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.to_string().contains("admin only"), "{e}");
    let m = members(&cluster).await;
    assert_eq!(m.voters, vec![1, 2, 3], "nothing changed: {m:?}");
    // Not safe to stop either of the two that are left.
    assert!(!safe_to_stop(&m, leader) && !safe_to_stop(&m, live), "{m:?}");

    // Removing the dead one is safe.
    let r = cluster.client().remove_node(dead).await.unwrap();
    assert!(r.was_voter);
    let m = members(&cluster).await;
    let mut want: Vec<u64> = vec![leader, live];
    want.sort();
    assert_eq!((m.voters, m.removed), (want, vec![dead]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_that_comes_back_is_refused_and_says_so() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let victim = (1..=3).find(|i| *i != leader).unwrap();
    cluster.client_as("holder").acquire("g", "holder", 60_000, None).await.unwrap();
    cluster.kill(victim);
    cluster.client().remove_node(victim).await.unwrap();

    // Back with its old data: it still believes it is a voter.
    cluster.start_node(victim);
    let code = wait_exit(&mut cluster, victim, Duration::from_secs(30));
    assert_ne!(code, Some(0));
    let log = std::fs::read_to_string(&cluster.node(victim).log).unwrap();
    assert!(log.contains(&format!("this node (id {victim}) was removed from the cluster")), "{log}");
    // Back with an empty data directory under the old id: the same.
    std::fs::remove_dir_all(&cluster.node(victim).data_dir).unwrap();
    let before = log.matches("was removed from the cluster").count();
    cluster.start_node(victim);
    assert_ne!(wait_exit(&mut cluster, victim, Duration::from_secs(30)), Some(0));
    let log = std::fs::read_to_string(&cluster.node(victim).log).unwrap();
    assert!(log.matches("was removed from the cluster").count() > before, "{log}");
    // Its id cannot be added again.
    let addr = cluster.node(victim).addr.clone();
    let e = cluster.client().add_node(victim, &addr, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("ids are never reused"), "{e}");
    // The cluster carries on with the two that are left.
    let l = cluster.client().get_lease("g", pb::Consistency::Linearizable).await.unwrap().lease.unwrap();
    assert_eq!(l.holder, "holder");
}

/// What the background writer saw.
struct WriteLog {
    acked: Vec<String>,
    /// The longest stretch without an acknowledged write.
    longest_gap: Duration,
}

/// Writes to db-1's data Redis under the epoch quorate gives it, `WAIT 1`
/// after each write, until told to stop; every write a replica
/// acknowledged is kept. It writes only while db-1 holds the lease.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<WriteLog>,
}

impl Writer {
    fn start(client: Client, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut log = WriteLog { acked: Vec::new(), longest_gap: Duration::ZERO };
            let mut session: Option<(redis::aio::MultiplexedConnection, u64)> = None;
            let mut last_ack = Instant::now();
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                if session.is_none() {
                    let lease = client.get_lease(PAIR, pb::Consistency::Linearizable).await.ok().and_then(|r| r.lease);
                    session = match (lease, redis_conn(port).await) {
                        (Some(l), Some(c)) if l.holder == "db-1" => Some((c, l.epoch)),
                        _ => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                }
                let (conn, epoch) = session.as_mut().unwrap();
                let key = format!("w:{i}");
                match fenced_set(conn, &key, &key, *epoch).await {
                    Ok(()) if wait_one(conn, 1000).await >= 1 => {
                        log.acked.push(key);
                        log.longest_gap = log.longest_gap.max(last_ack.elapsed());
                        last_ack = Instant::now();
                        i += 1;
                    }
                    Ok(()) => {}
                    Err(_) => session = None,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            log
        });
        Writer { stop, task }
    }

    async fn finish(self) -> WriteLog {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The pair's primary and epoch now.
async fn primary(f: &PairFixture) -> (String, u64) {
    let started = Instant::now();
    loop {
        if let Some(p) = f.primary().await {
            return p;
        }
        assert!(started.elapsed() < LEADER_WAIT, "no primary for {LEADER_WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn check_writes(f: &PairFixture, log: &WriteLog) {
    assert!(log.acked.len() > 20, "too few acknowledged writes to mean anything: {}", log.acked.len());
    for member in ["db-1", "db-2"] {
        let missing = missing_on(f.data_port(member), &log.acked).await;
        assert!(missing.is_empty(), "{} acknowledged writes missing on {member}: {missing:?}", missing.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_replaced_for_good_under_a_held_lease_costs_no_failover() {
    let _serial = serial();
    let mut f = PairFixture::start().await;
    let epoch = f.wait_ready().await;
    let writer = Writer::start(f.cluster.client(), f.data_port("db-1"));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Kill a follower, wipe its disk, remove it.
    let leader = f.cluster.wait_for_leader(LEADER_WAIT).await;
    let victim = (1..=3).find(|i| *i != leader).unwrap();
    let started = Instant::now();
    let old = f.cluster.forget_node(victim);
    std::fs::remove_dir_all(&old.data_dir).unwrap();
    let (code, out, err) =
        run_cli(&["--json", "cluster", "remove-node", "--id", &victim.to_string()], &f.cluster.conn());
    assert_eq!(code, 0, "remove-node: {out} {err}");
    let removed_ms = started.elapsed().as_millis();

    // A fresh node on a new address.
    let fresh = f.cluster.add_node_slot();
    f.cluster.start_node(fresh);
    let addr = f.cluster.node(fresh).addr.clone();
    let (code, out, err) =
        run_cli(&["--json", "cluster", "add-node", "--id", &fresh.to_string(), "--addr", &addr], &f.cluster.conn());
    assert_eq!(code, 0, "add-node: {out} {err}");
    let added = json(&out);
    let replaced_ms = started.elapsed().as_millis();
    let (m, _) = wait_members(&f.cluster, Duration::from_secs(20), "every node current", all_current).await;
    let mut voters: Vec<u64> = (1..=3).filter(|i| *i != victim).chain([fresh]).collect();
    voters.sort();
    assert_eq!((m.voters.clone(), m.removed.clone()), (voters, vec![victim]), "{m:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(primary(&f).await, ("db-1".to_owned(), epoch), "a failover or a lapse during the replacement");

    // The new cluster survives a leader kill.
    let leader = f.cluster.wait_for_leader(LEADER_WAIT).await;
    f.cluster.kill(leader);
    let killed = Instant::now();
    let client = f.cluster.client();
    let served_by = loop {
        match client.get_lease(PAIR, pb::Consistency::Linearizable).await {
            Ok(r) if r.served_by != leader => break r.served_by,
            _ => assert!(killed.elapsed() < Duration::from_secs(10), "no new leader 10 s after the kill"),
        }
    };
    let recovered_ms = killed.elapsed().as_millis();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (holder, epoch_after) = primary(&f).await;
    let log = writer.finish().await;
    eprintln!(
        "replace node {victim} by node {fresh}: removed {removed_ms} ms after the kill; node {fresh} caught up in \
         {} ms, a voter {} ms after add-node, {replaced_ms} ms after the kill; epoch {epoch} unchanged. \
         Leader {leader} killed: node {served_by} answered a linearizable read after {recovered_ms} ms; \
         primary {holder} at epoch {epoch_after}; {} acknowledged writes, longest gap {} ms",
        added["caught_up_ms"],
        added["took_ms"],
        log.acked.len(),
        log.longest_gap.as_millis()
    );
    assert_eq!(holder, "db-1", "a failover after the leader kill");
    check_writes(&f, &log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_coordinator_costs_no_failover_and_no_lapse() {
    let _serial = serial();
    let mut f = PairFixture::start().await;
    let epoch = f.wait_ready().await;
    let writer = Writer::start(f.cluster.client(), f.data_port("db-1"));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Followers first, the leader last, as the README's procedure says.
    let m = members(&f.cluster).await;
    let leader = m.leader_id.unwrap();
    let order: Vec<u64> = m.voters.iter().copied().filter(|i| *i != leader).chain([leader]).collect();
    let mut report = Vec::new();
    for id in order {
        let (_, waited) = wait_members(&f.cluster, Duration::from_secs(30), "safe to stop", |m| {
            all_current(m) && safe_to_stop(m, id)
        })
        .await;
        let stopped = f.cluster.stop(id);
        f.cluster.start_node(id);
        report.push(format!("node {id}: safe after {} ms, stopped in {} ms", waited.as_millis(), stopped.as_millis()));
    }
    let (_, back) = wait_members(&f.cluster, Duration::from_secs(30), "every node current", all_current).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = primary(&f).await;
    let log = writer.finish().await;
    eprintln!(
        "rolling restart: {}; all current {} ms after the last start; primary {after:?} (epoch at start {epoch}); \
         {} acknowledged writes, longest gap {} ms",
        report.join("; "),
        back.as_millis(),
        log.acked.len(),
        log.longest_gap.as_millis()
    );
    assert_eq!(after, ("db-1".to_owned(), epoch), "a failover or a lapse of the primary's lease");
    check_writes(&f, &log).await;
}

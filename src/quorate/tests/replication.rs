//! Replication never wedges (issue 9), on real `quorate server` processes:
//!
//! - a report too large for one log entry is refused with the limit named,
//!   and reports just under it replicate; writes keep committing within 1 s;
//! - the log is snapshotted by size, not only by count;
//! - a node whose data was lost while it was down (its `raft.redb`
//!   deleted, or its whole directory) says so, is caught up after the
//!   others wrote 10,000+ entries, and serves no read older than the state
//!   of the cluster when it started;
//! - a node whose Raft stops (its disk is full) exits non-zero.
// The serial guard is held across awaits on purpose: one cluster at a time.
#![allow(clippy::await_holding_lock)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Cluster, serial};
use quorate::client::Client;
use quorate::pb::v1 as pb;
use tonic::Code;

const LEADER_WAIT: Duration = Duration::from_secs(20);

fn stale() -> pb::Consistency {
    pb::Consistency::Stale
}

/// A coordinator-style report with `n` views of groups that need not exist
/// (they are rejected when applied; the entry is replicated all the same),
/// each with `cells` observations. Large reports take many cells per view:
/// a report holds at most 1024 views (`MAX_VIEWS_PER_REPORT`).
fn report(observer: &str, prefix: &str, n: usize, cells: usize) -> pb::ReportRequest {
    let views = (0..n)
        .map(|i| pb::GroupView {
            group: format!("{prefix}{i}"),
            cells: (0..cells)
                .map(|c| pb::Observation {
                    target: format!("m{c}"),
                    state: pb::ObservationState::ObservedUp as i32,
                    reason: "heartbeat advancing".into(),
                    ..Default::default()
                })
                .collect(),
            version: 0,
        })
        .collect();
    pb::ReportRequest { observer: observer.into(), observer_incarnation: 1, views, status: None, refresh: Vec::new() }
}

/// Acquires (or re-acquires) `n` leases one after the other and returns the
/// slowest of them; panics on any error.
async fn slowest_write(cluster: &Cluster, n: usize) -> Duration {
    let client = cluster.client_as("h");
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let started = Instant::now();
        let r = client.acquire(&format!("after-{i}"), "h", 5_000, None).await.expect("write after the large reports");
        assert!(r.acquired);
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

fn log_text(cluster: &Cluster, id: u64) -> String {
    std::fs::read_to_string(&cluster.node(id).log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_too_large_for_one_entry_is_refused_and_writes_keep_committing() {
    let _serial = serial();
    // The smallest byte trigger, so that the large reports below also force
    // snapshots by size.
    let cluster = Cluster::start_with(3, Some("snapshot_max_log_bytes = 1048576\n"));
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let client = Arc::new(cluster.client_as("h"));
    client.acquire("warmup", "h", 5_000, None).await.unwrap();

    // A report within every count bound (1000 views of 32 observations)
    // and under the 4 MiB message cap, but far over one log entry.
    // Reports come from node certificates, as coordinator-N.
    let mut raw = cluster.client_as(&format!("node-{leader}")).raw(&cluster.node(leader).addr).unwrap();
    let err = raw
        .report(report(&format!("coordinator-{leader}"), "g", 1_000, 32))
        .await
        .expect_err("a ~1 MB report was accepted");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("the limit is") && err.message().contains("MAX_ENTRY_BYTES"),
        "the error does not name the limit: {}",
        err.message()
    );
    let slowest = slowest_write(&cluster, 20).await;
    assert!(slowest < Duration::from_secs(1), "a write after the refused report took {slowest:?}");

    // Large reports under the entry limit (1000 views of 3 observations),
    // several at once (the batcher must not pack them into one oversized
    // entry), replicate to every node. (A debug
    // build encodes JSON slowly: give each call time.)
    let big = Arc::new(cluster.client_as("node-2").with_call_timeout(Duration::from_secs(30)));
    let sends = (0..4).map(|i| {
        let client = big.clone();
        async move { client.report_view(report("coordinator-2", &format!("r{i}-"), 1_000, 3)).await }
    });
    for res in futures::future::join_all(sends).await {
        res.expect("a report under the entry limit");
    }
    let target = cluster.status_of(leader).await.unwrap().last_applied;
    let started = Instant::now();
    for id in 1..=3 {
        loop {
            let applied = cluster.status_of(id).await.map_or(0, |s| s.last_applied);
            if applied >= target {
                break;
            }
            if started.elapsed() > Duration::from_secs(20) {
                cluster.print_logs();
                panic!("node {id} stuck at {applied} of {target}: large entries do not replicate");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!("4 reports of ~460 KB replicated to every node in {:?}", started.elapsed());
    let slowest = slowest_write(&cluster, 20).await;
    assert!(slowest < Duration::from_secs(1), "a write after the large reports took {slowest:?}");

    // ~1.8 MB of log since the start: at least one snapshot by size.
    let started = Instant::now();
    let by_size = |t: String| t.contains("building a snapshot") && t.contains("\"log bytes\"");
    while !(1..=3).any(|id| by_size(log_text(&cluster, id))) {
        if started.elapsed() > Duration::from_secs(10) {
            cluster.print_logs();
            panic!("no snapshot by log size after ~1.8 MB of log with snapshot_max_log_bytes = 1 MiB");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a node that lost its data must show, for either way of losing it.
async fn lost_data_is_caught_up(wipe_whole_dir: bool) {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    cluster.wait_for_leader(LEADER_WAIT).await;
    let client = cluster.client_as("h");
    let first = client.acquire("marker", "h@0", 60_000, None).await.unwrap().lease.unwrap();
    wait_until_node_3_has(&cluster, &client, first.epoch).await;
    cluster.kill(3);

    let client = Arc::new(cluster.client_as("h"));
    let newest = write_while_node_3_is_down(&client, first.epoch).await;
    let data_dir = cluster.node(3).data_dir.clone();
    if wipe_whole_dir {
        std::fs::remove_dir_all(&data_dir).unwrap();
    } else {
        std::fs::remove_file(data_dir.join("raft.redb")).unwrap();
    }
    let leader_applied = {
        let mut best = 0;
        for id in 1..=2 {
            best = best.max(cluster.status_of(id).await.map_or(0, |s| s.last_applied));
        }
        best
    };
    assert!(leader_applied >= 10_000, "only {leader_applied} entries were written");
    cluster.start_node(3);
    reads_stay_fresh_until_caught_up(&cluster, &client, newest.epoch, leader_applied).await;
    let log = log_text(&cluster, 3);
    let expected = if wipe_whole_dir { "cluster it belongs to has history" } else { "its Raft store is empty" };
    assert!(log.contains(expected), "node 3 did not say it lost its data ({expected:?})");
    assert!(log.contains("caught up after losing its data"), "node 3 did not say it caught up");

    // It is a full member again: with node 1 down, nodes 2 and 3 elect a
    // leader that has everything.
    cluster.kill(1);
    cluster.wait_for_leader(LEADER_WAIT).await;
    let client = cluster.client_as("h");
    let lease = client.get_lease("marker", pb::Consistency::Linearizable).await.unwrap().lease.unwrap();
    assert_eq!((lease.holder.as_str(), lease.epoch), ("h@1", newest.epoch));
    client.acquire("after", "h", 5_000, None).await.expect("writes with node 3 in the quorum");
}

/// Waits (up to 10 s) until node 3 has applied the marker at `epoch`, so
/// that it has it before it goes down.
async fn wait_until_node_3_has(cluster: &Cluster, client: &Client, epoch: u64) {
    let started = Instant::now();
    loop {
        let mut raw = client.raw(&cluster.node(3).addr).unwrap();
        let seen = raw.get_lease(pb::GetLeaseRequest { group: "marker".into(), consistency: stale() as i32 }).await;
        if let Ok(r) = seen
            && r.into_inner().lease.is_some_and(|l| l.epoch == epoch)
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "node 3 never applied the marker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 10,000+ entries while node 3 is down (more than a snapshot interval, so
/// it is caught up by snapshot), then a newer marker (holder h@1) in place
/// of the one at `first_epoch`; returns the newer marker's lease. The
/// entries are acquires and releases, which are always logged (renewals
/// need not be: `durable_renewals`).
async fn write_while_node_3_is_down(client: &Arc<Client>, first_epoch: u64) -> pb::Lease {
    let writers = (0..16).map(|w| {
        let client = client.clone();
        async move {
            for _ in 0..320 {
                let group = format!("load-{w}");
                let lease = client.acquire(&group, "h", 60_000, None).await.expect("acquire while node 3 is down");
                let epoch = lease.lease.expect("a granted lease").epoch;
                client.release(&group, "h", epoch).await.expect("release while node 3 is down");
            }
        }
    });
    let wrote = Instant::now();
    futures::future::join_all(writers).await;
    println!("5,120 acquires and 5,120 releases in {:?}", wrote.elapsed());
    client.release("marker", "h@0", first_epoch).await.unwrap();
    client.acquire("marker", "h@1", 60_000, None).await.unwrap().lease.unwrap()
}

/// Until node 3 (just restarted) says it has caught up to
/// `leader_applied`, every stale read it answers shows the newest marker
/// (epoch `newest_epoch` or later, holder h@1); after that too. Panics
/// unless it catches up within 30 s of its restart.
async fn reads_stay_fresh_until_caught_up(cluster: &Cluster, client: &Client, newest_epoch: u64, leader_applied: u64) {
    let restarted = Instant::now();
    let mut refused = 0u32;
    let mut caught_up_after = None;
    while restarted.elapsed() < Duration::from_secs(30) {
        let Ok(mut raw) = client.raw(&cluster.node(3).addr) else { continue };
        let req = pb::GetLeaseRequest { group: "marker".into(), consistency: stale() as i32 };
        match tokio::time::timeout(Duration::from_secs(1), raw.get_lease(req)).await {
            Ok(Ok(r)) => {
                let lease = r.into_inner().lease.unwrap_or_default();
                assert!(
                    lease.epoch >= newest_epoch && lease.holder == "h@1",
                    "node 3 served a stale read older than the cluster's state when it started: {lease:?} (newest: epoch {})",
                    newest_epoch
                );
            }
            Ok(Err(status)) => {
                if status.code() == Code::Unavailable {
                    refused += 1;
                }
            }
            Err(_) => {}
        }
        if let Some(s) = cluster.status_of(3).await
            && s.caught_up
            && s.last_applied >= leader_applied
        {
            caught_up_after = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(took) = caught_up_after else {
        cluster.print_logs();
        panic!("node 3 not caught up within 30 s of its restart");
    };
    println!("node 3 caught up {leader_applied}+ entries in {took:?}; {refused} reads refused before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_raft_store_was_deleted_is_caught_up_before_it_serves() {
    lost_data_is_caught_up(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_data_directory_was_wiped_is_caught_up_before_it_serves() {
    lost_data_is_caught_up(true).await;
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output();
        match out {
            Ok(o) if o.status.success() => Tmpfs(at.to_owned()),
            Ok(o) => panic!(
                "cannot mount a tmpfs for the full-disk test (it needs root): {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run mount: {e}"),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_full_disk_exits_non_zero_with_the_reason() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // Node 3's data directory is a 4 MiB disk; the others have room.
    let mut cluster = Cluster::prepare(3, None, dir);
    let full = Tmpfs::mount(&cluster.node(3).data_dir, "4m");
    for id in 1..=3 {
        cluster.start_node(id);
    }
    cluster.wait_for_leader(LEADER_WAIT).await;
    let client = cluster.client_as("h");
    client.acquire("warmup", "h", 5_000, None).await.unwrap();
    let node_2 = cluster.client_as("node-2");
    // Some 300 KB per report: node 3's disk fills after a dozen or two.
    let started = Instant::now();
    let mut exited = None;
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(status)) = cluster.try_wait(3) {
            exited = Some(status);
            break;
        }
        if sent < 60 {
            let _ = node_2.report_view(report("coordinator-2", &format!("f{sent}-"), 1_000, 3)).await;
            sent += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let Some(status) = exited else {
        cluster.print_logs();
        panic!("node 3 kept running with a full disk ({sent} reports sent)");
    };
    assert!(!status.success(), "node 3 exited with {status} on a full disk");
    let log = log_text(&cluster, 3);
    assert!(log.contains("Raft stopped"), "node 3's log does not say why it exits");
    println!("node 3 exited ({status}) {:?} after the load started", started.elapsed());
    // The others carry on.
    cluster.kill(3);
    drop(full);
    client.acquire("after", "h", 5_000, None).await.expect("the other two carry on");
}

//! Integration tests against real `quorate server` processes.

// Each test holds the process-wide `serial()` guard for its whole run, on
// purpose: it serializes tests that each run on their own runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::{Duration, Instant};

use common::{CliProc, Cluster, run_cli, serial};
use quorate::pb::v1 as pb;
use tonic::Code;

const LEADER_WAIT: Duration = Duration::from_secs(20);

fn linearizable() -> pb::Consistency {
    pb::Consistency::Linearizable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_a_new_one_and_the_lease_survives() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let client = cluster.client_as("holder-1");
    let granted = client.acquire("svc", "holder-1", 30_000, None).await.unwrap();
    assert!(granted.acquired);
    let epoch = granted.lease.unwrap().epoch;

    cluster.kill(leader);
    let killed_at = Instant::now();
    // The first linearizable read that succeeds must come from a new leader
    // and show the same holder and epoch, within 2 s of the kill.
    let lease = loop {
        match client.get_lease("svc", linearizable()).await {
            Ok(r) => {
                assert_ne!(r.served_by, leader, "served by the killed leader");
                break r.lease.unwrap();
            }
            Err(_) => assert!(killed_at.elapsed() < Duration::from_secs(10), "no read for 10 s"),
        }
    };
    let took = killed_at.elapsed();
    assert_eq!((lease.holder.as_str(), lease.epoch), ("holder-1", epoch));
    assert!(took < Duration::from_secs(2), "lease get answered {took:?} after the kill");
    let new_leader = cluster.wait_for_leader(LEADER_WAIT).await;
    assert_ne!(new_leader, leader);
    eprintln!("new leader {new_leader} answered {took:?} after kill -9 of {leader}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_acquirers_one_holds_and_the_other_takes_over_only_after_expiry() {
    let _serial = serial();
    let cluster = Cluster::start(3);
    cluster.wait_for_leader(LEADER_WAIT).await;
    let dir = cluster.dir.path();
    let args = |h: &'static str| ["--json", "lease", "acquire", "g", "--holder", h, "--ttl-ms", "1000", "--wait"];
    let mut a = CliProc::spawn("a", &args("a"), &cluster.conn_as("a"), dir);
    let mut b = CliProc::spawn("b", &args("b"), &cluster.conn_as("b"), dir);

    // Exactly one of them acquires.
    let (first_name, first_ev) = loop {
        if let Some((_, ev)) = a.next_json(Duration::from_millis(50)) {
            break ("a", ev);
        }
        if let Some((_, ev)) = b.next_json(Duration::from_millis(50)) {
            break ("b", ev);
        }
    };
    assert_eq!(first_ev["event"], "acquired", "{first_ev}");
    let (holder, waiter) = if first_name == "a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let first_epoch = first_ev["epoch"].as_u64().unwrap();

    // For 2 s the holder renews and the other one gets nothing.
    let mut last_valid_until = first_ev["valid_until_unix_ms"].as_u64().unwrap();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if let Some((_, ev)) = holder.next_json(Duration::from_millis(100)) {
            assert_eq!(ev["event"], "renewed", "{ev}");
            last_valid_until = ev["valid_until_unix_ms"].as_u64().unwrap();
        }
        assert!(waiter.lines.try_recv().is_err(), "both acquirers got the lease");
    }

    // kill -9 of the holder: the waiter acquires with a larger epoch, and
    // not before the killed holder's deadline.
    holder.proc.kill();
    while let Ok((_, line)) = holder.lines.try_recv() {
        let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(v) = ev["valid_until_unix_ms"].as_u64() {
            last_valid_until = last_valid_until.max(v);
        }
    }
    let (_, ev) = waiter.next_json(Duration::from_secs(15)).expect("the waiter never acquired");
    assert_eq!(ev["event"], "acquired", "{ev}");
    assert!(ev["epoch"].as_u64().unwrap() > first_epoch, "{ev}");
    let acquired_at = ev["at_unix_ms"].as_u64().unwrap();
    assert!(
        acquired_at >= last_valid_until,
        "took over at {acquired_at} while the old holder was valid until {last_valid_until}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_and_epochs_survive_kill_9_of_every_node() {
    let _serial = serial();
    // Snapshot often so that the restart goes through snapshot + log replay.
    let mut cluster = Cluster::start_with(3, Some("snapshot_every_entries = 20\n"));
    cluster.wait_for_leader(LEADER_WAIT).await;
    // One client identity `t`, holding as t@h1, t@h2, ...
    let client = cluster.client_as("t");
    let a = client.acquire("alpha", "t@h1", 60_000, None).await.unwrap();
    assert!(a.acquired);
    let b1 = client.acquire("beta", "t@h2", 60_000, None).await.unwrap();
    client.release("beta", "t@h2", b1.lease.unwrap().epoch).await.unwrap();
    let b2 = client.acquire("beta", "t@h3", 60_000, None).await.unwrap();
    let beta_epoch = b2.lease.unwrap().epoch;
    assert_eq!(beta_epoch, 2);
    for _ in 0..50 {
        client.renew("alpha", "t@h1", 1).await.unwrap();
    }
    // Renewals are confirmed without a log entry each: other writes make
    // the log long enough for the snapshot/compaction cycle below.
    for _ in 0..25 {
        let g = client.acquire("gamma", "t@h5", 60_000, None).await.unwrap();
        client.release("gamma", "t@h5", g.lease.unwrap().epoch).await.unwrap();
    }
    let max_seen = beta_epoch.max(1);

    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.start_node(id);
    }
    cluster.wait_for_leader(LEADER_WAIT).await;
    let client = cluster.client_as("t");
    let alpha = client.get_lease("alpha", linearizable()).await.unwrap().lease.unwrap();
    assert_eq!((alpha.holder.as_str(), alpha.epoch), ("t@h1", 1));
    let beta = client.get_lease("beta", linearizable()).await.unwrap().lease.unwrap();
    assert_eq!((beta.holder.as_str(), beta.epoch), ("t@h3", beta_epoch));

    // The next epochs are larger than every earlier one.
    client.release("beta", "t@h3", beta_epoch).await.unwrap();
    let next = client.acquire("beta", "t@h4", 5_000, None).await.unwrap().lease.unwrap();
    assert!(next.epoch > max_seen, "epoch {} after {max_seen}", next.epoch);
    let again = client.acquire("alpha", "t@h1", 5_000, None).await.unwrap().lease.unwrap();
    assert_eq!(again.epoch, 2);
    // Every node took part in the snapshot/compaction cycle.
    for id in 1..=3 {
        let s = cluster.status_of(id).await.expect("node answers");
        assert!(s.last_applied >= 55, "node {id} applied only up to {}", s.last_applied);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_refuses_writes_with_unavailable_within_the_election_timeout() {
    let _serial = serial();
    let election_timeout_max = Duration::from_millis(300);
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    cluster.client_as("warmup").acquire("g", "warmup", 5_000, None).await.unwrap();

    // Leave the leader alone: it has lost its quorum.
    for id in (1..=3).filter(|id| *id != leader) {
        cluster.kill(id);
    }
    let mut raw = cluster.client_as("warmup").raw(&cluster.node(leader).addr).unwrap();
    for attempt in 0..3 {
        let started = Instant::now();
        let req =
            pb::AcquireRequest { group: "g2".into(), holder: "warmup".into(), ttl_ms: 5_000, ..Default::default() };
        let err = raw.acquire(req).await.expect_err("a leader without quorum accepted a write");
        let took = started.elapsed();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            took < election_timeout_max + Duration::from_millis(700),
            "attempt {attempt}: refused only after {took:?}: {err:?}"
        );
        eprintln!("isolated leader refused in {took:?}: {}", err.message());
    }

    // The same from a follower survivor: restart one node, kill the leader.
    cluster.start_node((1..=3).find(|id| *id != leader).unwrap());
    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill(leader);
    let mut raw = cluster.client_as("warmup").raw(&cluster.node(survivor).addr).unwrap();
    let started = Instant::now();
    let req = pb::RenewRequest { group: "g".into(), holder: "warmup".into(), epoch: 1 };
    let err = raw.renew(req).await.expect_err("a lone follower accepted a write");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(started.elapsed() < election_timeout_max + Duration::from_millis(700), "took {:?}", started.elapsed());
}

/// A leader cut off from its followers serves linearizable reads only while
/// its leader lease covers them: no read invoked `usable` or more after the
/// last heartbeat its followers could have acknowledged succeeds (usable:
/// `election_timeout_max_ms` 150 shortened for two clocks' drift and the
/// 50 ms margin, 97 ms, while a follower refuses votes for 150 ms). A
/// read-index read invoked after they are gone never succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_serves_reads_only_while_its_lease_covers_them() {
    let _serial = serial();
    let usable = Duration::from_millis(97);
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    cluster.client_as("warmup").acquire("g", "warmup", 5_000, None).await.unwrap();
    let mut raw = cluster.client_as("warmup").raw(&cluster.node(leader).addr).unwrap();
    let read = |c: pb::Consistency| pb::GetLeaseRequest { group: "g".into(), consistency: c as i32 };
    for c in [pb::Consistency::Linearizable, pb::Consistency::ReadIndex] {
        raw.get_lease(read(c)).await.expect("a read on a healthy leader");
    }

    for id in (1..=3).filter(|id| *id != leader) {
        cluster.kill(id);
    }
    // Every heartbeat the followers acknowledged was sent before now.
    let killed = Instant::now();
    let (mut served, mut refused) = (0, 0);
    while killed.elapsed() < Duration::from_millis(800) {
        let invoked = killed.elapsed();
        match raw.get_lease(read(pb::Consistency::Linearizable)).await {
            Ok(_) => {
                assert!(invoked < usable, "a read invoked {invoked:?} after the quorum was lost was served");
                served += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                refused += 1;
            }
        }
    }
    eprintln!("isolated leader: {served} linearizable reads served, then {refused} refused");
    assert!(refused > 0, "the isolated leader never refused a linearizable read");
    let err = raw.get_lease(read(pb::Consistency::ReadIndex)).await.expect_err("a read-index read without a quorum");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_with_a_message_saying_what_is_wrong() {
    let _serial = serial();
    let cluster = Cluster::start(3);
    cluster.wait_for_leader(LEADER_WAIT).await;
    let client = cluster.client();
    let long = "x".repeat(129);
    let cases: Vec<(&str, &str, u64, &str)> = vec![
        ("", "h", 1000, "group name must not be empty"),
        (&long, "h", 1000, "group name is 129 bytes long; the limit is 128 bytes"),
        ("a b", "h", 1000, "contains ' '"),
        ("g", "", 1000, "holder name must not be empty"),
        ("g", &long, 1000, "holder name is 129 bytes long"),
        ("g", "h", 0, "ttl_ms must be positive"),
        ("g", "h", 300_001, "ttl_ms 300001 is above the maximum lease TTL of 300000 ms"),
        ("g", "h", 100, "below the minimum lease TTL of 500 ms"),
    ];
    let h = cluster.client_as("h");
    for (group, holder, ttl, want) in cases {
        let err = h.acquire(group, holder, ttl, None).await.expect_err(want);
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.to_string().contains(want), "{err} does not say {want:?}");
    }
    let err = client.get_lease("", linearizable()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A managed group whose lease this server could never grant.
    let member = |id: &str| pb::MemberSpec {
        id: id.into(),
        heartbeat: "redis://127.0.0.1:1".into(),
        priority: 100,
        data: "redis://127.0.0.1:1".into(),
        announce: String::new(),
    };
    let spec = pb::GroupSpec {
        name: "unlikely".into(),
        members: vec![member("m1"), member("m2")],
        policy: None,
        failover: Some(pb::FailoverPolicy { lease_ttl_ms: 300_001, ..Default::default() }),
    };
    let err = client.apply_group(spec).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("group unlikely: failover.lease_ttl_ms: ttl_ms 300001 is above"), "{err}");

    // Stale epochs: FAILED_PRECONDITION with the current epoch.
    h.acquire("g", "h", 5_000, None).await.unwrap();
    h.acquire("g", "h", 5_000, None).await.unwrap(); // epoch 2
    let err = h.renew("g", "h", 1).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("current epoch is 2"), "{err}");
    assert!(matches!(err, quorate::client::ClientError::Status { current_epoch: Some(2), .. }), "{err:?}");
    let err = cluster.client_as("someone-else").release("g", "someone-else", 2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    // The CLI says the same, and --json gives a machine-readable error.
    let (code, stdout, _) =
        run_cli(&["--json", "lease", "acquire", "g", "--holder", "h", "--ttl-ms", "0"], &cluster.conn_as("h"));
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["code"], "InvalidArgument", "{v}");
    assert!(v["error"].as_str().unwrap().contains("ttl_ms must be positive"), "{v}");
}

/// A holder's one-second lease (the managed-group default) survives the
/// Raft leader going silent — frozen with SIGSTOP, which to everyone else
/// looks like its host being cut off: the keeper's renewals find the new
/// leader within the lease's slack and no loss is announced. Five rounds,
/// each freezing whichever node leads for 3 s; the promise (README, "The
/// budget of a leader change") is for a machine that is not starved, so one
/// round in five may lose the lease on a busy test machine, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_lease_survives_a_silent_raft_leader() {
    use quorate::client::keeper::{self, KeeperEvent, KeeperSpec};
    use std::sync::Arc;

    let _serial = serial();
    // RUST_LOG=quorate=debug shows the keeper's hedges and retries.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = Cluster::start(3);
    cluster.wait_for_leader(LEADER_WAIT).await;
    let client = Arc::new(cluster.client_as("t").with_call_timeout(Duration::from_millis(250)));
    let mut lost_rounds = Vec::new();
    for round in 0..5 {
        let (tx, mut events) = tokio::sync::mpsc::channel(1024);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let spec = KeeperSpec { group: "svc".into(), holder: format!("t@h{round}"), ttl_ms: 1_000, wait: true };
        let keeper = {
            let client = client.clone();
            tokio::spawn(async move {
                let stop = async {
                    let _ = stop_rx.await;
                };
                keeper::keep(client.as_ref(), &spec, &tx, stop).await
            })
        };
        let first = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("acquired in time");
        assert!(matches!(first, Some(KeeperEvent::Acquired { .. })), "round {round}: {first:?}");
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let leader = cluster.wait_for_leader(LEADER_WAIT).await;
        let pid = cluster.node(leader).proc.as_ref().unwrap().pid();
        common::signal(pid, nix::sys::signal::Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_secs(3)).await;
        common::signal(pid, nix::sys::signal::Signal::SIGCONT);
        let mut renewals = 0;
        let mut lost = None;
        while let Ok(ev) = events.try_recv() {
            match ev {
                KeeperEvent::Renewed { .. } => renewals += 1,
                other => lost = Some(other),
            }
        }
        eprintln!("round {round}: leader {leader} frozen 3 s; {renewals} renewals; {lost:?}");
        if lost.is_some() {
            lost_rounds.push(round);
        } else {
            assert!(renewals >= 5, "round {round}: only {renewals} renewals in 3 s");
        }
        let _ = stop_tx.send(());
        keeper.await.unwrap().unwrap();
        // Let the thawed node catch up before the next round.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if lost_rounds.len() > 1 {
        cluster.print_logs();
    }
    assert!(lost_rounds.len() <= 1, "the lease was lost in rounds {lost_rounds:?} of 5");
}

//! The exec driver: hooks run with the documented environment, a failing
//! hook is reported and retried until it succeeds, and a failover runs the
//! new primary's promote hook with the new epoch.

#![allow(clippy::await_holding_lock)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, Conn, Proc, QUORATE, Redis, serial};
use quorate::pb::v1 as pb;

fn hooks_for(dir: &Path, member: &str, promote_failures: u32) -> Vec<String> {
    let log = dir.join(format!("{member}.hooks"));
    let count = dir.join(format!("{member}.failures"));
    let record = |what: &str| {
        format!("echo \"{what} $QUORATE_GROUP $QUORATE_MEMBER $QUORATE_EPOCH $QUORATE_ROLE\" >> {}", log.display())
    };
    // The promote hook fails its first `promote_failures` runs.
    let promote = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); if [ \"$n\" -lt {promote_failures} ]; then echo $((n+1)) > {c}; echo 'not yet' >&2; exit 1; fi; {}",
        record("promote"),
        c = count.display()
    );
    vec![
        "--driver".into(),
        "exec".into(),
        "--on-promote".into(),
        promote,
        "--on-demote".into(),
        record("demote"),
        "--on-fence".into(),
        record("fence"),
    ]
}

fn hook_log(dir: &Path, member: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{member}.hooks"))).unwrap_or_default()
}

async fn wait_until<F: FnMut() -> bool>(within: Duration, mut f: F) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_hooks_run_with_their_environment_and_failures_are_retried() {
    let _serial = serial();
    let cluster = Cluster::start(3);
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    let dir = cluster.dir.path().to_owned();
    let mut stores: Vec<Redis> = (1..=2).map(|i| Redis::start(&dir, &format!("hb-{i}"))).collect();
    let spec = pb::GroupSpec {
        name: "svc".into(),
        members: stores
            .iter()
            .enumerate()
            .map(|(i, r)| pb::MemberSpec {
                id: format!("svc-{}", i + 1),
                heartbeat: r.url(),
                priority: 100,
                data: String::new(),
                announce: String::new(),
            })
            .collect(),
        policy: None,
        failover: Some(pb::FailoverPolicy { initial_primary: "svc-1".into(), ..Default::default() }),
    };
    let client = cluster.client();
    client.apply_group(spec).await.unwrap();
    let mut agents: Vec<Proc> = (1..=2)
        .map(|i| {
            let member = format!("svc-{i}");
            let log = std::fs::File::create(dir.join(format!("agent-{i}.log"))).unwrap();
            let mut cmd = Command::new(QUORATE);
            Conn { tls: Some(cluster.cert(&member, Some("svc"))), ..cluster.conn() }.apply(&mut cmd);
            let child = cmd
                .args(["agent", "--group", "svc", "--member", &member])
                .args(hooks_for(&dir, &member, if i == 1 { 3 } else { 0 }))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            Proc { child, name: member }
        })
        .collect();

    // The failing promote hook shows up in the member's reported state...
    let mut saw_error = false;
    let start = Instant::now();
    while !saw_error && start.elapsed() < Duration::from_secs(20) {
        if let Ok(e) = client.get_election("svc", pb::Consistency::Stale).await {
            saw_error = e.members.iter().any(|m| {
                m.member == "svc-1"
                    && m.status.as_ref().is_some_and(|s| s.error.contains("promote hook failed") && !s.healthy)
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_error, "the failing hook was never reported");
    // ... and it is retried until it succeeds, with the documented environment.
    assert!(
        wait_until(Duration::from_secs(20), || hook_log(&dir, "svc-1").contains("promote svc svc-1 1 primary")).await,
        "svc-1 never promoted: {:?}",
        hook_log(&dir, "svc-1")
    );
    assert_eq!(std::fs::read_to_string(dir.join("svc-1.failures")).unwrap().trim(), "3");
    assert!(
        wait_until(Duration::from_secs(20), || hook_log(&dir, "svc-2").contains("demote svc svc-2 1 replica")).await,
        "svc-2 never demoted: {:?}",
        hook_log(&dir, "svc-2")
    );

    // Crash svc-1 (agent and heartbeat store): svc-2 is promoted at epoch 2.
    agents[0].kill();
    stores[0].kill();
    assert!(
        wait_until(Duration::from_secs(20), || hook_log(&dir, "svc-2").contains("promote svc svc-2 2 primary")).await,
        "svc-2 was not promoted: {:?}",
        hook_log(&dir, "svc-2")
    );
    let lease = client.get_lease("svc", pb::Consistency::Linearizable).await.unwrap().lease.unwrap();
    assert_eq!((lease.holder.as_str(), lease.epoch), ("svc-2", 2));
}

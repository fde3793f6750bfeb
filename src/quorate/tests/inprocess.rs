//! The middle test tier: whole coordinator clusters in this process, each
//! node started with `server::run_with_listener` on a listener bound to port
//! 0 before any node starts (so every peer's address is known and no port is
//! ever picked and then lost to another process). Faster to start than the
//! process tests in `cluster.rs`, and it exercises the same handlers, the
//! leader's duties and shutdown: every node's `run` must return once its
//! shutdown future fires, with every task it spawned ended.

// Each test holds the process-wide `serial()` guard for its whole run, on
// purpose: it serializes tests that each run on their own runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::{Duration, Instant};

use common::serial;
use quorate::client::Client;
use quorate::client::cluster::cluster_view;
use quorate::config::ServerConfig;
use quorate::pb::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

/// Bounds generous enough for a busy 2-core machine: only a real bug (no
/// leader at all, a shutdown that hangs) crosses them.
const LEADER_WAIT: Duration = Duration::from_secs(20);
const STOP_WAIT: Duration = Duration::from_secs(15);

struct InNode {
    id: u64,
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), quorate::server::ServerError>>>,
}

/// A cluster of `n` nodes running in this process. Dropping it aborts any
/// node still running (a failing test must not leave nodes behind).
struct InCluster {
    nodes: Vec<InNode>,
    _dir: tempfile::TempDir,
}

impl InCluster {
    async fn start(n: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let peers: Vec<String> = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect();
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let id = i as u64 + 1;
            let config = ServerConfig {
                node_id: id,
                listen: addrs[i].clone(),
                data_dir: dir.path().join(format!("node-{id}")),
                peers: peers.join(","),
                ..ServerConfig::default()
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(quorate::server::run_with_listener(config, listener, async move {
                let _ = stopped.await;
            }));
            nodes.push(InNode { id, addr: addrs[i].clone(), stop: Some(stop), task: Some(task) });
        }
        Self { nodes, _dir: dir }
    }

    fn client(&self) -> Client {
        let endpoints: Vec<String> = self.nodes.iter().filter(|n| n.task.is_some()).map(|n| n.addr.clone()).collect();
        Client::new(&endpoints).unwrap()
    }

    async fn wait_for_leader(&self) -> u64 {
        let start = Instant::now();
        loop {
            if let Some(leader) = cluster_view(&self.client()).await.leader {
                return leader;
            }
            assert!(start.elapsed() < LEADER_WAIT, "no leader within {LEADER_WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fires node `id`'s shutdown and waits for its `run` to return; its
    /// result is the test's to check.
    async fn stop(&mut self, id: u64) -> Result<(), quorate::server::ServerError> {
        let node = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        let _ = node.stop.take().unwrap().send(());
        let task = node.task.take().unwrap();
        tokio::time::timeout(STOP_WAIT, task)
            .await
            .unwrap_or_else(|_| panic!("node {id} did not stop within {STOP_WAIT:?} of its shutdown"))
            .unwrap()
    }
}

impl Drop for InCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(t) = n.task.take() {
                t.abort();
            }
        }
    }
}

fn linearizable() -> pb::Consistency {
    pb::Consistency::Linearizable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_through_an_in_process_cluster_and_every_node_stops_cleanly() {
    let _serial = serial();
    let mut cluster = InCluster::start(3).await;
    cluster.wait_for_leader().await;
    let client = cluster.client();

    let granted = client.acquire("svc", "a", 5_000, None).await.unwrap();
    assert!(granted.acquired, "{granted:?}");
    let epoch = granted.lease.unwrap().epoch;
    assert!(epoch >= 1);
    // Somebody else is refused while it is held, and told who holds it.
    let other = client.acquire("svc", "b", 5_000, None).await.unwrap();
    assert!(!other.acquired, "two holders at once: {other:?}");
    assert_eq!(other.lease.unwrap().holder, "a");
    // A renewal keeps the token; a renewal with a stale token is refused.
    let renewed = client.renew("svc", "a", epoch).await.unwrap();
    assert_eq!(renewed.lease.unwrap().epoch, epoch);
    let stale = client.renew("svc", "a", epoch + 1).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale}");
    // After a release the next holder gets a larger token.
    client.release("svc", "a", epoch).await.unwrap();
    let next = client.acquire("svc", "b", 5_000, None).await.unwrap();
    assert!(next.acquired, "{next:?}");
    assert!(next.lease.unwrap().epoch > epoch, "fencing tokens go up");

    // Every node returns from `run` once told to stop.
    for id in [1, 2, 3] {
        cluster.stop(id).await.unwrap_or_else(|e| panic!("node {id} stopped with an error: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_leader_in_process_keeps_the_holder_and_its_token() {
    let _serial = serial();
    let mut cluster = InCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let client = cluster.client();
    let granted = client.acquire("svc", "a", 30_000, None).await.unwrap();
    let epoch = granted.lease.unwrap().epoch;

    cluster.stop(leader).await.unwrap();
    let client = cluster.client();
    let new_leader = cluster.wait_for_leader().await;
    assert_ne!(new_leader, leader);
    let start = Instant::now();
    let lease = loop {
        match client.get_lease("svc", linearizable()).await {
            Ok(r) => break r.lease.unwrap(),
            Err(e) => assert!(start.elapsed() < LEADER_WAIT, "no linearizable read for {LEADER_WAIT:?}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((lease.holder.as_str(), lease.epoch), ("a", epoch), "the holder survives a leader change");
    let renewed = client.renew("svc", "a", epoch).await.unwrap();
    assert_eq!(renewed.lease.unwrap().epoch, epoch);
}

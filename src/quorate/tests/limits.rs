//! Request limits through an in-process cluster (issue 11): watch streams
//! per connection, reports per identity and second, and reports only by
//! the cluster's own coordinators and the groups' members. Each limit is
//! set small so that a test reaches it at once; every refusal must name
//! the limit. Nodes run as in `inprocess.rs`: `server::run_with_listener`
//! on listeners bound to port 0 first, plain text.

// Each test holds the `serial()` guard for its whole run, on purpose: it
// serializes tests that each run on their own runtime.
#![allow(clippy::await_holding_lock)]

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quorate::client::Client;
use quorate::client::cluster::cluster_view;
use quorate::config::ServerConfig;
use quorate::pb::v1 as pb;
use quorate::tls::transport::Transport;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

/// Bounds generous enough for a busy 2-core machine: only a real bug
/// crosses them.
const LEADER_WAIT: Duration = Duration::from_secs(20);
const STOP_WAIT: Duration = Duration::from_secs(15);
const SETTLE_WAIT: Duration = Duration::from_secs(20);

/// One cluster at a time in this binary (each runs three nodes).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct InNode {
    id: u64,
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), quorate::server::ServerError>>>,
}

/// `n` nodes in this process; dropping it aborts any still running.
struct InCluster {
    nodes: Vec<InNode>,
    _dir: tempfile::TempDir,
}

impl InCluster {
    async fn start(n: u64, tweak: impl Fn(&mut ServerConfig)) -> Self {
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
            let mut config = ServerConfig {
                node_id: id,
                listen: addrs[i].clone(),
                data_dir: dir.path().join(format!("node-{id}")),
                peers: peers.join(","),
                // Plain text, asked for: the limits hold for any caller
                // (tests/inprocess.rs runs the same tier over mutual TLS).
                insecure: true,
                ..ServerConfig::default()
            };
            tweak(&mut config);
            let (stop, stopped) = oneshot::channel::<()>();
            let run = quorate::server::run_with_listener(config, listener, Transport::Insecure, async move {
                let _ = stopped.await;
            });
            nodes.push(InNode { id, addr: addrs[i].clone(), stop: Some(stop), task: Some(tokio::spawn(run)) });
        }
        Self { nodes, _dir: dir }
    }

    fn client(&self) -> Client {
        let endpoints: Vec<String> = self.nodes.iter().map(|n| n.addr.clone()).collect();
        Client::new_with(&endpoints, Transport::Insecure).unwrap().with_call_timeout(Duration::from_secs(5))
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

    fn addr(&self, id: u64) -> String {
        self.nodes.iter().find(|n| n.id == id).unwrap().addr.clone()
    }

    async fn stop_all(&mut self) {
        for node in &mut self.nodes {
            let _ = node.stop.take().unwrap().send(());
            let task = node.task.take().unwrap();
            tokio::time::timeout(STOP_WAIT, task)
                .await
                .unwrap_or_else(|_| panic!("node {} did not stop within {STOP_WAIT:?}", node.id))
                .unwrap()
                .unwrap_or_else(|e| panic!("node {} stopped with an error: {e}", node.id));
        }
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

/// Calls `f` until it returns Some (a node catching up or an election
/// refuses for a while), within [`SETTLE_WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < SETTLE_WAIT, "{what}: not within {SETTLE_WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Group `name` with members `members` (heartbeats in a store nobody runs:
/// coordinators see them unreachable, which is all these tests need).
fn group(name: &str, members: &[&str]) -> pb::GroupSpec {
    pb::GroupSpec {
        name: name.into(),
        members: members
            .iter()
            .map(|m| pb::MemberSpec {
                id: (*m).into(),
                heartbeat: "redis://127.0.0.1:1".into(),
                priority: 1,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn report(observer: &str, group: &str) -> pb::ReportRequest {
    pb::ReportRequest {
        observer: observer.into(),
        observer_incarnation: 1,
        views: vec![pb::GroupView { group: group.into(), ..Default::default() }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_beyond_the_per_connection_limit_are_refused_until_one_ends() {
    let _serial = serial();
    let mut cluster = InCluster::start(3, |c| c.max_watch_streams_per_connection = 2).await;
    let leader = cluster.wait_for_leader().await;
    let client = cluster.client();
    // One channel: every stream below shares its one connection.
    let raw = client.raw(&cluster.addr(leader)).unwrap();
    let watch = |group: &'static str| {
        let mut raw = raw.clone();
        async move { raw.watch(pb::WatchRequest { group: group.into() }).await.map(tonic::Response::into_inner) }
    };
    // The first once the node has caught up.
    let first = eventually("a first watch", || async { watch("a").await.ok() }).await;
    let second = watch("b").await.expect("a second watch on the connection");
    let e = watch("c").await.expect_err("a third watch on a connection allowed two");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().starts_with("watch streams: 2 per connection in use (max_watch_streams_per_connection)"),
        "the refusal does not name the limit: {}",
        e.message()
    );
    // Another connection has its own streams.
    let other = Client::new_with(&[cluster.addr(leader)], Transport::Insecure).unwrap();
    let mut other_raw = other.raw(&cluster.addr(leader)).unwrap();
    let elsewhere =
        other_raw.watch(pb::WatchRequest { group: "c".into() }).await.expect("a watch on another connection");
    // A stream that ends frees its slot (the server sees the reset shortly).
    drop(first);
    let third = eventually("a watch after one ended", || async { watch("c").await.ok() }).await;
    drop((second, third, elsewhere));
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_reports_beyond_the_rate_is_refused_naming_the_limit() {
    let _serial = serial();
    let mut cluster = InCluster::start(3, |c| c.max_reports_per_s = 2).await;
    cluster.wait_for_leader().await;
    let client = cluster.client();
    client.apply_group(group("g", &["a", "b"])).await.unwrap();
    // A report gets through once the leader knows the group.
    eventually("a's first report", || async { client.report_view(report("a", "g")).await.ok() }).await;
    // Thirty at once: at most the burst and what refills meanwhile pass.
    let flood = (0..30).map(|_| client.report_view(report("a", "g")));
    let results = futures::future::join_all(flood).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(refused.len() >= 10, "{} of 30 reports at once were refused at 2 a second: {refused:?}", refused.len());
    for e in &refused {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        let text = e.to_string();
        assert!(text.contains("observer a sent more than 2 a second (max_reports_per_s)"), "{text}");
    }
    // Another member has its own bucket; coordinators are not limited.
    client.report_view(report("b", "g")).await.expect("b's report while a is refused");
    for _ in 0..10 {
        client.report_view(report("coordinator-2", "g")).await.expect("a coordinator's report");
    }
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_only_by_the_clusters_coordinators_and_the_groups_members() {
    let _serial = serial();
    let mut cluster = InCluster::start(3, |_| {}).await;
    cluster.wait_for_leader().await;
    let client = cluster.client();
    client.apply_group(group("g", &["a", "b"])).await.unwrap();
    eventually("a member's report", || async { client.report_view(report("a", "g")).await.ok() }).await;
    client.report_view(report("coordinator-3", "g")).await.expect("a coordinator of the cluster reports");

    let e = client.report_view(report("coordinator-9", "g")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let text = e.to_string();
    assert!(text.contains("observer coordinator-9 is not a node of this cluster (nodes 1, 2, 3)"), "{text}");
    let e = client.report_view(report("zed", "g")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("observer zed is not a member of group g"), "{e}");
    // Of several groups, one the observer is not in refuses the report.
    client.apply_group(group("h", &["c"])).await.unwrap();
    let mut both = report("a", "g");
    both.views.push(pb::GroupView { group: "h".into(), ..Default::default() });
    let e = client.report_view(both).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("observer a is not a member of group h"), "{e}");
    cluster.stop_all().await;
}

//! The middle test tier: whole coordinator clusters in this process, each
//! node started with `server::run_with_listener` on a listener bound to port
//! 0 before any node starts (so every peer's address is known and no port is
//! ever picked and then lost to another process). Faster to start than the
//! process tests in `cluster.rs`, and it exercises the same handlers, the
//! leader's duties and shutdown: every node's `run` must return once its
//! shutdown future fires, with every task it spawned ended.
//!
//! Clusters run over mutual TLS (each test's own CA: identities, refusals,
//! the request limits) or, asked for, in plain text (`InCluster::start`).

// Each test holds the process-wide `serial()` guard for its whole run, on
// purpose: it serializes tests that each run on their own runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::{Duration, Instant};

use std::path::Path;

use common::serial;
use quorate::client::Client;
use quorate::client::cluster::cluster_view;
use quorate::config::ServerConfig;
use quorate::pb::v1 as pb;
use quorate::tls::certs::{self, IssueRequest};
use quorate::tls::config::{Tls, TlsFiles};
use quorate::tls::transport::Transport;
use quorate_core::access::Role;
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
    /// Plain text, asked for (`insecure`).
    async fn start(n: u64) -> Self {
        Self::start_over(n, |_| Transport::Insecure, |_| {}).await
    }

    /// With mutual TLS: a CA in `certs`, and node-N's certificate for each
    /// node, valid for 127.0.0.1.
    async fn start_tls(n: u64, certs: &Path) -> Self {
        Self::start_tls_with(n, certs, |_| {}).await
    }

    /// [`Self::start_tls`], each node's config changed by `tweak`.
    async fn start_tls_with(n: u64, certs: &Path, tweak: impl Fn(&mut ServerConfig)) -> Self {
        let node_tls = |id| Transport::Tls(tls_for(certs, &format!("node-{id}"), Role::Node, &[]));
        Self::start_over(n, node_tls, tweak).await
    }

    async fn start_over(n: u64, transport: impl Fn(u64) -> Transport, tweak: impl Fn(&mut ServerConfig)) -> Self {
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
            let transport = transport(id);
            // The config says what the transport is, as `quorate server`'s
            // does: the TLS files, or plain text asked for.
            let files = match &transport {
                Transport::Tls(t) => t.files().clone(),
                Transport::Insecure => TlsFiles { ca: "".into(), cert: "".into(), key: "".into() },
            };
            let mut config = ServerConfig {
                node_id: id,
                listen: addrs[i].clone(),
                data_dir: dir.path().join(format!("node-{id}")),
                peers: peers.join(","),
                insecure: !transport.is_tls(),
                tls_ca: files.ca,
                tls_cert: files.cert,
                tls_key: files.key,
                ..ServerConfig::default()
            };
            tweak(&mut config);
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(quorate::server::run_with_listener(config, listener, transport, async move {
                let _ = stopped.await;
            }));
            nodes.push(InNode { id, addr: addrs[i].clone(), stop: Some(stop), task: Some(task) });
        }
        Self { nodes, _dir: dir }
    }

    fn client(&self) -> Client {
        self.client_over(Transport::Insecure)
    }

    fn client_over(&self, transport: Transport) -> Client {
        let endpoints: Vec<String> = self.nodes.iter().filter(|n| n.task.is_some()).map(|n| n.addr.clone()).collect();
        Client::new_with(&endpoints, transport).unwrap().with_call_timeout(Duration::from_secs(2))
    }

    fn addr(&self, id: u64) -> String {
        self.nodes.iter().find(|n| n.id == id).unwrap().addr.clone()
    }

    /// Stops every node still running; each must stop cleanly.
    async fn stop_all(&mut self) {
        let running: Vec<u64> = self.nodes.iter().filter(|n| n.task.is_some()).map(|n| n.id).collect();
        for id in running {
            self.stop(id).await.unwrap_or_else(|e| panic!("node {id} stopped with an error: {e}"));
        }
    }

    async fn wait_for_leader(&self) -> u64 {
        self.wait_for_leader_over(Transport::Insecure).await
    }

    async fn wait_for_leader_over(&self, transport: Transport) -> u64 {
        let start = Instant::now();
        loop {
            if let Some(leader) = cluster_view(&self.client_over(transport.clone())).await.leader {
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

/// Issues `name`'s certificate from the CA in `dir` (valid for 127.0.0.1)
/// and loads it.
fn tls_for(dir: &Path, name: &str, role: Role, groups: &[&str]) -> Tls {
    let mut req = IssueRequest::new(name, role);
    req.groups = groups.iter().map(|g| (*g).to_owned()).collect();
    req.sans = vec!["127.0.0.1".into()];
    let (cert, key) = certs::issue(dir, &req).unwrap();
    Tls::load(TlsFiles { ca: dir.join(certs::CA_CERT), cert, key }).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_the_cluster_serves_its_certificates_and_refuses_strangers() {
    let _serial = serial();
    let ca = tempfile::tempdir().unwrap();
    certs::init(ca.path()).unwrap();
    let mut cluster = InCluster::start_tls(3, ca.path()).await;
    // The nodes elect a leader over TLS, and a client with a certificate
    // from the cluster's CA takes a lease.
    let member = Transport::Tls(tls_for(ca.path(), "db-1", Role::Member, &["svc"]));
    cluster.wait_for_leader_over(member.clone()).await;
    let client = cluster.client_over(member);
    let granted = client.acquire("svc", "db-1", 5_000, None).await.unwrap();
    assert!(granted.acquired, "{granted:?}");

    // Plain text, another CA's certificate and an expired one are refused.
    let refused = |c: Client| async move { c.get_lease("svc", pb::Consistency::Stale).await.unwrap_err() };
    // Plain text on a TLS port: the server refuses the handshake; the
    // client sees the connection fail (h2 reports it as a protocol error,
    // or as cancelled when the server's close comes first).
    let e = refused(cluster.client()).await;
    assert!(matches!(e.code(), Code::Unavailable | Code::Internal | Code::Cancelled), "plain text: {e}");
    let other = tempfile::tempdir().unwrap();
    certs::init(other.path()).unwrap();
    // Another CA: refused, and the client's error says why (whether its
    // attempts ran out or its time did first).
    let e = refused(cluster.client_over(Transport::Tls(tls_for(other.path(), "db-1", Role::Member, &["svc"])))).await;
    assert!(matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded), "another CA: {e}");
    assert!(e.to_string().contains("UnknownIssuer"), "another CA: {e}");
    let mut req = IssueRequest::new("old", Role::Reader);
    let now = time::OffsetDateTime::now_utc();
    (req.not_before, req.not_after) = (now - time::Duration::days(10), now - time::Duration::days(1));
    let (cert, key) = certs::issue(ca.path(), &req).unwrap();
    let files = TlsFiles { ca: ca.path().join(certs::CA_CERT), cert, key };
    let e = Tls::load(files.clone()).unwrap_err().to_string();
    assert!(e.contains("expired at"), "the caller is told its certificate expired: {e}");
    let expired = Tls::load_unchecked(files).unwrap();
    // Sent anyway, the server refuses it (over TLS 1.3 the client sees its
    // connection cancelled; the server logs why).
    let e = refused(cluster.client_over(Transport::Tls(expired))).await;
    assert!(matches!(e.code(), Code::Unavailable | Code::Cancelled | Code::Internal), "expired: {e}");

    for id in [1, 2, 3] {
        cluster.stop(id).await.unwrap_or_else(|e| panic!("node {id} stopped with an error: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_each_identity_may_do_only_what_its_role_allows() {
    let _serial = serial();
    let ca = tempfile::tempdir().unwrap();
    certs::init(ca.path()).unwrap();
    let mut cluster = InCluster::start_tls(3, ca.path()).await;
    let as_ = |name: &str, role: Role, groups: &[&str]| {
        cluster.client_over(Transport::Tls(tls_for(ca.path(), name, role, groups)))
    };
    let admin = as_("ops", Role::Admin, &[]);
    let member = as_("db-1", Role::Member, &["pair"]);
    let reader = as_("grafana", Role::Reader, &[]);
    let service = as_("svc-a", Role::Client, &["svc"]);
    cluster.wait_for_leader_over(Transport::Tls(tls_for(ca.path(), "probe", Role::Reader, &[]))).await;
    let denied = |e: quorate::client::ClientError, who: &str| {
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e}");
        e.to_string()
    };

    // An admin creates a group; a member may not.
    let spec = group("pair", &["db-1", "db-2"]);
    let e = denied(member.apply_group(spec.clone()).await.unwrap_err(), "member applies a group");
    assert!(e.contains("member db-1 of group pair may not create or change groups"), "{e}");
    admin.apply_group(spec).await.unwrap();

    // A member holds only its group's lease, as itself.
    let held = member.acquire("pair", "db-1", 5_000, None).await.unwrap();
    assert!(held.acquired);
    let epoch = held.lease.unwrap().epoch;
    denied(member.acquire("pair", "db-2", 5_000, None).await.unwrap_err(), "member as another holder");
    denied(member.acquire("svc", "db-1", 5_000, None).await.unwrap_err(), "member on another group");
    // Nobody else may release it: not another member, not a client, not an admin.
    let other = as_("db-2", Role::Member, &["pair"]);
    denied(other.release("pair", "db-1", epoch).await.unwrap_err(), "another member releases");
    denied(admin.release("pair", "db-1", epoch).await.unwrap_err(), "an admin releases");
    // Reports only as itself, of its own group.
    let view = |group: &str| pb::GroupView { group: group.into(), ..Default::default() };
    let report = |observer: &str, group: &str| pb::ReportRequest {
        observer: observer.into(),
        observer_incarnation: 1,
        views: vec![view(group)],
        ..Default::default()
    };
    let e = denied(member.report_view(report("coordinator-1", "pair")).await.unwrap_err(), "member as coordinator");
    assert!(e.contains("reports only as observer db-1 of group pair"), "{e}");
    denied(member.report_view(report("db-2", "pair")).await.unwrap_err(), "member as another member");
    // Steering is for admins.
    denied(member.switchover("pair", None, Duration::from_secs(1)).await.unwrap_err(), "member switches over");
    denied(member.set_maintenance("pair", true).await.unwrap_err(), "member sets maintenance");

    // A reader reads, and may not take a lease.
    reader.get_lease("pair", pb::Consistency::Linearizable).await.unwrap();
    reader.get_matrix("pair", pb::Consistency::Stale).await.unwrap();
    denied(reader.acquire("svc", "grafana", 5_000, None).await.unwrap_err(), "reader acquires");
    // A client takes leases of its groups, as itself.
    assert!(service.acquire("svc", "svc-a", 5_000, None).await.unwrap().acquired);
    denied(service.acquire("pair", "svc-a", 5_000, None).await.unwrap_err(), "client on another group");
    denied(service.acquire("svc", "svc-b", 5_000, None).await.unwrap_err(), "client as another holder");

    // A client certificate cannot reach the Raft RPCs.
    let channel = quorate::wire::lazy_channel_with(
        &cluster.nodes[0].addr,
        &Transport::Tls(tls_for(ca.path(), "svc-a", Role::Client, &["svc"])),
    )
    .unwrap();
    let mut raft = quorate::pb::raft::raft_client::RaftClient::new(channel);
    let e = raft.vote(quorate::pb::raft::RaftPayload { data: b"{}".to_vec() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(quorate::tls::caller::denials() > 0, "refusals are counted");

    for id in [1, 2, 3] {
        cluster.stop(id).await.unwrap_or_else(|e| panic!("node {id} stopped with an error: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_reports_and_names_are_refused_naming_the_limit_without_echoing_them() {
    let _serial = serial();
    let mut cluster = InCluster::start(3).await;
    cluster.wait_for_leader().await;
    let client = cluster.client();
    let view = |group: String| pb::GroupView { group, ..Default::default() };
    let many = pb::ReportRequest {
        observer: "coordinator-1".into(),
        observer_incarnation: 1,
        views: (0..1025).map(|i| view(format!("g{i}"))).collect(),
        ..Default::default()
    };
    let e = client.report_view(many).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("the limit is 1024 (MAX_VIEWS_PER_REPORT)"), "{e}");
    let long = pb::ReportRequest {
        observer: "o".repeat(1 << 20),
        observer_incarnation: 1,
        views: vec![view("g".into())],
        ..Default::default()
    };
    let e = client.report_view(long).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.to_string().len() < 300 && e.to_string().contains("the limit is 128 bytes"), "{e}");
    for id in [1, 2, 3] {
        cluster.stop(id).await.unwrap();
    }
}

// Request limits (issue 11): watch streams per connection, reports per
// identity and second, and reports only by the cluster's own coordinators
// and the groups' members, over mutual TLS. Each limit is set small so that
// a test reaches it at once; every refusal must name the limit.

/// Within this long a node catching up or an election stops refusing.
const SETTLE_WAIT: Duration = Duration::from_secs(20);

/// Calls `f` until it returns Some, within [`SETTLE_WAIT`].
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

/// A TLS cluster of three with `tweak`, its CA, and an admin client.
async fn limited_cluster(tweak: impl Fn(&mut ServerConfig)) -> (InCluster, tempfile::TempDir, Client) {
    let ca = tempfile::tempdir().unwrap();
    certs::init(ca.path()).unwrap();
    let cluster = InCluster::start_tls_with(3, ca.path(), tweak).await;
    let admin = Transport::Tls(tls_for(ca.path(), "ops", Role::Admin, &[]));
    cluster.wait_for_leader_over(admin.clone()).await;
    let client = cluster.client_over(admin);
    (cluster, ca, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_beyond_the_per_connection_limit_are_refused_until_one_ends() {
    let _serial = serial();
    let (mut cluster, ca, client) = limited_cluster(|c| c.max_watch_streams_per_connection = 2).await;
    let leader = cluster.wait_for_leader_over(Transport::Tls(tls_for(ca.path(), "r", Role::Reader, &[]))).await;
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
    let reader = Transport::Tls(tls_for(ca.path(), "r2", Role::Reader, &[]));
    let other = Client::new_with(&[cluster.addr(leader)], reader).unwrap();
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
    let (mut cluster, ca, admin) = limited_cluster(|c| c.max_reports_per_s = 2).await;
    admin.apply_group(group("g", &["a", "b"])).await.unwrap();
    let as_identity = |name: &str, role: Role, groups: &[&str]| {
        cluster.client_over(Transport::Tls(tls_for(ca.path(), name, role, groups)))
    };
    let a = as_identity("a", Role::Member, &["g"]);
    // A report gets through once the leader knows the group.
    eventually("a's first report", || async { a.report_view(report("a", "g")).await.ok() }).await;
    // Thirty at once: at most the burst and what refills meanwhile pass.
    let flood = (0..30).map(|_| a.report_view(report("a", "g")));
    let results = futures::future::join_all(flood).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(refused.len() >= 10, "{} of 30 reports at once were refused at 2 a second: {refused:?}", refused.len());
    for e in &refused {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        let text = e.to_string();
        assert!(text.contains("observer a sent more than 2 a second (max_reports_per_s)"), "{text}");
    }
    // Another member's certificate has its own bucket; nodes are not limited.
    let b = as_identity("b", Role::Member, &["g"]);
    b.report_view(report("b", "g")).await.expect("b's report while a is refused");
    let node_2 = as_identity("node-2", Role::Node, &[]);
    for _ in 0..10 {
        node_2.report_view(report("coordinator-2", "g")).await.expect("a coordinator's report");
    }
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_only_by_the_clusters_coordinators_and_the_groups_members() {
    let _serial = serial();
    let (mut cluster, ca, admin) = limited_cluster(|_| {}).await;
    admin.apply_group(group("g", &["a", "b"])).await.unwrap();
    let as_identity = |name: &str, role: Role, groups: &[&str]| {
        cluster.client_over(Transport::Tls(tls_for(ca.path(), name, role, groups)))
    };
    let a = as_identity("a", Role::Member, &["g"]);
    eventually("a member's report", || async { a.report_view(report("a", "g")).await.ok() }).await;
    as_identity("node-3", Role::Node, &[])
        .report_view(report("coordinator-3", "g"))
        .await
        .expect("a coordinator of the cluster reports");

    // A node certificate of a node the cluster does not have.
    let e = as_identity("node-9", Role::Node, &[]).report_view(report("coordinator-9", "g")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let text = e.to_string();
    assert!(text.contains("observer coordinator-9 is not a node of this cluster (nodes 1, 2, 3)"), "{text}");
    // A member certificate of g for a member g does not have.
    let e = as_identity("zed", Role::Member, &["g"]).report_view(report("zed", "g")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("observer zed is not a member of group g"), "{e}");
    // A member reporting about another group is refused by its identity
    // first (and, over plain text, as no member of it: unit-tested).
    admin.apply_group(group("h", &["c"])).await.unwrap();
    let mut both = report("a", "g");
    both.views.push(pb::GroupView { group: "h".into(), ..Default::default() });
    let e = a.report_view(both).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    cluster.stop_all().await;
}

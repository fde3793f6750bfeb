//! A `quorate server` process: one Raft node plus the gRPC API.
//!
//! [`run`] owns everything it starts: the gRPC server, the cluster-formation
//! task, the leader-duties task, the catch-up tasks and the snapshot
//! trigger. On shutdown it stops accepting calls, ends long-lived streams,
//! waits (bounded) for its tasks, then shuts Raft down. If Raft itself stops
//! (a storage error, a failed snapshot install), `run` returns an error so
//! that the process exits non-zero and its supervisor restarts it: a node
//! that keeps running without Raft is alive to every health check and
//! useless to the cluster.

pub mod catchup;
mod elections;
pub mod node;
mod observers;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::type_config::async_runtime::watch::WatchReceiver as _;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use quorate_core::Op;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{Instrument, error, info, info_span, warn};

use self::catchup::{IdentityError, Past, Readiness};
pub use self::node::{Node, ReadConsistency};
use crate::api::CoordinatorService;
use crate::config::ServerConfig;
use crate::pb::v1::StatusRequest;
use crate::pb::v1::coordinator_client::CoordinatorClient;
use crate::raft::log_store::{LogStore, StoreError, is_empty, open_database};
use crate::raft::network::{NetworkFactory, lazy_channel};
use crate::raft::service::RaftService;
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{NodeClock, Raft};

/// How long shutdown waits for in-flight calls and tasks before it stops
/// waiting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid Raft configuration: {0}")]
    RaftConfig(String),
    #[error("Raft failed to start: {0}")]
    Raft(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("Raft stopped: {0}; exiting so that the supervisor restarts this node")]
    RaftStopped(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// openraft's configuration, from ours.
pub fn openraft_config(c: &ServerConfig) -> Result<openraft::Config, ServerError> {
    let config = openraft::Config {
        cluster_name: "quorate".into(),
        heartbeat_interval: c.heartbeat_interval_ms,
        election_timeout_min: c.election_timeout_min_ms,
        election_timeout_max: c.election_timeout_max_ms,
        // Snapshots are small; give their transfer room on a busy machine.
        install_snapshot_timeout: 5_000,
        // By count here; by bytes and time in `snapshot_duties`.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(c.snapshot_every_entries),
        // Must exceed the snapshot interval, or a snapshot may not cure lag.
        replication_lag_threshold: c.snapshot_every_entries * 2,
        // Entries kept below a snapshot for followers slightly behind; one
        // further behind gets the snapshot. Bounded by count because
        // entries are bounded in size (raft::MAX_ENTRY_BYTES).
        max_in_snapshot_log_to_keep: 200,
        // Pre-Vote: a node that cannot win does not bump terms and disturb
        // a working leader (flapping links, a rejoining node).
        enable_pre_vote: Some(true),
        // Partial partitions: a leader that lost its quorum stops sending
        // heartbeats so the connected majority can elect (openraft #2080).
        quorum_loss_probe_interval: Some(c.election_timeout_max_ms * 2),
        // The state machine is rebuilt from snapshot + committed log at
        // start; a restarted node must not resume as leader with it.
        enable_leader_restore: Some(false),
        // Replication backs off after an append that timed out unanswered.
        // openraft's default starts at 200 ms and doubles to 1 s: under
        // packet loss every lost segment then stalls that follower's
        // commits for longer than a lease renewal can wait. Retry soon (on
        // the peer's next connection, see `raft::network::LANES`), and only
        // back off far for a follower that keeps failing.
        backoff: "25ms 50ms ...1s".into(),
        // A follower that lost its data answers with a log shorter than the
        // leader last matched. openraft's default then panics the leader's
        // Raft core (one lost disk would cost the cluster its leader); with
        // this it replicates to that follower from scratch. What openraft
        // warns about, that such a node may vote with a log it no longer
        // has, is handled here: a node that lost its data does not vote
        // until it is caught up (`catchup`).
        allow_log_reversion: Some(true),
        ..Default::default()
    };
    config.validate().map_err(|e| ServerError::RaftConfig(e.to_string()))
}

/// Runs a server until `shutdown` completes.
pub async fn run(config: ServerConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    config.validate()?;
    let config = Arc::new(config);
    let id = config.node_id;
    let peers = config.peer_map();
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| ServerError::DataDir { path: config.data_dir.display().to_string(), source })?;
    // Bind first: a port conflict is the most common start-up failure and
    // should be reported before anything else happens.
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen.clone(), source })?;

    let identity = catchup::read_identity(&config.data_dir, id)?;
    let db = open_database(&config.data_dir.join("raft.redb"))?;
    let past = match (is_empty(&db)?, identity) {
        (false, _) => {
            catchup::write_identity(&config.data_dir, id)?;
            Past::Intact
        }
        (true, Some(_)) => {
            error!(
                "this node's data directory says it held Raft data ({}), but its Raft store is empty: \
                 the data was lost (raft.redb deleted or emptied). It neither votes nor serves reads until \
                 the leader has caught it up. See README: \"A node that lost its data\"",
                catchup::IDENTITY_FILE
            );
            Past::Lost
        }
        (true, None) => Past::Unknown,
    };
    let clock = NodeClock::new(id);
    let sm = StateMachineStore::new(db.clone(), clock.clone());
    let reader = sm.reader();
    let log_store = LogStore::new(db);
    let appended = log_store.appended_bytes();
    let raft = Raft::new(id, Arc::new(openraft_config(&config)?), NetworkFactory::new(id), log_store, sm)
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;

    let (stop_tx, stopping) = watch::channel(false);
    let readiness = Arc::new(Readiness::new(past));
    let node = Node {
        id,
        raft: raft.clone(),
        reader,
        clock,
        config: config.clone(),
        peers,
        stopping,
        readiness: readiness.clone(),
    };
    info!(node_id = id, listen = %config.listen, data_dir = %config.data_dir.display(), past = ?past, "quorate server starting");
    if config.test_only_skip_lease_wait {
        warn!("UNSAFE test-only setting: leases are granted without waiting for expiry");
    }

    let mut tasks = JoinSet::new();
    tasks.spawn(form_cluster(node.clone()).instrument(info_span!("form_cluster", node_id = id)));
    tasks.spawn(leader_duties(node.clone()).instrument(info_span!("leader_duties", node_id = id)));
    tasks.spawn(observers::observe_groups(node.clone()).instrument(info_span!("observers", node_id = id)));
    tasks.spawn(elections::run_elections(node.clone()).instrument(info_span!("elections", node_id = id)));
    tasks.spawn(catchup::catch_up(node.clone()).instrument(info_span!("catch_up", node_id = id)));
    if past == Past::Unknown {
        tasks.spawn(catchup::probe_peers(node.clone()).instrument(info_span!("probe_peers", node_id = id)));
    }
    tasks.spawn(snapshot_duties(node.clone(), appended).instrument(info_span!("snapshots", node_id = id)));

    let (coordinator, batcher) = CoordinatorService::new(node.clone());
    let mut server_stop = node.stopping.clone();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(RaftService::new(raft.clone(), id, readiness).into_server())
        .add_service(coordinator.into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            crate::shutdown::stopped(&mut server_stop).await;
        });
    // Boxed so it can be dropped (with every service handle in it) below.
    let mut server = Box::pin(server);

    let result = tokio::select! {
        res = &mut server => res.map_err(ServerError::from),
        () = shutdown => Ok(()),
        reason = raft_stopped(&raft) => {
            error!("Raft stopped: {reason}; shutting down and exiting non-zero so that the supervisor restarts this node");
            Err(ServerError::RaftStopped(reason))
        }
    };
    info!(node_id = id, "shutting down");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
        warn!("gRPC server did not stop within {SHUTDOWN_GRACE:?}; dropping open calls");
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    // The server (and with it every batcher handle) is gone: the batcher
    // drains what it has and ends.
    drop(server);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, batcher).await;
    if let Err(e) = raft.shutdown().await {
        warn!("raft shutdown: {e}");
    }
    info!(node_id = id, "stopped");
    result
}

/// Forms the cluster once: the node with the lowest id initializes it with
/// every peer, unless it already is, or a peer reports it already belongs to
/// a formed cluster (this node's data was lost; it must rejoin, not found a
/// second cluster). Other nodes wait to be contacted by the leader.
async fn form_cluster(node: Node) {
    let lowest = node.peers.keys().next().copied();
    if lowest != Some(node.id) {
        return;
    }
    match node.raft.is_initialized().await {
        Ok(true) => return,
        Ok(false) => {}
        Err(e) => {
            warn!("cannot tell whether the cluster is initialized: {e}");
            return;
        }
    }
    for (id, addr) in node.peers.iter().filter(|(id, _)| **id != node.id) {
        if peer_initialized(addr).await == Some(true) {
            warn!(peer = id, "peer already belongs to a formed cluster; not initializing, waiting to be contacted");
            return;
        }
    }
    let members: BTreeMap<u64, BasicNode> =
        node.peers.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
    match node.raft.initialize(members).await {
        Ok(()) => info!(members = ?node.peers, "cluster initialized"),
        Err(e) => warn!("initialize: {e}"),
    }
}

/// Asks a peer whether it is initialized; `None` when it cannot be reached.
async fn peer_initialized(addr: &str) -> Option<bool> {
    let channel = lazy_channel(addr).ok()?;
    let mut client = CoordinatorClient::new(channel);
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(Duration::from_secs(1));
    let resp = tokio::time::timeout(Duration::from_secs(2), client.status(req)).await.ok()?.ok()?;
    Some(resp.into_inner().initialized)
}

/// Work only the leader does. For now: at the start of each term, commit a
/// `LeaderStart` so the lease clock moves to this leader at once.
async fn leader_duties(node: Node) {
    let mut metrics = node.raft.metrics();
    let mut started_term: Option<u64> = None;
    let mut stopping = node.stopping.clone();
    loop {
        let (state, term) = {
            let m = metrics.borrow_watched();
            (m.state, m.current_term)
        };
        if state == ServerState::Leader && started_term != Some(term) {
            match node.propose(Op::LeaderStart).instrument(info_span!("leader_start", term)).await {
                Ok(_) => {
                    info!(term, "leading; lease clock moved to this node");
                    started_term = Some(term);
                }
                Err(e) => {
                    // Right after an election openraft may still refuse
                    // writes for a moment; holders are waiting for this
                    // leader, so retry soon (bounded by the term: the state
                    // is read again first).
                    warn!(term, "could not commit LeaderStart: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
    }
}

/// Resolves when this node's Raft core has stopped on its own (a storage
/// error, a failed snapshot install), with the reason.
async fn raft_stopped(raft: &Raft) -> String {
    let mut metrics = raft.metrics();
    loop {
        {
            let m = metrics.borrow_watched();
            if let Err(fatal) = &m.running_state {
                return fatal.to_string();
            }
            if m.state == ServerState::Shutdown {
                return "the Raft core shut down".to_owned();
            }
        }
        if metrics.changed().await.is_err() {
            return "the Raft core ended".to_owned();
        }
    }
}

/// How often the snapshot trigger looks at the log.
const SNAPSHOT_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Builds a snapshot when the log since the last one holds
/// `snapshot_max_log_bytes`, or `snapshot_every_ms` passed with anything
/// applied since (openraft itself snapshots every `snapshot_every_entries`).
/// A snapshot lets the log be purged: without these, a few large entries a
/// second grew the log, and with it disk and memory, for many minutes.
async fn snapshot_duties(node: Node, appended: Arc<AtomicU64>) {
    let every = Duration::from_millis(node.config.snapshot_every_ms);
    let max_bytes = node.config.snapshot_max_log_bytes;
    let metrics = node.raft.metrics();
    let mut stopping = node.stopping.clone();
    let mut last = metrics.borrow_watched().snapshot;
    let mut since = Instant::now();
    let mut bytes_at = appended.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(SNAPSHOT_CHECK_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
        let (snapshot, applied) = {
            let m = metrics.borrow_watched();
            (m.snapshot, m.last_applied)
        };
        if snapshot != last {
            last = snapshot;
            since = Instant::now();
            bytes_at = appended.load(Ordering::Relaxed);
            continue;
        }
        let behind = applied.map_or(0, |a| a.index + 1) > snapshot.map_or(0, |s| s.index + 1);
        let bytes = appended.load(Ordering::Relaxed).saturating_sub(bytes_at);
        let reason = if bytes >= max_bytes {
            "log bytes"
        } else if since.elapsed() >= every {
            "time"
        } else {
            continue;
        };
        if !behind {
            continue;
        }
        info!(reason, log_bytes = bytes, since_ms = since.elapsed().as_millis() as u64, "building a snapshot");
        if let Err(e) = node.raft.trigger().snapshot().await {
            warn!("cannot trigger a snapshot: {e}");
        }
        // Count afresh: a failed snapshot is tried again after as much more.
        since = Instant::now();
        bytes_at = appended.load(Ordering::Relaxed);
    }
}

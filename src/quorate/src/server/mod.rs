//! A `quorate server` process: one Raft node plus the gRPC API (and, with
//! `sentinel_listen`, the Sentinel-compatible endpoint, one more owned task).
//!
//! [`run`] owns everything it starts: the gRPC server, the cluster-formation
//! task, the leader-duties task, the catch-up tasks, the standing check (a
//! removed node stops, see [`standing`]) and the snapshot trigger. On shutdown it stops accepting calls, ends long-lived streams,
//! waits (bounded) for its tasks, then shuts Raft down. If Raft itself stops
//! (a storage error, a failed snapshot install), `run` returns an error so
//! that the process exits non-zero and its supervisor restarts it: a node
//! that keeps running without Raft is alive to every health check and
//! useless to the cluster.

pub mod catchup;
mod elections;
pub mod health;
pub mod metrics;
mod observers;
mod restore;
mod standing;
pub mod systemd;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quorate_core::Op;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

use self::catchup::IdentityError;
use self::metrics::{GrpcMetricsLayer, ServerMetrics};
use crate::api::CoordinatorService;
use crate::config::ServerConfig;
use crate::notify::Notifier;
use crate::pb::v1::coordinator_server::CoordinatorServer;
use crate::raft::log_store::{StoreError, is_empty, open_database};
use crate::raft::node::{StartError, Started};
use crate::raft::{NodeClock, Past, RaftNode, RaftView, Readiness, Role};
use crate::redis_access::RedisAccess;
use crate::service::batch::Batcher;
use crate::service::watch::WatchSlots;
pub use crate::service::{Node, ReadConsistency};
use crate::tls::transport::{Transport, incoming};

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
    #[error(transparent)]
    Raft(#[from] StartError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("Raft stopped: {0}; exiting so that the supervisor restarts this node")]
    RaftStopped(String),
    #[error("{0}")]
    Removed(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::config::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("{0}")]
    Restore(String),
}

/// Runs a server until `shutdown` completes, listening on `config.listen`.
pub async fn run(config: ServerConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    config.validate()?;
    let warning = format!(
        "serving plain text (--insecure): anyone who can reach {} can report, take leases and switch over",
        config.listen
    );
    let transport = Transport::from_files(config.tls_files()?, &warning)?;
    // Bind first: a port conflict is the most common start-up failure and
    // should be reported before anything else happens.
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen.clone(), source })?;
    // The process's own notifier: `READY=1`, `STOPPING=1` and watchdog
    // keep-alives to systemd when it set NOTIFY_SOCKET (crate::notify).
    let notifier = Notifier::from_env();
    let result = serve(config, listener, transport, shutdown, notifier.clone()).await;
    notifier.close();
    result
}

/// Runs a server on a listener the caller bound (tests bind port 0 first,
/// so that every peer's address is known before any node starts, and run
/// whole clusters in one process). `config.listen` must be the listener's
/// address as peers reach it.
pub async fn run_with_listener(
    config: ServerConfig,
    listener: TcpListener,
    transport: Transport,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    // Not a process of its own (in-process tests): nothing to tell systemd.
    serve(config, listener, transport, shutdown, Notifier::disabled()).await
}

/// [`run_with_listener`], telling `notifier` when it is ready, stopping and
/// alive.
async fn serve(
    config: ServerConfig,
    listener: TcpListener,
    transport: Transport,
    shutdown: impl Future<Output = ()>,
    notifier: Arc<Notifier>,
) -> Result<(), ServerError> {
    config.validate()?;
    // Read once: every heartbeat store connection of this node uses it.
    let redis = Arc::new(config.redis_options().load_from_env()?);
    let config = Arc::new(config);
    let id = config.node_id;
    // Before anything is created in data_dir: a restore needs it empty.
    let seed = restore::prepare(&config)?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| ServerError::DataDir { path: config.data_dir.display().to_string(), source })?;

    let sentinel = bind_sentinel(&config, &transport).await?;
    let (db, past) = open_store(&config, seed)?;
    let clock = NodeClock::new(id);
    let http = bind_http(&config).await?;
    let Started { raft, reader, appended, commit_seconds } =
        RaftNode::start(&config, transport.clone(), db, clock.clone()).await?;
    let metrics = Arc::new(ServerMetrics::new(commit_seconds));

    let (stop_tx, stopping) = watch::channel(false);
    let readiness = Arc::new(Readiness::new(past));
    let node = Node {
        id,
        raft: raft.clone(),
        reader,
        clock,
        config: config.clone(),
        peers: config.peer_map(),
        stopping,
        readiness: readiness.clone(),
        transport: transport.clone(),
        watches: WatchSlots::new(config.max_watch_streams, config.max_watch_streams_per_connection),
        membership_lock: Arc::default(),
        renewals: renewal_ledger(&config),
    };
    info!(node_id = id, listen = %config.listen, data_dir = %config.data_dir.display(), past = ?past, "quorate server starting");
    if config.test_only_skip_lease_wait {
        warn!("UNSAFE test-only setting: leases are granted without waiting for expiry");
    }

    // One batcher for every report: agents' over gRPC and this node's own.
    let (reports, batcher) = Batcher::start(node.clone());
    let mut tasks = spawn_tasks(&node, past, appended, reports.clone(), redis);
    let removed = spawn_standing(&mut tasks, &node);
    spawn_observability(&mut tasks, &node, &metrics, http);
    tasks.spawn(systemd::notify_ready(node.clone(), notifier.clone()).instrument(info_span!("systemd", node_id = id)));
    tasks.spawn(systemd::watchdog(node.clone(), notifier.clone()).instrument(info_span!("systemd", node_id = id)));
    if let Some((listener, settings)) = sentinel {
        let serve = crate::sentinel::serve(node.clone(), listener, settings);
        tasks.spawn(serve.instrument(info_span!("sentinel", node_id = id)));
    }
    let coordinator = CoordinatorService::new(node.clone(), reports);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = crate::pb::reflection().map_err(ServerError::Reflection)?;
    let mut server_stop = node.stopping.clone();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .layer(GrpcMetricsLayer::new(metrics.clone()))
        .add_service(raft.service(readiness, node.reader.clone()))
        .add_service(coordinator.into_server())
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming(listener, transport), async move {
            crate::shutdown::stopped(&mut server_stop).await;
        });
    // Boxed so it can be dropped (with every service handle in it) below.
    let mut server = Box::pin(server);

    let result = tokio::select! {
        res = &mut server => res.map_err(ServerError::from),
        () = shutdown => Ok(()),
        reason = raft.stopped() => {
            error!("Raft stopped: {reason}; shutting down and exiting non-zero so that the supervisor restarts this node");
            Err(ServerError::RaftStopped(reason))
        }
        why = removed => Err(ServerError::Removed(why)),
    };
    info!(node_id = id, "shutting down");
    notifier.stopping();
    health.set_not_serving::<CoordinatorServer<CoordinatorService>>().await;
    let _ = stop_tx.send(true);
    wind_down(server, tasks, batcher, &raft).await;
    info!(node_id = id, "stopped");
    result
}

/// Starts the standing check; the future resolves, with the reason, only
/// if this node was removed from the cluster (see [`standing`]).
fn spawn_standing(tasks: &mut JoinSet<()>, node: &Node) -> impl Future<Output = String> + use<> {
    let (removed_tx, removed_rx) = tokio::sync::oneshot::channel();
    tasks.spawn(standing::watch(node.clone(), removed_tx).instrument(info_span!("standing", node_id = node.id)));
    // A dropped sender (the task ended at shutdown) is not a removal.
    async move {
        match removed_rx.await {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    }
}

/// After the stop signal: the gRPC server gets a grace period for open
/// calls, every task ends, the batcher drains, Raft shuts down.
async fn wind_down<S: Future>(
    mut server: std::pin::Pin<Box<S>>,
    mut tasks: JoinSet<()>,
    batcher: impl Future,
    raft: &RaftNode,
) {
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
}

/// Binds the Sentinel-compatible endpoint when `sentinel_listen` is set,
/// and reads its password: both fail the start, naming what is wrong. With
/// `sentinel_tls` it serves the certificates `transport` loaded for the
/// gRPC port (one load, one reload for both).
async fn bind_sentinel(
    config: &ServerConfig,
    transport: &Transport,
) -> Result<Option<(TcpListener, crate::sentinel::Settings)>, ServerError> {
    use crate::sentinel::{SentinelTls, Settings};
    use crate::tls::config::ClientCerts;
    if config.sentinel_listen.is_empty() {
        return Ok(None);
    }
    let password = config.sentinel_password()?;
    let tls = match (config.sentinel_tls, transport) {
        (false, _) => None,
        (true, Transport::Tls(tls)) => {
            let clients = if config.sentinel_tls_client_auth { ClientCerts::Required } else { ClientCerts::Optional };
            Some(SentinelTls { tls: tls.clone(), clients })
        }
        // validate() refuses sentinel_tls with insecure; this is a caller
        // of run_with_listener handing a plain-text transport to a config
        // that has certificates.
        (true, Transport::Insecure) => {
            return Err(crate::config::ConfigError::Invalid {
                field: "sentinel_tls",
                message: "needs this node's TLS certificates, and the node runs in plain text".into(),
            }
            .into());
        }
    };
    let listener = TcpListener::bind(&config.sentinel_listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.sentinel_listen.clone(), source })?;
    let max_connections = usize::try_from(config.sentinel_max_connections).unwrap_or(usize::MAX);
    Ok(Some((listener, Settings { password, max_connections, tls })))
}

/// Opens the Raft store and tells what this node knows of its past: an
/// intact store, or an empty one whose data was lost (the identity file
/// says it held data) or whose history is not known yet. A restored state
/// (`seed`) is written into the new store first: the node then starts as a
/// member of its new cluster, intact.
fn open_store(
    config: &ServerConfig,
    seed: Option<quorate_core::Machine>,
) -> Result<(Arc<redb::Database>, Past), ServerError> {
    let id = config.node_id;
    let identity = catchup::read_identity(&config.data_dir, id)?;
    let db = open_database(&config.data_dir.join("raft.redb"))?;
    if let Some(machine) = seed {
        crate::raft::state_machine::seed(&db, id, &config.peer_map(), machine)?;
    }
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
    Ok((db, past))
}

/// Binds the HTTP health and metrics listener (`http_listen`), if one is
/// configured.
async fn bind_http(config: &ServerConfig) -> Result<Option<TcpListener>, ServerError> {
    if config.http_listen.is_empty() {
        return Ok(None);
    }
    crate::http::bind(&config.http_listen)
        .await
        .map(Some)
        .map_err(|source| ServerError::Bind { addr: config.http_listen.clone(), source })
}

/// Starts the metrics' watchers and the HTTP listener (when bound); they
/// end when the node stops.
fn spawn_observability(tasks: &mut JoinSet<()>, node: &Node, metrics: &Arc<ServerMetrics>, http: Option<TcpListener>) {
    let id = node.id;
    tasks.spawn(metrics::watch_leader(node.clone(), metrics.clone()).instrument(info_span!("metrics", node_id = id)));
    tasks.spawn(metrics::watch_leases(node.clone(), metrics.clone()).instrument(info_span!("metrics", node_id = id)));
    if let Some(listener) = http {
        let handler = health::CoordinatorHttp { node: node.clone(), metrics: metrics.clone() };
        tasks.spawn(
            crate::http::serve(listener, handler, node.stopping.clone()).instrument(info_span!("http", node_id = id)),
        );
    }
}

/// Starts every task the server owns; they end when the node stops.
fn spawn_tasks(
    node: &Node,
    past: Past,
    appended: Arc<AtomicU64>,
    reports: Batcher,
    redis: Arc<RedisAccess>,
) -> JoinSet<()> {
    let id = node.id;
    let mut tasks = JoinSet::new();
    tasks.spawn(form_cluster(node.clone()).instrument(info_span!("form_cluster", node_id = id)));
    tasks.spawn(leader_duties(node.clone()).instrument(info_span!("leader_duties", node_id = id)));
    tasks.spawn(
        observers::observe_groups(node.clone(), reports, redis).instrument(info_span!("observers", node_id = id)),
    );
    tasks.spawn(elections::run_elections(node.clone()).instrument(info_span!("elections", node_id = id)));
    tasks.spawn(catchup::catch_up(node.clone()).instrument(info_span!("catch_up", node_id = id)));
    if past == Past::Unknown {
        tasks.spawn(catchup::probe_peers(node.clone()).instrument(info_span!("probe_peers", node_id = id)));
    }
    tasks.spawn(snapshot_duties(node.clone(), appended).instrument(info_span!("snapshots", node_id = id)));
    if !node.config.durable_renewals {
        tasks.spawn(flush_renewals(node.clone()).instrument(info_span!("renewals", node_id = id)));
    }

    tasks
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
        if catchup::ask(addr, &node.transport).await.is_some_and(|a| a.initialized) {
            warn!(peer = id, "peer already belongs to a formed cluster; not initializing, waiting to be contacted");
            return;
        }
    }
    match node.raft.initialize(&node.peers).await {
        Ok(()) => info!(members = ?node.peers, "cluster initialized"),
        Err(e) => warn!("initialize: {e}"),
    }
}

/// Work only the leader does. For now: at the start of each term, commit a
/// `LeaderStart` so the lease clock moves to this leader at once.
async fn leader_duties(node: Node) {
    let mut watch = node.raft.watch();
    let mut started_term: Option<u64> = None;
    let mut stopping = node.stopping.clone();
    loop {
        let view = watch.view();
        let (role, term) = (view.role, view.term);
        if role == Role::Leader && started_term != Some(term) {
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
            changed = watch.changed() => if !changed { return },
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
    }
}

/// The leader's ledger of unlogged renewals: one entry per group at most.
fn renewal_ledger(config: &ServerConfig) -> Arc<std::sync::Mutex<quorate_core::renewals::RenewalLedger>> {
    let max = usize::try_from(config.max_groups).unwrap_or(usize::MAX);
    Arc::new(std::sync::Mutex::new(quorate_core::renewals::RenewalLedger::new(max)))
}

/// The most renewals in one flushed entry (about 100 bytes each, far below
/// `raft::MAX_ENTRY_BYTES`).
const FLUSH_BATCH: usize = 1_024;

/// While leading: every `renewal_flush_interval_ms`, logs the renewals
/// confirmed without a log entry since the last flush (`Op::Renewed` at
/// each one's receipt time), so that the replicated leases keep up with
/// their holders. Bookkeeping only: what makes an unlogged renewal safe is
/// its quorum round and the leader's grant wait (`quorate_core::renewals`).
/// A failed flush is not retried as such: the next renewal of each lease
/// marks it again.
async fn flush_renewals(node: Node) {
    let mut tick = tokio::time::interval(Duration::from_millis(node.config.renewal_flush_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stopping = node.stopping.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
        if !node.raft.is_leader() {
            continue;
        }
        // Bounded: at most as many batches as groups can have leases.
        loop {
            let ops = node.reader.with_machine(|m, _| {
                node.renewals.lock().unwrap_or_else(|p| p.into_inner()).take_flush(m, FLUSH_BATCH)
            });
            let full = ops.len() == FLUSH_BATCH;
            if ops.is_empty() {
                break;
            }
            if let Err(e) = node.propose_all(ops).await {
                // Followers see these leases lag until their next renewals.
                warn!("could not log a batch of renewals: {e}");
                break;
            }
            if !full {
                break;
            }
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
    let watch = node.raft.watch();
    let mut stopping = node.stopping.clone();
    let mut last = watch.view().snapshot;
    let mut since = Instant::now();
    let mut bytes_at = appended.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(SNAPSHOT_CHECK_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
        let RaftView { snapshot, applied, .. } = watch.view();
        if snapshot != last {
            last = snapshot;
            since = Instant::now();
            bytes_at = appended.load(Ordering::Relaxed);
            continue;
        }
        // None (nothing applied, no snapshot) orders below every index.
        let behind = applied > snapshot;
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
        if let Err(e) = node.raft.trigger_snapshot().await {
            warn!("cannot trigger a snapshot: {e}");
        }
        // Count afresh: a failed snapshot is tried again after as much more.
        since = Instant::now();
        bytes_at = appended.load(Ordering::Relaxed);
    }
}

//! A coordinator's Prometheus metrics (`/metrics` on its HTTP listener).
//!
//! Counters are kept as things happen: leader changes (a task watching
//! Raft), lease grants and expiries (a task reading the state machine's
//! changes), gRPC calls (a tower layer on the gRPC server), and the log
//! store's commit latency. Everything else is read at scrape time from the
//! same places the API answers from: the [`RaftNode`](crate::raft::RaftNode)
//! facade for Raft, and the service layer for groups (a stale read of this
//! node's state, once it has caught up), so that a metric never holds a
//! second copy of a rule. Names follow Prometheus conventions (`quorate_`
//! prefix, base units in the name, `_total` for counters); README
//! "Metrics" lists them all.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use quorate_core::election::{MoveKind, Role as DataRole};
use quorate_core::machine::ChangeKind;
use quorate_core::verdict::Verdict;
use tokio::sync::broadcast;

use crate::raft::Role;
use crate::service::{Node, ReadConsistency};
use crate::tls::caller::Caller;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberLabel {
    group: String,
    member: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    group: String,
    member: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    group: String,
    member: String,
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MoveLabel {
    group: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// The labels of a gRPC call, as go-grpc-prometheus names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabel {
    pub grpc_service: String,
    pub grpc_method: String,
    pub grpc_code: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The metrics one coordinator keeps between scrapes.
#[derive(Debug)]
pub struct ServerMetrics {
    leader_changes: Counter,
    grpc: Family<GrpcLabel, Counter>,
    commit_seconds: Histogram,
    lease_grants: Family<GroupLabel, Counter>,
    lease_expiries: Family<GroupLabel, Counter>,
    moves: Family<MoveLabel, Counter>,
    /// Per group, the revision of the last history entry counted in `moves`.
    moves_seen: Mutex<BTreeMap<String, u64>>,
    /// This process's start on the wall clock: only moves decided since
    /// are counted.
    started_wall_ms: u64,
}

impl ServerMetrics {
    /// `commit_seconds`: the log store's commit latency histogram.
    pub fn new(commit_seconds: Histogram) -> Self {
        let started_wall_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self {
            leader_changes: Counter::default(),
            grpc: Family::default(),
            commit_seconds,
            lease_grants: Family::default(),
            lease_expiries: Family::default(),
            moves: Family::default(),
            moves_seen: Mutex::new(BTreeMap::new()),
            started_wall_ms,
        }
    }

    /// Counts one gRPC call.
    pub fn count_call(&self, labels: GrpcLabel) {
        self.grpc.get_or_create(&labels).inc();
    }

    /// Renders every metric of `node` as OpenMetrics text.
    pub async fn render(&self, node: &Node) -> String {
        let mut reg = Registry::with_prefix("quorate");
        self.register_kept(&mut reg);
        raft_metrics(&mut reg, node);
        self.group_metrics(&mut reg, node).await;
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }

    fn register_kept(&self, reg: &mut Registry) {
        reg.register(
            "raft_leader_changes_seen",
            "Changes of the Raft leader this node has seen since it started",
            self.leader_changes.clone(),
        );
        reg.register_with_unit(
            "raft_log_commit_duration",
            "How long appending entries to the Raft log took, fsync included",
            Unit::Seconds,
            self.commit_seconds.clone(),
        );
        reg.register(
            "grpc_server_handled",
            "gRPC calls this node answered, by service, method and status code (from the response head: a \
             stream that fails later counts as OK)",
            self.grpc.clone(),
        );
        reg.register("lease_grants", "Leases granted (new epochs), applied on this node", self.lease_grants.clone());
        reg.register(
            "lease_expired",
            "Leases that ended by expiry rather than release, counted when the next grant shows it",
            self.lease_expiries.clone(),
        );
        reg.register(
            "failovers",
            "Moves of a group's designated primary decided since this node started, by kind (failover, \
             switchover, initial)",
            self.moves.clone(),
        );
    }

    async fn group_metrics(&self, reg: &mut Registry, node: &Node) {
        let Ok(names) = node.group_names(&Caller::Internal) else { return };
        let g = GroupGauges::default();
        for name in &names {
            let Ok(m) = node.matrix(&Caller::Internal, name, ReadConsistency::Stale).await else { continue };
            let label = GroupLabel { group: name.clone() };
            g.cut_links.get_or_create(&label).set(m.verdict.cut_links.len() as i64);
            for mv in &m.verdict.members {
                for v in [Verdict::Up, Verdict::Partial, Verdict::Down, Verdict::Unknown] {
                    let l = StateLabel { group: name.clone(), member: mv.member.clone(), state: v.as_str() };
                    g.verdict.get_or_create(&l).set(i64::from(mv.state == v));
                }
            }
            if m.state.spec.is_managed() {
                self.election_metrics(&g, node, name).await;
            }
        }
        let groups = Gauge::<i64>::default();
        groups.set(names.len() as i64);
        reg.register("groups", "Groups in this node's state", groups);
        g.register(reg);
    }

    async fn election_metrics(&self, g: &GroupGauges, node: &Node, name: &str) {
        let Ok(e) = node.election_status(&Caller::Internal, name, ReadConsistency::Stale).await else { return };
        let label = GroupLabel { group: name.to_owned() };
        g.epoch.get_or_create(&label).set(e.lease.epoch as i64);
        g.held.get_or_create(&label).set(i64::from(e.lease.holder.is_some()));
        g.remaining.get_or_create(&label).set(e.lease.remaining_ms as f64 / 1000.0);
        g.maintenance.get_or_create(&label).set(i64::from(e.maintenance));
        g.blocked.get_or_create(&label).set(i64::from(e.failover_blocked_ms > 0));
        g.blocked_for.get_or_create(&label).set(e.failover_blocked_ms as f64 / 1000.0);
        for c in &e.candidates {
            if let Some(lag) = c.lag_bytes {
                g.lag.get_or_create(&MemberLabel { group: name.to_owned(), member: c.member.clone() }).set(lag as i64);
            }
        }
        for (member, s) in &e.members {
            let m = MemberLabel { group: name.to_owned(), member: member.clone() };
            g.offset.get_or_create(&m).set(s.offset as i64);
            for r in [DataRole::Primary, DataRole::Replica, DataRole::Unknown] {
                let l = RoleLabel { group: name.to_owned(), member: member.clone(), role: r.as_str() };
                g.role.get_or_create(&l).set(i64::from(s.role == r));
            }
        }
        self.count_moves(name, &e.history);
    }

    /// Drops every kept series of a deleted group: lease grants and
    /// expiries, moves, and what was counted of its history.
    fn forget_group(&self, group: &str) {
        let label = GroupLabel { group: group.to_owned() };
        self.lease_grants.remove(&label);
        self.lease_expiries.remove(&label);
        for kind in [MoveKind::Initial, MoveKind::Failover, MoveKind::Switchover] {
            self.moves.remove(&MoveLabel { group: group.to_owned(), kind: kind.as_str() });
        }
        self.moves_seen.lock().unwrap_or_else(|p| p.into_inner()).remove(group);
    }

    /// Counts the history entries decided since this process started that
    /// were not counted yet.
    fn count_moves(&self, group: &str, history: &[quorate_core::election::HistoryEntry]) {
        let mut seen = self.moves_seen.lock().unwrap_or_else(|p| p.into_inner());
        let last = seen.entry(group.to_owned()).or_insert(0);
        let from = *last;
        for h in history.iter().filter(|h| h.revision > from) {
            if h.wall_ms >= self.started_wall_ms {
                self.moves.get_or_create(&MoveLabel { group: group.to_owned(), kind: h.kind.as_str() }).inc();
            }
            *last = (*last).max(h.revision);
        }
    }
}

/// The per-group gauges of one scrape.
#[derive(Default)]
struct GroupGauges {
    verdict: Family<StateLabel, Gauge>,
    cut_links: Family<GroupLabel, Gauge>,
    epoch: Family<GroupLabel, Gauge>,
    held: Family<GroupLabel, Gauge>,
    remaining: Family<GroupLabel, FloatGauge>,
    maintenance: Family<GroupLabel, Gauge>,
    blocked: Family<GroupLabel, Gauge>,
    blocked_for: Family<GroupLabel, FloatGauge>,
    lag: Family<MemberLabel, Gauge>,
    offset: Family<MemberLabel, Gauge>,
    role: Family<RoleLabel, Gauge>,
}

impl GroupGauges {
    fn register(self, reg: &mut Registry) {
        reg.register("member_verdict", "1 for a member's current verdict (up, partial, down, unknown)", self.verdict);
        reg.register("group_cut_links", "Observers that lose a member a quorate of observers sees", self.cut_links);
        reg.register("lease_epoch", "The epoch (fencing token) of a managed group's lease", self.epoch);
        reg.register("lease_held", "1 while somebody holds a managed group's lease", self.held);
        reg.register_with_unit(
            "lease_remaining",
            "Time left on a managed group's lease",
            Unit::Seconds,
            self.remaining,
        );
        reg.register("group_maintenance", "1 while a managed group is in maintenance", self.maintenance);
        reg.register(
            "group_failover_blocked",
            "1 while automatic failover is blocked (min_failover_interval_ms)",
            self.blocked,
        );
        reg.register_with_unit(
            "group_failover_blocked_remaining",
            "How long automatic failover stays blocked",
            Unit::Seconds,
            self.blocked_for,
        );
        reg.register_with_unit(
            "member_replication_lag",
            "Bytes a candidate is behind the most advanced member",
            Unit::Bytes,
            self.lag,
        );
        reg.register_with_unit(
            "member_replication_offset",
            "The replication offset a member's agent last reported",
            Unit::Bytes,
            self.offset,
        );
        reg.register("member_role", "1 for the data role a member's agent last reported", self.role);
    }
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

fn raft_metrics(reg: &mut Registry, node: &Node) {
    let st = node.raft.status();
    let view = node.raft.view();
    gauge(reg, "raft_has_leader", "1 when this node knows a Raft leader", i64::from(st.leader.is_some()));
    gauge(reg, "raft_is_leader", "1 when this node is the Raft leader", i64::from(st.role == Role::Leader));
    gauge(reg, "raft_term", "The current Raft term", st.term as i64);
    gauge(reg, "raft_last_log_index", "The last index in this node's Raft log", st.last_log_index as i64);
    gauge(reg, "raft_last_applied_index", "The last index applied to this node's state machine", st.applied as i64);
    gauge(
        reg,
        "raft_caught_up",
        "1 once this node has caught up with the cluster since it started (it serves reads)",
        i64::from(node.readiness.caught_up()),
    );
    gauge(reg, "raft_stopped", "1 when this node's Raft core has stopped", i64::from(view.stopped.is_some()));
    let reachable = Family::<PeerLabel, Gauge>::default();
    let ack = Family::<PeerLabel, FloatGauge>::default();
    for m in st.members.iter().filter(|m| m.id != node.id) {
        let l = PeerLabel { peer: m.id.to_string() };
        reachable.get_or_create(&l).set(i64::from(m.reachable));
        if let Some(d) = m.last_ack {
            ack.get_or_create(&l).set(d.as_secs_f64());
        }
    }
    reg.register("raft_peer_reachable", "1 when this node heard from the peer recently", reachable);
    reg.register_with_unit(
        "raft_peer_last_ack",
        "On the leader: time since the peer last acknowledged a heartbeat",
        Unit::Seconds,
        ack,
    );
}

/// Counts leader changes until the node stops.
pub async fn watch_leader(node: Node, metrics: std::sync::Arc<ServerMetrics>) {
    let mut watch = node.raft.watch();
    let mut stopping = node.stopping.clone();
    let mut last: Option<u64> = None;
    loop {
        let leader = watch.view().leader;
        if leader.is_some() && leader != last {
            metrics.leader_changes.inc();
        }
        if leader.is_some() {
            last = leader;
        }
        tokio::select! {
            changed = watch.changed() => if !changed { return },
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
    }
}

/// Counts lease grants and expiries from the state machine's changes.
pub async fn watch_leases(node: Node, metrics: std::sync::Arc<ServerMetrics>) {
    let mut changes = node.reader.subscribe();
    let mut stopping = node.stopping.clone();
    // Per group: the last epoch granted, and whether it was released.
    let mut last: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    loop {
        let ev = tokio::select! {
            ev = changes.recv() => match ev {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = crate::shutdown::stopped(&mut stopping) => return,
        };
        if ev.change.kind == ChangeKind::GroupDeleted {
            // A deleted group's series go with it (the gauges are rebuilt
            // from the state at every scrape; these counters are kept).
            metrics.forget_group(&ev.change.group);
            last.remove(&ev.change.group);
            continue;
        }
        let Some(lease) = ev.change.lease.as_ref() else { continue };
        let label = GroupLabel { group: ev.change.group.clone() };
        let entry = last.entry(ev.change.group.clone()).or_insert((lease.epoch.saturating_sub(1), true));
        match ev.change.kind {
            ChangeKind::Acquired if lease.epoch > entry.0 => {
                metrics.lease_grants.get_or_create(&label).inc();
                if entry.0 > 0 && !entry.1 {
                    metrics.lease_expiries.get_or_create(&label).inc();
                }
                *entry = (lease.epoch, false);
            }
            ChangeKind::Released if lease.epoch == entry.0 => entry.1 = true,
            _ => {}
        }
    }
}

/// The gRPC status code names of go-grpc-prometheus.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "Canceled",
        C::Unknown => "Unknown",
        C::InvalidArgument => "InvalidArgument",
        C::DeadlineExceeded => "DeadlineExceeded",
        C::NotFound => "NotFound",
        C::AlreadyExists => "AlreadyExists",
        C::PermissionDenied => "PermissionDenied",
        C::ResourceExhausted => "ResourceExhausted",
        C::FailedPrecondition => "FailedPrecondition",
        C::Aborted => "Aborted",
        C::OutOfRange => "OutOfRange",
        C::Unimplemented => "Unimplemented",
        C::Internal => "Internal",
        C::Unavailable => "Unavailable",
        C::DataLoss => "DataLoss",
        C::Unauthenticated => "Unauthenticated",
    }
}

/// The labels of a call to `path` (`/package.Service/Method`) answered
/// with `code`. A path nobody serves is answered UNIMPLEMENTED and counted
/// under `unknown`, so that no caller can add series at will.
pub fn call_labels(path: &str, code: tonic::Code) -> GrpcLabel {
    let (service, method) = match path.trim_start_matches('/').split_once('/') {
        Some((s, m)) if code != tonic::Code::Unimplemented => (s.to_owned(), m.to_owned()),
        _ => ("unknown".to_owned(), "unknown".to_owned()),
    };
    GrpcLabel { grpc_service: service, grpc_method: method, grpc_code: code_name(code) }
}

/// A tower layer that counts every gRPC call by service, method and code.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: std::sync::Arc<ServerMetrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: std::sync::Arc<ServerMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: self.metrics.clone() }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: std::sync::Arc<ServerMetrics>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unknown,
            };
            metrics.count_call(call_labels(&path, code));
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_labelled_by_service_method_and_code_and_unknown_paths_share_one_series() {
        let l = call_labels("/quorate.v1.Coordinator/Acquire", tonic::Code::Unavailable);
        assert_eq!(
            (l.grpc_service.as_str(), l.grpc_method.as_str(), l.grpc_code),
            ("quorate.v1.Coordinator", "Acquire", "Unavailable")
        );
        let l = call_labels("/anything/Goes", tonic::Code::Unimplemented);
        assert_eq!((l.grpc_service.as_str(), l.grpc_method.as_str()), ("unknown", "unknown"));
    }
}

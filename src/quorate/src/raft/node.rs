//! [`RaftNode`]: the one handle the rest of the crate has on Raft.
//!
//! It answers the questions the service layer and the server's tasks ask
//! (who leads, does this node lead with a quorum, has it caught up, what is
//! its status), proposes commands, confirms reads, and starts and stops
//! openraft. Answers are plain values ([`RaftView`], [`RaftStatus`],
//! [`Role`]) and failures one enum ([`RaftFailure`]): no openraft type
//! crosses this boundary, so an openraft upgrade stays inside `raft/`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::type_config::async_runtime::watch::WatchReceiver as _;
use openraft::{BasicNode, ChangeMembers, Instant as _, LinearizerOption, ServerState, SnapshotPolicy};
use quorate_core::Command;
use quorate_core::machine::Outcome;
use quorate_core::membership::{ClusterProgress, Contact, NodeProgress};

use super::log_store::{LogStore, StoreError};
use super::network::NetworkFactory;
use super::readiness::Readiness;
use super::service::RaftService;
use super::state_machine::{SmReader, StateMachineStore};
use super::{NodeClock, Raft, TypeConfig};
use crate::config::ServerConfig;
use crate::tls::transport::Transport;

/// A node's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }

    fn of(s: ServerState) -> Self {
        match s {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        }
    }
}

/// What this node's Raft looks like now: the fields its tasks act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftView {
    pub role: Role,
    pub term: u64,
    pub leader: Option<u64>,
    /// The index of the last applied entry.
    pub applied: Option<u64>,
    /// The index of the last snapshot.
    pub snapshot: Option<u64>,
    /// The committed index as the leader reported it.
    pub cluster_committed: Option<u64>,
    /// Whether this node has caught up with the cluster now (see
    /// `server::catchup`): the leader it follows reported an entry
    /// committed in its own term, and this node applied it.
    pub caught_up: bool,
    /// Why the Raft core stopped on its own, if it did.
    pub stopped: Option<String>,
}

/// One cluster member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u64,
    pub addr: String,
    /// "leader", "follower" or "learner".
    pub role: &'static str,
    pub reachable: bool,
    /// Since the leader last heard from it (on the leader only).
    pub last_ack: Option<Duration>,
}

/// This node's Raft status, for `Status` calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    pub role: Role,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: u64,
    pub applied: u64,
    pub members: Vec<MemberStatus>,
    pub initialized: bool,
}

/// The membership as this node sees it, with what it measured of each
/// node when it leads (see `quorate_core::membership`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipView {
    /// Every node (voters and learners) with its address.
    pub nodes: BTreeMap<u64, String>,
    /// The voters (in a joint configuration: of both sets).
    pub voters: BTreeSet<u64>,
    /// A joint configuration: a change is under way.
    pub joint: bool,
    /// Since the leader last heard from each node (on the leader only).
    pub last_contact: BTreeMap<u64, Duration>,
    /// Contact and lag of each node, for the core's decisions.
    pub progress: ClusterProgress,
}

/// Why Raft could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RaftFailure {
    #[error("not the leader")]
    NotLeader,
    /// Raft itself refused a membership change (another one is under way,
    /// a learner is missing, ...). Nothing changed.
    #[error("{0}")]
    MembershipRefused(String),
    #[error("leadership changed before the write committed")]
    LeaderChanged,
    #[error("{0}")]
    QuorumNotEnough(String),
    #[error("Raft stopped: {0}")]
    Fatal(String),
    #[error("{0}")]
    Other(String),
}

/// How the leader confirms that it still leads before it serves a read or
/// an unlogged renewal. `usable` is the leader lease shortened for drift
/// and margin (`LeaseTiming::leader_lease_usable_us`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConfirm {
    /// A quorum round that starts after the call (ReadIndex).
    ReadIndex,
    /// The leader lease when a quorum acknowledged a heartbeat sent less
    /// than `usable` ago; otherwise a quorum round, as for `ReadIndex`.
    LeaseOrRound { usable: Duration },
    /// The leader lease only: refused at once when it does not cover now.
    LeaseOnly { usable: Duration },
}

/// The handle: cheap to clone, every clone the same node.
#[derive(Clone)]
pub struct RaftNode {
    raft: Raft,
    id: u64,
    election_timeout_max: Duration,
    heartbeat_interval: Duration,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode").field("id", &self.id).finish_non_exhaustive()
    }
}

/// What starting Raft gives the server.
#[derive(Debug)]
pub struct Started {
    pub raft: RaftNode,
    pub reader: Arc<SmReader>,
    /// Bytes appended to the log since start (the snapshot trigger).
    pub appended: Arc<AtomicU64>,
    /// The log store's commit latency (a metric).
    pub commit_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl RaftNode {
    /// Starts openraft on `db` with the server's configuration; peers are
    /// dialled over `transport`.
    pub async fn start(
        config: &ServerConfig,
        transport: Transport,
        db: Arc<redb::Database>,
        clock: NodeClock,
    ) -> Result<Started, StartError> {
        let id = config.node_id;
        let sm = StateMachineStore::new(db.clone(), clock);
        let reader = sm.reader();
        let log_store = LogStore::new(db);
        let appended = log_store.appended_bytes();
        let commit_seconds = log_store.commit_histogram();
        let raft = Raft::new(id, Arc::new(openraft_config(config)?), NetworkFactory::new(id, transport), log_store, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let node = Self {
            raft,
            id,
            election_timeout_max: Duration::from_millis(config.election_timeout_max_ms),
            heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
        };
        Ok(Started { raft: node, reader, appended, commit_seconds })
    }

    /// The Raft RPC service of this node, for the gRPC server.
    /// `reader` tells which nodes were removed (their messages are refused).
    pub fn service(
        &self,
        readiness: Arc<Readiness>,
        reader: Arc<SmReader>,
    ) -> crate::pb::raft::raft_server::RaftServer<RaftService> {
        RaftService::new(self.raft.clone(), self.id, readiness, reader).into_server()
    }

    /// The state now.
    pub fn view(&self) -> RaftView {
        view_of(&self.raft.metrics().borrow_watched())
    }

    /// The one definition of "this node leads": its Raft role is leader.
    /// (Whether it can still commit is [`Self::leads_with_quorum`].)
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// Whether this node leads and heard from a quorum within the last
    /// election timeout.
    pub fn leads_with_quorum(&self) -> bool {
        let m = self.raft.metrics().borrow_watched().clone();
        m.state == ServerState::Leader && m.last_quorum_acked.is_some_and(|t| t.elapsed() < self.election_timeout_max)
    }

    /// The term this node leads in, if its last published metrics show a
    /// quorum acknowledgement (of a heartbeat or append sent at `t`, in
    /// that term) with `t` less than `usable` ago; `None` otherwise. One
    /// metrics snapshot: role, term and acknowledgement agree. A snapshot
    /// lags the core, so what it shows is a past fact and only errs towards
    /// an older acknowledgement.
    pub fn lease_term(&self, usable: Duration) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        (m.state == ServerState::Leader && m.last_quorum_acked.as_ref().is_some_and(|t| t.elapsed() < usable))
            .then_some(m.current_term)
    }

    /// Proposes `cmd` and waits until it is applied; the state machine's
    /// outcome. Unbounded here: the caller bounds it.
    pub async fn write(&self, cmd: Command) -> Result<Outcome, RaftFailure> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => {
                resp.data.ok_or_else(|| RaftFailure::Other("the state machine gave no outcome for a command".into()))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(RaftFailure::NotLeader),
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_))) => Err(RaftFailure::LeaderChanged),
            Err(RaftError::APIError(e)) => Err(RaftFailure::Other(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(RaftFailure::Fatal(f.to_string())),
        }
    }

    /// Confirms that this node leads, so that its state may be read as the
    /// cluster's. Unbounded here: the caller bounds it.
    pub async fn confirm_leadership(&self, how: ReadConfirm) -> Result<(), RaftFailure> {
        // openraft compares the age of its quorum acknowledgement (the send
        // time of the acknowledged heartbeat) with `usable` inside its core,
        // together with taking the read's log position; a zero age asks for
        // a heartbeat round sent after the call. A stale acknowledgement
        // triggers that round at once instead of waiting for the next
        // periodic heartbeat.
        let option = match how {
            ReadConfirm::ReadIndex => LinearizerOption::new(Some(Duration::ZERO), true),
            ReadConfirm::LeaseOrRound { usable } => LinearizerOption::new(Some(usable), true),
            ReadConfirm::LeaseOnly { usable } => {
                LinearizerOption::new(Some(usable), false).with_wait_timeout(Duration::ZERO)
            }
        };
        match self.raft.ensure_linearizable(option).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => Err(RaftFailure::NotLeader),
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q))) => {
                Err(RaftFailure::QuorumNotEnough(q.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(RaftFailure::Fatal(f.to_string())),
        }
    }

    /// This node's status, with every member as it sees them.
    pub fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader = m.current_leader;
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let recent = self.election_timeout_max * 2;
        let acks = m.heartbeat.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, n)| {
                let role = if Some(*id) == leader {
                    "leader"
                } else if voters.contains(id) {
                    "follower"
                } else {
                    "learner"
                };
                let last_ack = acks.get(id).cloned().flatten().map(|t| t.elapsed());
                let reachable = if *id == self.id {
                    true
                } else if m.state == ServerState::Leader {
                    last_ack.is_some_and(|d| d < recent)
                } else {
                    Some(*id) == leader
                };
                MemberStatus { id: *id, addr: n.addr.clone(), role, reachable, last_ack }
            })
            .collect();
        RaftStatus {
            role: Role::of(m.state),
            term: m.current_term,
            leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied: m.last_applied.as_ref().map_or(0, |l| l.index),
            members,
            initialized: !voters.is_empty(),
        }
    }

    /// A watch on [`RaftView`]: wakes on every change of Raft's state.
    pub fn watch(&self) -> RaftWatch {
        RaftWatch { rx: self.raft.metrics() }
    }

    pub async fn is_initialized(&self) -> Result<bool, RaftFailure> {
        self.raft.is_initialized().await.map_err(|e| RaftFailure::Other(e.to_string()))
    }

    /// Forms a cluster of `members` (id → address). Once per cluster.
    pub async fn initialize(&self, members: &BTreeMap<u64, String>) -> Result<(), RaftFailure> {
        let members: BTreeMap<u64, BasicNode> =
            members.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
        self.raft.initialize(members).await.map_err(|e| RaftFailure::Other(e.to_string()))
    }

    /// The membership with this node's measurements: on the leader, when it
    /// last heard from each node and how many entries each is behind
    /// (`max_lag_entries` and less counts as up to date); elsewhere both
    /// unknown.
    pub fn membership(&self, max_lag_entries: u64) -> MembershipView {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let joint = membership.get_joint_config().len() > 1;
        let nodes: BTreeMap<u64, String> = membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        let leads = m.state == ServerState::Leader;
        // A few heartbeats: a node that stopped answering looks out of
        // contact soon (the service layer also asks each node directly).
        let recent = self.heartbeat_interval * 4;
        let acks = m.heartbeat.clone().unwrap_or_default();
        let matched = m.replication.clone().unwrap_or_default();
        let last = m.last_log_index.unwrap_or(0);
        let mut last_contact = BTreeMap::new();
        let progress = nodes
            .keys()
            .map(|id| {
                let since = acks.get(id).cloned().flatten().map(|t| t.elapsed());
                if let Some(d) = since {
                    last_contact.insert(*id, d);
                }
                let (contact, lag_entries) = if !leads {
                    (Contact::Unknown, None)
                } else if *id == self.id {
                    (Contact::Recent, Some(0))
                } else {
                    let contact = if since.is_some_and(|d| d < recent) { Contact::Recent } else { Contact::Stale };
                    // No entry in the replication map yet: not known; a
                    // stream that matched nothing is the whole log behind.
                    let lag = matched.get(id).map(|l| last.saturating_sub(l.as_ref().map_or(0, |l| l.index)));
                    (contact, lag)
                };
                NodeProgress { id: *id, voter: voters.contains(id), contact, lag_entries }
            })
            .collect();
        let progress = ClusterProgress { leader: leads.then_some(self.id), nodes: progress, max_lag_entries };
        MembershipView { nodes, voters, joint, last_contact, progress }
    }

    /// Node `id`'s address in the membership this node knows.
    pub fn node_addr(&self, id: u64) -> Option<String> {
        let m = self.raft.metrics().borrow_watched().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// Adds node `id` at `addr` as a learner (it receives the log, does not
    /// vote); returns once the change is committed, not once it caught up.
    /// Unbounded here: the caller bounds it.
    pub async fn add_learner(&self, id: u64, addr: &str) -> Result<(), RaftFailure> {
        let res = self.raft.add_learner(id, BasicNode { addr: addr.to_owned() }, false).await;
        res.map(|_| ()).map_err(membership_failure)
    }

    /// Makes learner `id` a voter (joint consensus: openraft commits the
    /// joint configuration, then the new one). Unbounded here.
    pub async fn promote(&self, id: u64) -> Result<(), RaftFailure> {
        let res = self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await;
        res.map(|_| ()).map_err(membership_failure)
    }

    /// Takes node `id` out of the membership: a voter through joint
    /// consensus, a learner at once. Its id is then removed for good (see
    /// the state machine). Unbounded here.
    pub async fn remove(&self, id: u64, voter: bool) -> Result<(), RaftFailure> {
        let ids = BTreeSet::from([id]);
        let change = if voter { ChangeMembers::RemoveVoters(ids) } else { ChangeMembers::RemoveNodes(ids) };
        let res = self.raft.change_membership(change, false).await;
        res.map(|_| ()).map_err(membership_failure)
    }

    /// Asks for a snapshot to be built now.
    pub async fn trigger_snapshot(&self) -> Result<(), RaftFailure> {
        self.raft.trigger().snapshot().await.map_err(|e| RaftFailure::Other(e.to_string()))
    }

    /// Resolves when this node's Raft core has stopped on its own (a
    /// storage error, a failed snapshot install), with the reason.
    pub async fn stopped(&self) -> String {
        let mut watch = self.watch();
        loop {
            if let Some(reason) = watch.view().stopped {
                return reason;
            }
            if !watch.changed().await {
                return "the Raft core ended".to_owned();
            }
        }
    }

    pub async fn shutdown(&self) -> Result<(), RaftFailure> {
        self.raft.shutdown().await.map_err(|e| RaftFailure::Other(e.to_string()))
    }
}

/// openraft's answer to a membership change, as a [`RaftFailure`].
fn membership_failure(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> RaftFailure {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => RaftFailure::NotLeader,
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => RaftFailure::LeaderChanged,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            RaftFailure::MembershipRefused(e.to_string())
        }
        RaftError::APIError(e) => RaftFailure::Other(e.to_string()),
        RaftError::Fatal(f) => RaftFailure::Fatal(f.to_string()),
    }
}

/// A watch on this node's [`RaftView`].
pub struct RaftWatch {
    rx: openraft::alias::WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>,
}

impl std::fmt::Debug for RaftWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftWatch").finish_non_exhaustive()
    }
}

impl RaftWatch {
    /// The state now.
    pub fn view(&self) -> RaftView {
        view_of(&self.rx.borrow_watched())
    }

    /// Waits for the next change; false once Raft has ended.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

fn view_of(m: &openraft::RaftMetrics<TypeConfig>) -> RaftView {
    let stopped = match (&m.running_state, m.state) {
        (Err(fatal), _) => Some(fatal.to_string()),
        (Ok(()), ServerState::Shutdown) => Some("the Raft core shut down".to_owned()),
        (Ok(()), _) => None,
    };
    RaftView {
        role: Role::of(m.state),
        term: m.current_term,
        leader: m.current_leader,
        applied: m.last_applied.as_ref().map(|l| l.index),
        snapshot: m.snapshot.as_ref().map(|l| l.index),
        cluster_committed: m.cluster_committed.as_ref().map(|c| c.index),
        caught_up: is_caught_up(m),
        stopped,
    }
}

/// Whether a node has caught up since it started: the leader it follows
/// reported an entry committed in its own term, and this node applied it.
fn is_caught_up(m: &openraft::RaftMetrics<TypeConfig>) -> bool {
    let Some(committed) = m.cluster_committed.as_ref() else { return false };
    m.current_leader.is_some()
        && committed.leader_id.term == m.current_term
        && m.last_applied.as_ref().is_some_and(|a| a.index >= committed.index)
}

/// Why Raft could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    #[error("Raft failed to start: {0}")]
    Raft(String),
}

/// openraft's configuration, from ours.
pub fn openraft_config(c: &ServerConfig) -> Result<openraft::Config, StartError> {
    let config = openraft::Config {
        cluster_name: "quorate".into(),
        heartbeat_interval: c.heartbeat_interval_ms,
        election_timeout_min: c.election_timeout_min_ms,
        election_timeout_max: c.election_timeout_max_ms,
        // Snapshots are small; give their transfer room on a busy machine.
        install_snapshot_timeout: 5_000,
        // By count here; by bytes and time in the server's snapshot duty.
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
        // until it is caught up (`server::catchup`).
        allow_log_reversion: Some(true),
        ..Default::default()
    };
    config.validate().map_err(|e| StartError::Config(e.to_string()))
}

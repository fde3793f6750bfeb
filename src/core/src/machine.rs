//! The replicated state machine: leases and their fencing epochs, per group.
//!
//! Every replica applies the same committed commands in the same order and must
//! reach the same state, so `apply` never reads a clock. Time comes from the
//! log entry: the leader that proposed a command stamps it with a reading of
//! its own monotonic clock ([`LeaderStamp`]). Readings of different leaders (or
//! of one leader process before and after a restart) are unrelated numbers, so
//! the machine remembers whose clock its lease times are on ([`ClockBase`]).
//! When an entry arrives from a different clock, every held lease is treated as
//! renewed at that entry's time: a newly elected leader waits a full TTL plus
//! the drift margin before it gives anybody's lease to someone else.
//!
//! `apply` returns its decision as data ([`Outcome`]) plus the change to
//! publish to watchers ([`Change`]); the runtime layer sends them on.
//!
//! Deleting a group and the state a restored cluster starts from
//! ([`Machine::restored`]) live in `lifecycle`: both keep every name's
//! epochs going up (a delete leaves its epoch in the machine's floor; a
//! restore bumps every epoch by a margin).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::election::{HistoryEntry, MemberStatus, MoveKind, Switchover};
use crate::group::{GroupSpec, SpecError};
use crate::lease::LeaseTiming;
use crate::matrix::{GroupState, Observer, RestartEvent};
use crate::names::{self, NameError, NameKind};
use crate::observe::Observation;
use crate::ranking::{self, Rank};

/// The proposing leader's identity and clock, stamped on every command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderStamp {
    /// The Raft node id of the leader that proposed the command.
    pub node_id: u64,
    /// Random per process start: a restarted leader has a new clock.
    pub boot_id: u64,
    /// The leader's monotonic clock when it proposed the command, in ms.
    pub now_ms: u64,
    /// The leader's lease timing (drift bound and margin).
    pub timing: LeaseTiming,
    /// The leader's wall clock, for people (history); never compared.
    #[serde(default)]
    pub wall_ms: u64,
}

/// A command as it is written to the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Who proposed it and when, on whose clock.
    pub stamp: LeaderStamp,
    /// What it asks for.
    pub op: Op,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}@{}:{}", self.op, self.stamp.node_id, self.stamp.now_ms)
    }
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Written first by every new leader, so that its clock becomes the lease
    /// clock at once rather than at its first client command.
    LeaderStart,
    /// Take the group's lease for `holder`. Granted when the lease is free,
    /// released, expired with the margin on the leader's clock, or already
    /// held by `holder` (then with a fresh epoch).
    Acquire {
        /// The group (and its lease).
        group: String,
        /// Who wants it.
        holder: String,
        /// How long it lasts from the grant unless renewed.
        ttl_ms: u64,
    },
    /// Extend the lease `holder` holds at `epoch` by its TTL from now.
    Renew {
        /// The group (and its lease).
        group: String,
        /// Who holds it.
        holder: String,
        /// The epoch it was granted at: a renewal of an older grant fails.
        epoch: u64,
    },
    /// A renewal the leader confirmed without a log entry of its own
    /// ([`crate::renewals`]), recorded at `at_ms`, the leader's clock when
    /// the renewal arrived. Written in batches, so that the replicated
    /// lease keeps up with its holder; never makes a lease last longer than
    /// what its holder was told, and never revives a lease granted to
    /// someone else since (it must match `holder` and `epoch`).
    Renewed {
        /// The group (and its lease).
        group: String,
        /// Who holds it.
        holder: String,
        /// The epoch it was granted at.
        epoch: u64,
        /// When the leader received the renewal, on the clock of the
        /// entry's stamp; later than the stamp counts as the stamp.
        at_ms: u64,
    },
    /// Give the lease up at once; the next acquirer needs no wait.
    Release {
        /// The group (and its lease).
        group: String,
        /// Who holds it.
        holder: String,
        /// The epoch it was granted at.
        epoch: u64,
    },
    /// Create or change a failover group.
    ApplyGroup {
        /// The spec to store; validated on apply.
        spec: GroupSpec,
    },
    /// One observer's views of the members of one or more groups (a
    /// coordinator reports all its groups in one command). A member's agent
    /// also reports the state of its own data service.
    Report {
        /// Who observed.
        observer: Observer,
        /// Which start of the observer (restarts are told apart by it).
        observer_incarnation: u64,
        /// Its view of each group.
        views: Vec<GroupView>,
        /// A member's agent only: its own data service's state.
        #[serde(default)]
        status: Option<MemberStatus>,
    },
    /// One observer's word that its views of these groups are unchanged:
    /// each `(group, version)` renews the time of the view it stored under
    /// that token ([`GroupState::refresh`]), so an observer whose
    /// observations did not change need not send them again to keep them
    /// fresh. Views not stored under that token are left alone and named in
    /// the outcome; the observer sends those in full.
    Refresh {
        /// Who observed.
        observer: Observer,
        /// Which start of the observer (tokens are per start).
        observer_incarnation: u64,
        /// `(group, version)` of each view to renew.
        views: Vec<(String, u64)>,
    },
    /// The leader's decision to move a managed group's designation.
    Designate {
        /// The managed group.
        group: String,
        /// Why the designation moves.
        kind: MoveKind,
        /// The member the decision saw designated: refused if it changed.
        from: Option<String>,
        /// The member to designate.
        to: String,
        /// The decision in words, for the history.
        reason: String,
        /// What the decision was based on, for the history.
        evidence: Vec<String>,
    },
    /// Maintenance on or off: no automatic failover while on.
    SetMaintenance {
        /// The managed group.
        group: String,
        /// On or off.
        on: bool,
    },
    /// Lift the minimum interval after the last failover.
    UnblockFailover {
        /// The managed group.
        group: String,
    },
    /// Start a planned switchover to `to` (or the best candidate).
    Switchover {
        /// The managed group.
        group: String,
        /// The member to hand over to; `None` for the best other one.
        to: Option<String>,
    },
    /// Give a pending switchover up.
    CancelSwitchover {
        /// The managed group.
        group: String,
        /// Why, for the logs.
        reason: String,
    },
    /// Delete a failover group: its spec, matrix, election state, history
    /// and lease. Refused for a managed group whose lease is held and not
    /// expired at the entry's time, unless `force`. The group's epoch is
    /// kept in the machine's epoch floor, so a group created again under
    /// the same name never hands out an epoch it handed out before.
    DeleteGroup {
        /// The group.
        group: String,
        /// Delete even while a primary holds the lease (the holder's next
        /// renewal is refused and its agent fences).
        force: bool,
    },
    /// Several commands in one log entry, applied in order at the same time
    /// (the leader batches concurrent reports). Not nested.
    Batch(Vec<Op>),
}

/// An observer's view of one group's members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// The group viewed.
    pub group: String,
    /// Its observation of each target, by member id.
    pub cells: Vec<(String, Observation)>,
    /// The observer's token for these cells, for later [`Op::Refresh`]es
    /// (0: none, and not written, so views without one encode as before).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Where an entry sits in the Raft log, as far as the machine needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPosition {
    /// The entry's log index (revisions are log indexes).
    pub index: u64,
    /// The Raft term it was proposed in.
    pub term: u64,
    /// The node that led `term` (and so proposed the entry).
    pub leader_node_id: u64,
}

/// Identifies one leader process's clock: lease times are only ever compared
/// with readings of the same clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockBase {
    /// The term the leader led.
    pub term: u64,
    /// The leader's Raft node id.
    pub node_id: u64,
    /// The leader process's start (a restart is a new clock).
    pub boot_id: u64,
}

/// One group's lease as stored in the machine.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The current holder; `None` when never taken or released.
    pub holder: Option<String>,
    /// The fencing token: bumped by every grant, never reused.
    pub epoch: u64,
    /// The TTL of the grant; each renewal extends it by as much.
    pub ttl_ms: u64,
    /// When the lease was last granted or renewed, on the clock in
    /// [`Machine::clock`].
    pub renewed_at_ms: u64,
    /// The timing the lease was granted under (the holder was told it).
    pub timing: Option<LeaseTiming>,
    /// Log index of the last change to this record.
    pub revision: u64,
}

/// The state of a lease at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    /// Nobody holds it; the next acquirer gets it at once.
    Free,
    /// Held and not expired.
    Held,
    /// The holder's TTL has run out, but the drift margin has not: nobody
    /// else can have it yet.
    Expiring,
}

/// A lease as readers see it at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    /// The lease's (and its group's) name.
    pub group: String,
    /// `None` when the lease is free (never taken, released, or expired past
    /// the margin).
    pub holder: Option<String>,
    /// The fencing token of the latest grant.
    pub epoch: u64,
    /// The TTL of the latest grant.
    pub ttl_ms: u64,
    /// Time left before the holder's TTL runs out (0 when free or expiring).
    pub remaining_ms: u64,
    /// Free, held or expiring.
    pub state: LeaseState,
    /// Log index of the last change to the lease.
    pub revision: u64,
}

impl LeaseView {
    /// A lease nobody holds, at `epoch` (the epoch its next grant builds
    /// on), last changed at `revision`.
    pub fn free(group: &str, epoch: u64, revision: u64) -> Self {
        Self {
            group: group.to_owned(),
            holder: None,
            epoch,
            ttl_ms: 0,
            remaining_ms: 0,
            state: LeaseState::Free,
            revision,
        }
    }
}

/// How the reader relates to the machine's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderClock {
    /// The reader's `now`, measured on the machine's clock.
    Now(u64),
    /// The reader cannot measure on the machine's clock (a follower with no
    /// estimate, a leader whose first entry is not applied yet): every held
    /// lease is shown as just renewed, the conservative reading.
    Unknown,
}

/// Why a command had no effect. Deterministic: every replica rejects alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// A group or holder name is not a valid name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A lease of no time.
    #[error("ttl_ms must be positive")]
    ZeroTtl,
    /// The drift and margin of the lease timing eat the whole TTL.
    #[error("ttl_ms {ttl_ms} leaves the holder no valid time under the lease timing")]
    TtlTooShort {
        /// The TTL asked for.
        ttl_ms: u64,
    },
    /// A renewal or release by someone not holding the lease at that epoch.
    #[error("{holder:?} does not hold lease {group:?} at epoch {epoch}: {current}")]
    NotHolder {
        /// The lease.
        group: String,
        /// Who asked.
        holder: String,
        /// The epoch it asked at.
        epoch: u64,
        /// Who does hold it, so the caller can tell a stale epoch.
        current: CurrentHolder,
    },
    /// A renewal after the TTL ran out: the holder must have fenced itself.
    #[error("lease {group:?} at epoch {epoch} has expired; acquire it again")]
    Expired {
        /// The lease.
        group: String,
        /// The epoch of the expired grant.
        epoch: u64,
    },
    /// The epoch reached `u64::MAX`: no fresh fencing token is left.
    #[error("epoch of lease {group:?} is exhausted")]
    EpochExhausted {
        /// The lease.
        group: String,
    },
    /// An entry stamped by a node that did not lead its term.
    #[error("command stamped by node {stamped} in a term led by node {leader}")]
    ForeignStamp {
        /// The node id in the stamp.
        stamped: u64,
        /// The node that led the entry's term.
        leader: u64,
    },
    /// A batch inside a batch.
    #[error("batches cannot be nested")]
    NestedBatch,
    /// An election command for a group without a failover section.
    #[error("group {group:?} is not managed (its spec has no [failover] section)")]
    NotManaged {
        /// The group.
        group: String,
    },
    /// The lease of a managed group asked for by a member not designated.
    #[error("{holder:?} is not the designated primary of {group:?} (designated: {})", designated.as_deref().unwrap_or("nobody"))]
    NotDesignated {
        /// The group.
        group: String,
        /// Who asked.
        holder: String,
        /// Who is designated.
        designated: Option<String>,
    },
    /// A designation decided on a state that has changed since.
    #[error("stale decision: expected {expected:?} to be designated, but it is {actual:?}")]
    StaleDecision {
        /// The designated member the decision saw.
        expected: Option<String>,
        /// The one designated now.
        actual: Option<String>,
    },
    /// An automatic failover within `min_failover_interval_ms` of the last.
    #[error(
        "automatic failover of {group:?} is blocked for another {remaining_ms} ms (min_failover_interval_ms); `quorate failover unblock` lifts it"
    )]
    FailoverBlocked {
        /// The group.
        group: String,
        /// How long the block lasts still.
        remaining_ms: u64,
    },
    /// An automatic failover of a group in maintenance.
    #[error("group {group:?} is in maintenance: no automatic failover")]
    InMaintenance {
        /// The group.
        group: String,
    },
    /// A designation or switchover to a member that cannot be primary.
    #[error("{0}")]
    InvalidTarget(String),
    /// A group spec that does not validate.
    #[error("invalid group spec: {0}")]
    InvalidSpec(SpecError),
    /// A command for a group that does not exist.
    #[error("no group named {group:?}; create it with `quorate group apply`")]
    UnknownGroup {
        /// The name asked for.
        group: String,
    },
    /// A delete of a managed group whose primary holds a live lease.
    #[error(
        "group {group:?} has a live primary: {holder:?} holds its lease at epoch {epoch} for another {remaining_ms} ms; \
         stop its agents first, or delete with --force (the primary's next renewal is refused and it fences)"
    )]
    LivePrimary {
        /// The group.
        group: String,
        /// The lease holder.
        holder: String,
        /// Its epoch.
        epoch: u64,
        /// Time left on its lease at the entry's time.
        remaining_ms: u64,
    },
    /// A report by a member's agent about a group it is not in.
    #[error("{observer} is not a member of group {group:?}")]
    UnknownObserver {
        /// The group.
        group: String,
        /// The observer.
        observer: Observer,
    },
}

/// Who holds a lease, for [`Rejection::NotHolder`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentHolder {
    /// The holder; `None` when nobody holds the lease.
    pub holder: Option<String>,
    /// The current epoch.
    pub epoch: u64,
}

impl std::fmt::Display for CurrentHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.holder {
            Some(h) => write!(f, "current epoch is {} (holder {h:?})", self.epoch),
            None => write!(f, "current epoch is {} (no holder)", self.epoch),
        }
    }
}

/// The decision `apply` made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The new leader's clock is the machine's clock.
    LeaderStarted,
    /// The lease was granted with a new epoch.
    Granted(LeaseView),
    /// The lease was extended by its TTL from now.
    Renewed(LeaseView),
    /// The lease is free; the next acquirer gets it at once.
    Released(LeaseView),
    /// Somebody else holds the lease; it may be granted at `grantable_at_ms`
    /// on the machine's clock, unless it is renewed or released first.
    Held {
        /// The lease as it stands.
        current: LeaseView,
        /// When it may go to someone else, on the machine's clock.
        grantable_at_ms: u64,
    },
    /// The group spec is stored (created or changed) at `revision`.
    GroupApplied {
        /// The log index of the spec.
        revision: u64,
        /// New, rather than changed.
        created: bool,
    },
    /// The views are stored; they revealed these restarts. Views of unknown
    /// groups (or groups the observer is not in) are `rejected`, the others
    /// still stored.
    Reported {
        /// Members seen with a new incarnation.
        restarts: Vec<RestartEvent>,
        /// Why views were not stored.
        rejected: Vec<Rejection>,
    },
    /// The views of a refresh were renewed, except those of the groups in
    /// `missed` (no view stored under that token: the observer sends them
    /// in full).
    Refreshed {
        /// Groups whose view was not renewed.
        missed: Vec<String>,
    },
    /// The group is deleted at `revision`; `lease` is its lease now (free,
    /// at the epoch the next grant of that name builds on).
    GroupDeleted {
        /// The log index of the delete.
        revision: u64,
        /// The lease after the delete.
        lease: LeaseView,
    },
    /// One outcome per command of a batch, in order.
    Batch(Vec<Outcome>),
    /// The designation moved (or maintenance/blocks changed, switchover started).
    ElectionChanged {
        /// The designated member after the change.
        designated: Option<String>,
    },
    /// The command had no effect, and why.
    Rejected(Rejection),
}

/// A change watchers are told about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The group (and lease) changed.
    pub group: String,
    /// What changed.
    pub kind: ChangeKind,
    /// The lease after the change, for lease changes.
    pub lease: Option<LeaseView>,
}

/// What a [`Change`] is about, so watchers can filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// A lease was granted.
    Acquired,
    /// A lease was renewed.
    Renewed,
    /// A lease was released.
    Released,
    /// A group spec was stored.
    GroupApplied,
    /// An observer's view of the group was stored.
    ViewReported,
    /// The group's election state changed.
    ElectionChanged,
    /// The group (and its lease) was deleted.
    GroupDeleted,
}

impl Change {
    fn lease(kind: ChangeKind, lease: LeaseView) -> Self {
        Self { group: lease.group.clone(), kind, lease: Some(lease) }
    }
}

/// What `apply` returns: the decision and the change to publish, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The decision, for the proposer.
    pub outcome: Outcome,
    /// What changed, for watchers, in order.
    pub changes: Vec<Change>,
}

/// The whole replicated state. Serialized as the Raft snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Machine {
    /// Whose clock `renewed_at_ms` and `clock_now_ms` are on.
    clock: Option<ClockBase>,
    /// The largest stamp applied on `clock` (stamps of concurrent proposals
    /// may reach the log slightly out of order; time never goes backwards).
    clock_now_ms: u64,
    /// The first stamp applied on `clock`: when the current leader's term
    /// started, as far as the machine knows.
    #[serde(default)]
    clock_started_ms: u64,
    leases: BTreeMap<String, LeaseRecord>,
    /// Failover groups: spec and matrix.
    #[serde(default)]
    groups: BTreeMap<String, GroupState>,
    /// The epoch a lease with no record starts from: the highest epoch of
    /// any deleted lease, raised by a restore (see `machine::lifecycle`).
    /// Epochs of a name never go back, even across a delete or a restore.
    #[serde(default)]
    epoch_floor: u64,
}

impl Machine {
    /// An empty state: no clock, no leases, no groups.
    pub fn new() -> Self {
        Self::default()
    }

    /// The clock lease times are measured on, and its latest applied reading.
    pub fn clock(&self) -> Option<(ClockBase, u64)> {
        self.clock.map(|c| (c, self.clock_now_ms))
    }

    /// The first reading of the machine's current clock (the current
    /// leader's first applied entry).
    pub fn clock_started_ms(&self) -> u64 {
        self.clock_started_ms
    }

    /// Number of groups that have ever had a lease.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// A failover group's spec and matrix.
    pub fn group(&self, name: &str) -> Option<&GroupState> {
        self.groups.get(name)
    }

    /// Every failover group.
    pub fn groups(&self) -> impl Iterator<Item = &GroupState> {
        self.groups.values()
    }

    /// Applies one committed command. Deterministic and total.
    pub fn apply(&mut self, pos: LogPosition, cmd: &Command) -> Applied {
        if cmd.stamp.node_id != pos.leader_node_id {
            // Only the leader of a term proposes entries of that term; a
            // mismatch is a bug somewhere, refused alike on every replica.
            return rejected_outcome(Rejection::ForeignStamp {
                stamped: cmd.stamp.node_id,
                leader: pos.leader_node_id,
            });
        }
        let now = self.advance_clock(pos, &cmd.stamp);
        self.apply_op(pos, now, cmd.stamp.timing, cmd.stamp.wall_ms, &cmd.op)
    }

    fn apply_op(&mut self, pos: LogPosition, now: u64, timing: LeaseTiming, wall_ms: u64, op: &Op) -> Applied {
        match op {
            Op::Batch(ops) => {
                let mut outcomes = Vec::with_capacity(ops.len());
                let mut changes = Vec::new();
                for op in ops {
                    let applied = match op {
                        Op::Batch(_) => rejected_outcome(Rejection::NestedBatch),
                        op => self.apply_op(pos, now, timing, wall_ms, op),
                    };
                    outcomes.push(applied.outcome);
                    changes.extend(applied.changes);
                }
                Applied { outcome: Outcome::Batch(outcomes), changes }
            }
            Op::LeaderStart => Applied { outcome: Outcome::LeaderStarted, changes: Vec::new() },
            Op::Acquire { group, holder, ttl_ms } => self.acquire(pos.index, now, timing, group, holder, *ttl_ms),
            Op::Renew { group, holder, epoch } => self.renew(pos.index, now, group, holder, *epoch),
            Op::Renewed { group, holder, epoch, at_ms } => {
                self.renewed(pos.index, now, group, holder, *epoch, (*at_ms).min(now))
            }
            Op::Release { group, holder, epoch } => self.release(pos.index, now, wall_ms, group, holder, *epoch),
            Op::ApplyGroup { spec } => self.apply_group(pos.index, wall_ms, spec),
            Op::Report { observer, observer_incarnation, views, status } => {
                self.report(pos.index, now, observer, *observer_incarnation, views, status.as_ref())
            }
            Op::Refresh { observer, observer_incarnation, views } => {
                self.refresh(pos.index, now, observer, *observer_incarnation, views)
            }
            Op::Designate { group, kind, from, to, reason, evidence } => {
                self.designate(pos.index, now, wall_ms, group, *kind, from.as_deref(), to, reason, evidence)
            }
            Op::SetMaintenance { group, on } => self.election_op(group, |g| {
                g.election.maintenance = *on;
                Ok(())
            }),
            Op::UnblockFailover { group } => self.election_op(group, |g| {
                g.election.last_failover_ms = None;
                Ok(())
            }),
            Op::Switchover { group, to } => self.start_switchover(pos.index, group, to.as_deref()),
            Op::CancelSwitchover { group, .. } => self.election_op(group, |g| {
                g.election.switchover = None;
                Ok(())
            }),
            Op::DeleteGroup { group, force } => self.delete_group(pos.index, now, group, *force),
        }
    }

    /// The lease of `group` as seen at `now`.
    pub fn lease(&self, group: &str, now: ReaderClock) -> LeaseView {
        match self.leases.get(group) {
            Some(rec) => view(group, rec, now),
            None => LeaseView::free(group, self.epoch_floor, 0),
        }
    }

    /// When `group`'s lease may be granted to someone other than its holder,
    /// on the machine's clock, or `None` when it is free now.
    pub fn grantable_at_ms(&self, group: &str, timing: LeaseTiming) -> Option<u64> {
        self.grantable_at_ms_with(group, timing, None)
    }

    /// [`Self::grantable_at_ms`], counting a renewal of the current grant
    /// confirmed at `confirmed_at_ms` and not logged yet ([`crate::renewals`]).
    pub fn grantable_at_ms_with(&self, group: &str, timing: LeaseTiming, confirmed_at_ms: Option<u64>) -> Option<u64> {
        let rec = self.leases.get(group)?;
        rec.holder.as_ref()?;
        let renewed = rec.renewed_at_ms.max(confirmed_at_ms.unwrap_or(0));
        Some(grant_timing(rec, timing).grantable_at_ms(renewed, rec.ttl_ms))
    }

    /// The holder and epoch of `group`'s current grant, if it is held.
    pub fn lease_holder(&self, group: &str) -> Option<(&str, u64)> {
        let rec = self.leases.get(group)?;
        Some((rec.holder.as_deref()?, rec.epoch))
    }

    fn advance_clock(&mut self, pos: LogPosition, stamp: &LeaderStamp) -> u64 {
        let base = ClockBase { term: pos.term, node_id: stamp.node_id, boot_id: stamp.boot_id };
        if self.clock == Some(base) {
            self.clock_now_ms = self.clock_now_ms.max(stamp.now_ms);
        } else {
            // A different leader process: its readings are unrelated to the
            // old ones. Restart every lease's TTL on the new clock; this can
            // only delay a grant to someone else, never hasten it.
            let old_now = self.clock_now_ms;
            self.clock = Some(base);
            self.clock_now_ms = stamp.now_ms;
            self.clock_started_ms = stamp.now_ms;
            for rec in self.leases.values_mut() {
                rec.renewed_at_ms = stamp.now_ms;
            }
            // Views keep their ages: a leader change must not flip verdicts.
            for g in self.groups.values_mut() {
                g.rebase(old_now, stamp.now_ms);
            }
        }
        self.clock_now_ms
    }

    fn acquire(
        &mut self,
        index: u64,
        now: u64,
        timing: LeaseTiming,
        group: &str,
        holder: &str,
        ttl_ms: u64,
    ) -> Applied {
        if let Err(e) = check_names(group, holder) {
            return rejected_outcome(e);
        }
        if ttl_ms == 0 {
            return rejected_outcome(Rejection::ZeroTtl);
        }
        if timing.check_ttl(ttl_ms).is_err() {
            return rejected_outcome(Rejection::TtlTooShort { ttl_ms });
        }
        if let Err(r) = self.check_designated(group, holder) {
            return rejected_outcome(r);
        }
        let floor = self.epoch_floor;
        let rec =
            self.leases.entry(group.to_owned()).or_insert_with(|| LeaseRecord { epoch: floor, ..Default::default() });
        if let Some(current) = &rec.holder {
            let grantable_at_ms = grant_timing(rec, timing).grantable_at_ms(rec.renewed_at_ms, rec.ttl_ms);
            if current != holder && now < grantable_at_ms {
                return Applied {
                    outcome: Outcome::Held { current: view(group, rec, ReaderClock::Now(now)), grantable_at_ms },
                    changes: Vec::new(),
                };
            }
        }
        let Some(epoch) = rec.epoch.checked_add(1) else {
            return rejected_outcome(Rejection::EpochExhausted { group: group.to_owned() });
        };
        let previous = rec.epoch;
        *rec = LeaseRecord {
            holder: Some(holder.to_owned()),
            epoch,
            ttl_ms,
            renewed_at_ms: now,
            timing: Some(timing),
            revision: index,
        };
        assert!(rec.epoch > previous, "epochs must strictly increase");
        let lease = view(group, rec, ReaderClock::Now(now));
        if let Some(g) = self.groups.get_mut(group)
            && let Some(last) = g.election.history.back_mut()
            && last.to == holder
            && last.epoch.is_none()
        {
            last.epoch = Some(epoch);
        }
        Applied { outcome: Outcome::Granted(lease.clone()), changes: vec![Change::lease(ChangeKind::Acquired, lease)] }
    }

    fn renew(&mut self, index: u64, now: u64, group: &str, holder: &str, epoch: u64) -> Applied {
        if let Err(r) = self.check_renewal(group, holder, epoch, now, None) {
            return rejected_outcome(r);
        }
        let rec = self.holder_record(group, holder, epoch).expect("checked: holds the lease");
        rec.renewed_at_ms = now;
        rec.revision = index;
        let lease = view(group, rec, ReaderClock::Now(now));
        Applied { outcome: Outcome::Renewed(lease.clone()), changes: vec![Change::lease(ChangeKind::Renewed, lease)] }
    }

    /// Records a renewal the leader confirmed at `at_ms` (<= `now`). No
    /// expiry check: the leader confirmed it while the lease was valid
    /// counting its confirmations not logged yet, which this machine has
    /// not seen; the holder and epoch check keeps it from touching a lease
    /// granted again since. Renewed times only go forward.
    fn renewed(&mut self, index: u64, now: u64, group: &str, holder: &str, epoch: u64, at_ms: u64) -> Applied {
        if let Err(e) = check_names(group, holder) {
            return rejected_outcome(e);
        }
        let Some(rec) = self.holder_record(group, holder, epoch) else {
            return rejected_outcome(self.not_holder(group, holder, epoch));
        };
        rec.renewed_at_ms = rec.renewed_at_ms.max(at_ms);
        rec.revision = index;
        let lease = view(group, rec, ReaderClock::Now(now));
        Applied { outcome: Outcome::Renewed(lease.clone()), changes: vec![Change::lease(ChangeKind::Renewed, lease)] }
    }

    /// Whether `holder` may renew `group`'s lease at `epoch` at `now`: it
    /// holds the lease at that epoch, is the designated member of a managed
    /// group, and the lease has not run out, counting from its last logged
    /// renewal or from `confirmed_at_ms` if later (a renewal the leader
    /// confirmed and has not logged yet, [`crate::renewals`]). The one rule
    /// for a renewal, logged or not.
    pub fn check_renewal(
        &self,
        group: &str,
        holder: &str,
        epoch: u64,
        now: u64,
        confirmed_at_ms: Option<u64>,
    ) -> Result<(), Rejection> {
        check_names(group, holder)?;
        self.check_designated(group, holder)?;
        let Some(rec) =
            self.leases.get(group).filter(|rec| rec.epoch == epoch && rec.holder.as_deref() == Some(holder))
        else {
            return Err(self.not_holder(group, holder, epoch));
        };
        let renewed = rec.renewed_at_ms.max(confirmed_at_ms.unwrap_or(0));
        if now >= renewed.saturating_add(rec.ttl_ms) {
            return Err(Rejection::Expired { group: group.to_owned(), epoch });
        }
        Ok(())
    }

    /// The lease of `group` as its holder sees it right after a renewal at
    /// `now` that is not logged yet: held, a full TTL left.
    pub fn lease_renewed_at(&self, group: &str, now: u64) -> LeaseView {
        match self.leases.get(group) {
            Some(rec) => view(group, &LeaseRecord { renewed_at_ms: now, ..rec.clone() }, ReaderClock::Now(now)),
            None => LeaseView::free(group, self.epoch_floor, 0),
        }
    }

    fn release(&mut self, index: u64, now: u64, wall_ms: u64, group: &str, holder: &str, epoch: u64) -> Applied {
        if let Err(e) = check_names(group, holder) {
            return rejected_outcome(e);
        }
        let Some(rec) = self.holder_record(group, holder, epoch) else {
            return rejected_outcome(self.not_holder(group, holder, epoch));
        };
        rec.holder = None;
        rec.revision = index;
        let lease = view(group, rec, ReaderClock::Now(now));
        let mut changes = vec![Change::lease(ChangeKind::Released, lease.clone())];
        // The primary gives the lease up for a planned switchover: the
        // target is designated in the same step.
        if let Some(g) = self.groups.get_mut(group)
            && g.election.designated.as_deref() == Some(holder)
            && let Some(sw) = g.election.switchover.take()
        {
            g.election.designated = Some(sw.to.clone());
            g.election.record(HistoryEntry {
                revision: index,
                kind: MoveKind::Switchover,
                from: Some(holder.to_owned()),
                to: sw.to,
                epoch: None,
                reason: format!("planned switchover requested at revision {}", sw.requested_revision),
                evidence: Vec::new(),
                wall_ms,
            });
            changes.push(Change { group: group.to_owned(), kind: ChangeKind::ElectionChanged, lease: None });
        }
        Applied { outcome: Outcome::Released(lease), changes }
    }

    fn apply_group(&mut self, index: u64, wall_ms: u64, spec: &GroupSpec) -> Applied {
        if let Err(e) = spec.validate() {
            return rejected_outcome(Rejection::InvalidSpec(e));
        }
        let created = match self.groups.get_mut(&spec.name) {
            Some(g) => {
                g.respec(spec.clone(), index);
                false
            }
            None => {
                self.groups.insert(spec.name.clone(), GroupState::new(spec.clone(), index));
                true
            }
        };
        if let Some(g) = self.groups.get_mut(&spec.name) {
            g.ensure_designation(index, wall_ms);
        }
        Applied {
            outcome: Outcome::GroupApplied { revision: index, created },
            changes: vec![Change { group: spec.name.clone(), kind: ChangeKind::GroupApplied, lease: None }],
        }
    }

    fn report(
        &mut self,
        index: u64,
        now: u64,
        observer: &Observer,
        observer_incarnation: u64,
        views: &[GroupView],
        status: Option<&MemberStatus>,
    ) -> Applied {
        let mut restarts = Vec::new();
        let mut rejected = Vec::new();
        let mut changes = Vec::new();
        for view in views {
            let Some(g) = self.groups.get_mut(&view.group) else {
                rejected.push(Rejection::UnknownGroup { group: view.group.clone() });
                continue;
            };
            if let Observer::Member(m) = observer
                && g.spec.member(m).is_none()
            {
                rejected.push(Rejection::UnknownObserver { group: view.group.clone(), observer: observer.clone() });
                continue;
            }
            restarts.extend(g.report_versioned(
                observer.clone(),
                observer_incarnation,
                &view.cells,
                view.version,
                now,
                index,
            ));
            if let (Observer::Member(m), Some(st)) = (observer, status) {
                g.statuses.insert(m.clone(), st.clone());
            }
            changes.push(Change { group: view.group.clone(), kind: ChangeKind::ViewReported, lease: None });
        }
        if changes.is_empty() && rejected.len() == 1 {
            return rejected_outcome(rejected.remove(0));
        }
        Applied { outcome: Outcome::Reported { restarts, rejected }, changes }
    }

    /// Renews the views named by an [`Op::Refresh`]. No change is published:
    /// no cell changed, only the views' time (watchers are not told of
    /// reports either; elections re-judge on their own tick).
    fn refresh(
        &mut self,
        index: u64,
        now: u64,
        observer: &Observer,
        observer_incarnation: u64,
        views: &[(String, u64)],
    ) -> Applied {
        let missed = views
            .iter()
            .filter(|(group, version)| {
                !self
                    .groups
                    .get_mut(group)
                    .is_some_and(|g| g.refresh(observer, observer_incarnation, *version, now, index))
            })
            .map(|(group, _)| group.clone())
            .collect();
        Applied { outcome: Outcome::Refreshed { missed }, changes: Vec::new() }
    }

    /// For a managed group's lease, only the designated member may hold it.
    fn check_designated(&self, group: &str, holder: &str) -> Result<(), Rejection> {
        match self.groups.get(group) {
            Some(g) if g.spec.is_managed() && g.election.designated.as_deref() != Some(holder) => {
                Err(Rejection::NotDesignated {
                    group: group.to_owned(),
                    holder: holder.to_owned(),
                    designated: g.election.designated.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    fn managed_group(&mut self, group: &str) -> Result<&mut GroupState, Rejection> {
        match self.groups.get_mut(group) {
            None => Err(Rejection::UnknownGroup { group: group.to_owned() }),
            Some(g) if !g.spec.is_managed() => Err(Rejection::NotManaged { group: group.to_owned() }),
            Some(g) => Ok(g),
        }
    }

    fn election_op(&mut self, group: &str, f: impl FnOnce(&mut GroupState) -> Result<(), Rejection>) -> Applied {
        let g = match self.managed_group(group) {
            Ok(g) => g,
            Err(r) => return rejected_outcome(r),
        };
        if let Err(r) = f(g) {
            return rejected_outcome(r);
        }
        let designated = g.election.designated.clone();
        Applied {
            outcome: Outcome::ElectionChanged { designated },
            changes: vec![Change { group: group.to_owned(), kind: ChangeKind::ElectionChanged, lease: None }],
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn designate(
        &mut self,
        index: u64,
        now: u64,
        wall_ms: u64,
        group: &str,
        kind: MoveKind,
        from: Option<&str>,
        to: &str,
        reason: &str,
        evidence: &[String],
    ) -> Applied {
        self.election_op(group, |g| {
            if g.election.designated.as_deref() != from {
                return Err(Rejection::StaleDecision {
                    expected: from.map(str::to_owned),
                    actual: g.election.designated.clone(),
                });
            }
            match g.spec.member(to) {
                Some(m) if m.priority > 0 && Some(to) != from => {}
                _ => return Err(Rejection::InvalidTarget(format!("{to:?} cannot be designated primary"))),
            }
            if kind == MoveKind::Failover {
                if g.election.maintenance {
                    return Err(Rejection::InMaintenance { group: g.spec.name.clone() });
                }
                let min = g.spec.failover.as_ref().map_or(0, |f| f.min_failover_interval_ms);
                if let Some(remaining_ms) = g.election.failover_blocked_for_ms(min, now) {
                    return Err(Rejection::FailoverBlocked { group: g.spec.name.clone(), remaining_ms });
                }
                g.election.last_failover_ms = Some(i64::try_from(now).unwrap_or(i64::MAX));
            }
            g.election.designated = Some(to.to_owned());
            g.election.switchover = None;
            g.election.record(HistoryEntry {
                revision: index,
                kind,
                from: from.map(str::to_owned),
                to: to.to_owned(),
                epoch: None,
                reason: reason.to_owned(),
                evidence: evidence.to_vec(),
                wall_ms,
            });
            Ok(())
        })
    }

    fn start_switchover(&mut self, index: u64, group: &str, to: Option<&str>) -> Applied {
        self.election_op(group, |g| {
            let Some(current) = g.election.designated.clone() else {
                return Err(Rejection::InvalidTarget("no primary to switch over from".into()));
            };
            let target = match to {
                Some(t) => match g.spec.member(t) {
                    Some(m) if m.priority > 0 && t != current => t.to_owned(),
                    Some(_) if t == current => {
                        return Err(Rejection::InvalidTarget(format!("{t:?} is already the primary")));
                    }
                    Some(_) => return Err(Rejection::InvalidTarget(format!("{t:?} has priority 0 (never primary)"))),
                    None => return Err(Rejection::InvalidTarget(format!("{t:?} is not a member of {group:?}"))),
                },
                None => {
                    // The best other member that may be primary, by the one
                    // ranking (highest priority, then most data, then name).
                    let others = g.spec.members.iter().filter(|m| m.id != current && m.priority > 0);
                    let best = ranking::best(others, |m| Rank {
                        eligible: true,
                        priority: m.priority,
                        offset: g.statuses.get(&m.id).map_or(0, |s| s.offset),
                        member: &m.id,
                    });
                    match best {
                        Some(m) => m.id.clone(),
                        None => return Err(Rejection::InvalidTarget("no other member can be primary".into())),
                    }
                }
            };
            g.election.switchover = Some(Switchover { to: target, requested_revision: index });
            Ok(())
        })
    }

    fn holder_record(&mut self, group: &str, holder: &str, epoch: u64) -> Option<&mut LeaseRecord> {
        self.leases.get_mut(group).filter(|rec| rec.epoch == epoch && rec.holder.as_deref() == Some(holder))
    }

    fn not_holder(&self, group: &str, holder: &str, epoch: u64) -> Rejection {
        let rec = self.leases.get(group);
        Rejection::NotHolder {
            group: group.to_owned(),
            holder: holder.to_owned(),
            epoch,
            current: CurrentHolder {
                holder: rec.and_then(|r| r.holder.clone()),
                epoch: rec.map_or(self.epoch_floor, |r| r.epoch),
            },
        }
    }
}

/// The timing a grant decision uses: the stricter of the timing the holder
/// was told and the current leader's.
fn grant_timing(rec: &LeaseRecord, leader: LeaseTiming) -> LeaseTiming {
    match rec.timing {
        None => leader,
        Some(told) => LeaseTiming {
            max_clock_drift_ppm: told.max_clock_drift_ppm.max(leader.max_clock_drift_ppm),
            lease_margin_ms: told.lease_margin_ms.max(leader.lease_margin_ms),
            // Only the current leader's (test-only) setting counts.
            test_only_skip_wait: leader.test_only_skip_wait,
        },
    }
}

fn view(group: &str, rec: &LeaseRecord, now: ReaderClock) -> LeaseView {
    let (holder, remaining_ms, state) = match (&rec.holder, now) {
        (None, _) => (None, 0, LeaseState::Free),
        (Some(h), ReaderClock::Unknown) => (Some(h.clone()), rec.ttl_ms, LeaseState::Held),
        (Some(h), ReaderClock::Now(now)) => {
            let expires = rec.renewed_at_ms.saturating_add(rec.ttl_ms);
            let timing = rec.timing.unwrap_or_default();
            if now < expires {
                (Some(h.clone()), expires - now, LeaseState::Held)
            } else if now < timing.grantable_at_ms(rec.renewed_at_ms, rec.ttl_ms) {
                (Some(h.clone()), 0, LeaseState::Expiring)
            } else {
                (None, 0, LeaseState::Free)
            }
        }
    };
    LeaseView {
        group: group.to_owned(),
        holder,
        epoch: rec.epoch,
        ttl_ms: rec.ttl_ms,
        remaining_ms,
        state,
        revision: rec.revision,
    }
}

fn check_names(group: &str, holder: &str) -> Result<(), Rejection> {
    names::validate(NameKind::Group, group)?;
    names::validate(NameKind::Holder, holder)?;
    Ok(())
}

fn rejected_outcome(r: Rejection) -> Applied {
    Applied { outcome: Outcome::Rejected(r), changes: Vec::new() }
}

mod lifecycle;

pub use self::lifecycle::RestoreError;

#[cfg(test)]
mod tests;

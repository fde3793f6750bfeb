//! The role decisions of one member's agent in a managed group, as a pure
//! state machine.
//!
//! The agent's runtime (`quorate::agent::role`) feeds [`RoleMachine::step`]
//! everything that happens — lease keeper events, election views pushed by
//! the coordinators, its own data service's state, the results of actions,
//! and a tick — each with `now` on the agent's monotonic clock in
//! milliseconds. `step` returns [`Action`]s as data; the runtime executes
//! them and reports their results back as [`Event::Done`]. This is the split
//! of openraft's engine and runtime: every rule about when to promote,
//! fence, follow or take the lease lives here and is tested without sockets
//! or sleeps.
//!
//! The rules:
//!
//! - **Fence by the deadline.** Every lease deadline the keeper reports is
//!   handed at once to the fencer ([`Action::ArmFence`]), before any
//!   promotion, so the fencer (a task of its own that only talks to the
//!   local data service) stops writes at the deadline whatever else the
//!   agent is doing. A loss, a release or a deadline that passes without a
//!   renewal also fences at once ([`Action::FenceNow`]), retried until done.
//! - **Promote only under a valid lease**: [`Action::Promote`] carries the
//!   deadline, is only emitted before it, and is retried (on ticks) until it
//!   succeeds or the lease is gone.
//! - **Never act on a stale designation**: election views carry the Raft
//!   log index they were read at; a view older than one already seen is
//!   ignored. The keeper starts only when the newest view designates this
//!   member, and the agent follows only the newest view's holder, and only
//!   while it holds no lease itself.
//! - **A primary without a lease is fenced**: a data service that reports
//!   itself primary while this agent holds no lease (restarted with a
//!   master's config, an agent restarted beside it, a manual `REPLICAOF NO
//!   ONE`) is fenced once, until it is promoted under a lease or follows.
//! - A member takes the lease only when its data is fit to serve: it synced
//!   from a primary (or served as one) since its data service last started,
//!   or the group never had a holder, or its service is a primary already.

use crate::election::Role;

/// The election state of the group as one coordinator read it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ElectionView {
    /// The Raft log index the serving node had applied when it read this:
    /// views from different nodes are ordered by it.
    pub revision: u64,
    /// The only member allowed to hold the lease.
    pub designated: Option<String>,
    /// The lease holder (the primary), if any.
    pub holder: Option<String>,
    /// The lease epoch (the fencing token).
    pub epoch: u64,
    /// The target of a pending switchover.
    pub switchover_to: Option<String>,
}

/// What the agent sees of its own data service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceView {
    /// The agent could talk to it.
    pub reachable: bool,
    /// The role it reports; `None` when not known.
    pub role: Option<Role>,
    /// For a replica: its link to the primary is up.
    pub link_up: bool,
    /// Changes when the service restarts (Redis `run_id`); empty if unknown.
    pub run_id: String,
}

/// Actions that can fail and are retried until they succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    /// [`Action::Promote`].
    Promote,
    /// [`Action::FenceNow`].
    Fence,
    /// [`Action::Follow`].
    Follow,
    /// [`Action::Switchover`].
    Switchover,
}

/// Something that happened, fed to [`RoleMachine::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Time passed (the runtime ticks every heartbeat interval).
    Tick,
    /// The keeper acquired the lease; it is valid until `valid_until_ms`.
    Acquired {
        /// The epoch of the grant (the fencing token).
        epoch: u64,
        /// The keeper's deadline, on the agent's clock.
        valid_until_ms: u64,
    },
    /// The keeper renewed the lease.
    Renewed {
        /// The epoch of the grant (the fencing token).
        epoch: u64,
        /// The new deadline, on the agent's clock.
        valid_until_ms: u64,
    },
    /// The keeper lost the lease (refused, or its deadline is near).
    Lost {
        /// The epoch of the grant (the fencing token).
        epoch: u64,
    },
    /// The keeper released the lease (switchover).
    Released {
        /// The epoch of the grant (the fencing token).
        epoch: u64,
    },
    /// The keeper task ended (after a loss or release, or it failed).
    KeeperEnded,
    /// A view of the group's election.
    Election(ElectionView),
    /// The data service's state.
    Service(ServiceView),
    /// An action finished.
    Done {
        /// Which action.
        action: ActionKind,
        /// Whether it succeeded; a failure is retried.
        ok: bool,
    },
}

/// What the runtime must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a lease keeper (acquire, waiting for the old lease to expire).
    StartKeeper,
    /// Tell the fencer the lease's deadline: it stops writes then unless a
    /// later deadline arrives first (and keeps the lease key until then).
    ArmFence {
        /// The epoch of the lease the deadline belongs to.
        epoch: u64,
        /// When writes must stop, on the agent's clock.
        deadline_ms: u64,
    },
    /// Stop writes now (the lease is lost, released or past its deadline).
    FenceNow,
    /// Make the data service primary under `epoch`; writes may be opened
    /// only before `deadline_ms`.
    Promote {
        /// The epoch of the lease it serves under.
        epoch: u64,
        /// The lease's deadline, on the agent's clock.
        deadline_ms: u64,
    },
    /// Replicate from `holder` (this ends a fence: a replica refuses
    /// writes by itself). The fencer is disarmed first.
    Follow {
        /// The lease holder (the primary).
        holder: String,
        /// The holder's epoch, so the follow can be matched to its view.
        epoch: u64,
    },
    /// Hand the primary role to `target` (pause, wait for it to catch up,
    /// release the lease, follow it).
    Switchover {
        /// The member that takes over.
        target: String,
    },
}

/// The lease as this agent holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The epoch of the grant (the fencing token).
    pub epoch: u64,
    /// The keeper's deadline, on the agent's clock.
    pub valid_until_ms: u64,
    /// The data service was promoted under this lease.
    pub promoted: bool,
}

/// The shortest time between two keeper starts: a keeper that ends at once
/// (refused, say, by a coordinator that knows a newer designation) is
/// restarted on a later tick, not in a loop.
pub const KEEPER_RESTART_MS: u64 = 100;

/// The role state machine of one member's agent.
#[derive(Debug, Clone)]
pub struct RoleMachine {
    me: String,
    held: Option<Held>,
    keeper_running: bool,
    /// When the last keeper was started.
    keeper_started_ms: Option<u64>,
    fence_owed: bool,
    election: Option<ElectionView>,
    service: ServiceView,
    /// The epoch of the primary this member last synced from (or served
    /// under) since its data service started.
    synced_epoch: Option<u64>,
    /// The epoch of the holder the last successful follow targeted.
    following_epoch: Option<u64>,
    /// The view revision of the last switchover attempt (one per view).
    switchover_tried_at: Option<u64>,
    /// The service was fenced while primary without a lease held; reset by
    /// a promotion, a follow or a restart of the service.
    unheld_primary_fenced: bool,
}

impl RoleMachine {
    /// The machine of the agent of member `me`, before any event: no
    /// lease, no view, nothing owed.
    pub fn new(me: &str) -> Self {
        Self {
            me: me.to_owned(),
            held: None,
            keeper_running: false,
            keeper_started_ms: None,
            fence_owed: false,
            election: None,
            service: ServiceView::default(),
            synced_epoch: None,
            following_epoch: None,
            switchover_tried_at: None,
            unheld_primary_fenced: false,
        }
    }

    /// The lease this agent holds, if any.
    pub fn held(&self) -> Option<Held> {
        self.held
    }

    /// The epoch this member last synced under (reported to the
    /// coordinators; a member that never synced is not a candidate).
    pub fn synced_epoch(&self) -> Option<u64> {
        self.synced_epoch
    }

    /// Whether a lease keeper is running (started and not yet ended).
    pub fn keeper_running(&self) -> bool {
        self.keeper_running
    }

    /// Whether a fence is owed (retried until an action reports it done).
    pub fn fence_owed(&self) -> bool {
        self.fence_owed
    }

    /// The newest election view seen.
    pub fn election(&self) -> Option<&ElectionView> {
        self.election.as_ref()
    }

    /// The data service's state as last fed in.
    pub fn service(&self) -> &ServiceView {
        &self.service
    }

    /// Whether this member holds the lease at `now_ms`: granted, and its
    /// deadline not passed.
    pub fn holds_lease(&self, now_ms: u64) -> bool {
        self.held.is_some_and(|h| now_ms < h.valid_until_ms)
    }

    /// Whether this member serves as the primary at `now_ms`: it holds the
    /// lease, its data service was promoted under it (the fencer opened
    /// writes), and the service reports itself primary. The one definition
    /// behind the agent's `/primary` health check: a primary past its
    /// deadline is fenced, and so is one that never got the lease.
    pub fn serves_as_primary(&self, now_ms: u64) -> bool {
        self.holds_lease(now_ms)
            && self.held.is_some_and(|h| h.promoted)
            && self.service.reachable
            && self.service.role == Some(Role::Primary)
    }

    /// Feeds one event at `now_ms`; returns the actions to perform, in order.
    ///
    /// Each event first updates the state (edge-triggered: only what that
    /// event says); the events that can change what is owed then run
    /// `decide` (level-triggered: everything the state asks for).
    pub fn step(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        let decide = match event {
            Event::Tick => true,
            Event::Acquired { epoch, valid_until_ms } => {
                self.on_acquired(epoch, valid_until_ms, &mut out);
                true
            }
            Event::Renewed { epoch, valid_until_ms } => {
                self.on_renewed(epoch, valid_until_ms, &mut out);
                false
            }
            Event::Lost { epoch } | Event::Released { epoch } => {
                if self.held.is_some_and(|h| h.epoch == epoch) {
                    self.lose();
                }
                true
            }
            Event::KeeperEnded => {
                self.keeper_running = false;
                if self.held.is_some() {
                    self.lose();
                }
                true
            }
            Event::Election(view) => self.on_election(view),
            Event::Service(svc) => {
                self.on_service(svc);
                false
            }
            Event::Done { action, ok } => {
                self.on_done(action, ok);
                false
            }
        };
        if decide {
            self.decide(now_ms, &mut out);
        }
        out
    }

    fn on_acquired(&mut self, epoch: u64, valid_until_ms: u64, out: &mut Vec<Action>) {
        // The fencer learns the deadline before the service becomes
        // primary, so there is never a writable primary without one.
        self.held = Some(Held { epoch, valid_until_ms, promoted: false });
        self.fence_owed = false;
        self.synced_epoch = Some(epoch);
        out.push(Action::ArmFence { epoch, deadline_ms: valid_until_ms });
    }

    /// A renewal of the lease held moves the fence's deadline on; one of
    /// another epoch, or an earlier deadline, is ignored.
    fn on_renewed(&mut self, epoch: u64, valid_until_ms: u64, out: &mut Vec<Action>) {
        if let Some(h) = self.held.as_mut()
            && h.epoch == epoch
            && valid_until_ms >= h.valid_until_ms
        {
            h.valid_until_ms = valid_until_ms;
            out.push(Action::ArmFence { epoch, deadline_ms: valid_until_ms });
        }
    }

    /// Keeps `view` unless a newer one was seen; true if kept. A stale
    /// view is ignored and decides nothing: acting on it could follow or
    /// take the lease for an outdated designation.
    fn on_election(&mut self, view: ElectionView) -> bool {
        if self.election.as_ref().is_some_and(|e| view.revision < e.revision) {
            return false;
        }
        self.election = Some(view);
        true
    }

    /// Takes in the data service's state: a restart forgets its sync, a
    /// replica linked to the holder it follows has synced, and a primary
    /// with no lease held here is owed a fence.
    fn on_service(&mut self, svc: ServiceView) {
        if !svc.run_id.is_empty() && !self.service.run_id.is_empty() && svc.run_id != self.service.run_id {
            // Restarted (perhaps empty): it must resync first.
            self.synced_epoch = None;
            self.following_epoch = None;
            self.unheld_primary_fenced = false;
        }
        if svc.run_id.is_empty() && !self.service.run_id.is_empty() {
            // Unreachable: keep the last known run id.
            self.service = ServiceView { run_id: self.service.run_id.clone(), ..svc };
        } else {
            self.service = svc;
        }
        if self.held.is_none()
            && self.service.role == Some(Role::Replica)
            && self.service.link_up
            && let Some(e) = self.following_epoch
        {
            self.synced_epoch = Some(e);
        }
        if self.held.is_none()
            && self.service.reachable
            && self.service.role == Some(Role::Primary)
            && !self.unheld_primary_fenced
        {
            // Writable, perhaps, with nobody's lease behind it.
            self.fence_owed = true;
        }
    }

    /// Records what a successful action achieved; a failed one is simply
    /// retried by later decisions.
    fn on_done(&mut self, action: ActionKind, ok: bool) {
        match (action, ok) {
            (ActionKind::Promote, true) => {
                if let Some(h) = self.held.as_mut() {
                    h.promoted = true;
                }
                self.unheld_primary_fenced = false;
            }
            (ActionKind::Fence, true) => {
                self.fence_owed = false;
                self.unheld_primary_fenced = self.held.is_none();
            }
            (ActionKind::Follow, true) => {
                self.fence_owed = false;
                self.unheld_primary_fenced = false;
                self.following_epoch = self.election.as_ref().map(|e| e.epoch);
            }
            _ => {}
        }
    }

    fn lose(&mut self) {
        self.held = None;
        self.fence_owed = true;
    }

    /// The level-triggered part: owed actions and what the newest view asks.
    fn decide(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        if self.held.is_some_and(|h| now_ms >= h.valid_until_ms) {
            // The deadline passed without a renewal (the fencer has already
            // acted on it; this keeps the machine's view in line).
            self.lose();
        }
        if self.fence_owed {
            out.push(Action::FenceNow);
        }
        if let Some(h) = self.held
            && !h.promoted
        {
            out.push(Action::Promote { epoch: h.epoch, deadline_ms: h.valid_until_ms });
        }
        let Some(view) = self.election.clone() else { return };
        let me = self.me.as_str();
        if view.designated.as_deref() == Some(me)
            && !self.keeper_running
            && self.keeper_started_ms.is_none_or(|t| now_ms >= t.saturating_add(KEEPER_RESTART_MS))
            && self.service.reachable
            && self.may_take(&view)
        {
            self.keeper_running = true;
            self.keeper_started_ms = Some(now_ms);
            out.push(Action::StartKeeper);
        }
        match (self.held, view.holder.as_deref()) {
            (Some(h), _) => {
                if h.promoted
                    && let Some(target) = view.switchover_to.as_deref().filter(|t| *t != me)
                    && self.switchover_tried_at.is_none_or(|r| view.revision > r)
                {
                    self.switchover_tried_at = Some(view.revision);
                    out.push(Action::Switchover { target: target.to_owned() });
                }
            }
            (None, Some(holder)) if holder != me => {
                out.push(Action::Follow { holder: holder.to_owned(), epoch: view.epoch });
            }
            // Nobody else holds the lease: stay as we are (fenced if we
            // lost it).
            (None, _) => {}
        }
    }

    fn may_take(&self, view: &ElectionView) -> bool {
        view.epoch == 0 || self.synced_epoch.is_some() || self.service.role == Some(Role::Primary)
    }
}

#[cfg(test)]
mod tests;

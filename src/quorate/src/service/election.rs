//! Managed groups: election status, maintenance, failover blocks,
//! switchover (with its wait for the new holder) and what-if.
//!
//! The decisions are the core's (`quorate_core::election`); what lives here
//! is reading them off the replicated state at a consistency level, and the
//! one waiting protocol: a switchover call returns when the target holds
//! the lease, or says why it never will.

use crate::tls::caller::Caller;
use quorate_core::access::Action;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use quorate_core::election::{Candidate, Decision, HistoryEntry, MemberStatus, candidates, decide_for, decision_text};
use quorate_core::machine::Outcome;
use quorate_core::matrix::GroupState;
use quorate_core::names::NameKind;
use quorate_core::verdict::verdict;
use quorate_core::{LeaseView, Op};
use tokio::sync::broadcast;

use super::groups::no_such_group;
use super::leases::{check_name, rejection, unexpected};
use super::{Node, ReadConsistency, ServiceError};
use crate::raft::state_machine::ChangeEvent;

/// The default and largest wait of a switchover call.
pub const DEFAULT_SWITCHOVER_WAIT: Duration = Duration::from_secs(30);
pub const MAX_SWITCHOVER_WAIT: Duration = Duration::from_secs(300);

/// A managed group's election as the serving node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionStatus {
    pub group: String,
    pub designated: Option<String>,
    pub lease: LeaseView,
    pub maintenance: bool,
    /// How long automatic failover stays blocked (0: not blocked).
    pub failover_blocked_ms: u64,
    pub switchover_to: Option<String>,
    pub history: Vec<HistoryEntry>,
    /// Every member but the designated one, best first.
    pub candidates: Vec<Candidate>,
    pub members: BTreeMap<String, MemberStatus>,
    /// What the leader would decide now, in words.
    pub decision: String,
    /// The log index this status was read at.
    pub revision: u64,
}

/// What a completed switchover did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switched {
    pub to: String,
    pub epoch: u64,
    pub took_ms: u64,
}

/// What the leader would decide if some members were down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhatIf {
    pub decision: Decision,
    /// The decision in words.
    pub text: String,
    pub candidates: Vec<Candidate>,
}

impl WhatIf {
    /// The member the decision designates, if it designates one.
    pub fn to(&self) -> Option<&str> {
        match &self.decision {
            Decision::Designate { to, .. } => Some(to),
            _ => None,
        }
    }
}

/// `g` if it is managed, else why the operation needs it to be.
fn managed(g: &GroupState) -> Result<&GroupState, ServiceError> {
    if g.spec.is_managed() {
        Ok(g)
    } else {
        Err(ServiceError::Precondition(format!(
            "group {:?} is not managed: add a [failover] section to its spec",
            g.spec.name
        )))
    }
}

impl Node {
    /// The election status of managed group `group`.
    pub async fn election_status(
        &self,
        caller: &Caller,
        group: &str,
        consistency: ReadConsistency,
    ) -> Result<ElectionStatus, ServiceError> {
        caller.check(Action::Read)?;
        check_name(NameKind::Group, group)?;
        self.confirm_read(consistency).await?;
        let voters = self.reader.voters();
        self.reader.with_machine_at(|m, clock, revision| {
            let g = managed(m.group(group).ok_or_else(|| no_such_group(group))?)?;
            let now = self.reader.machine_now(m);
            let v = verdict(g, &voters, now);
            let policy = g.spec.failover.clone().unwrap_or_default();
            let decision = decide_for(g, &v, now, now.saturating_sub(m.clock_started_ms()));
            let designated = g.election.designated.clone();
            Ok(ElectionStatus {
                group: group.to_owned(),
                candidates: candidates(&g.spec, &g.statuses, &v, designated.as_deref(), policy.max_lag_bytes),
                designated,
                lease: m.lease(group, clock),
                maintenance: g.election.maintenance,
                failover_blocked_ms: g
                    .election
                    .failover_blocked_for_ms(policy.min_failover_interval_ms, now)
                    .unwrap_or(0),
                switchover_to: g.election.switchover.as_ref().map(|s| s.to.clone()),
                history: g.election.history.iter().cloned().collect(),
                members: g.statuses.clone(),
                decision: decision_text(&decision),
                revision,
            })
        })
    }

    /// Proposes an election command and answers with the status after it.
    async fn election_op(&self, group: &str, op: Op) -> Result<ElectionStatus, ServiceError> {
        check_name(NameKind::Group, group)?;
        match self.propose(op).await? {
            Outcome::ElectionChanged { .. } => {}
            Outcome::Rejected(r) => return Err(rejection(r)),
            other => return Err(unexpected("an election command", &other)),
        }
        self.election_status(&Caller::Internal, group, ReadConsistency::Stale).await
    }

    /// Turns maintenance (no automatic failover) on or off.
    pub async fn set_maintenance(
        &self,
        caller: &Caller,
        group: &str,
        on: bool,
    ) -> Result<ElectionStatus, ServiceError> {
        caller.check(Action::Steer)?;
        self.election_op(group, Op::SetMaintenance { group: group.to_owned(), on }).await
    }

    /// Lifts the block on automatic failover after a recent one.
    pub async fn unblock_failover(&self, caller: &Caller, group: &str) -> Result<ElectionStatus, ServiceError> {
        caller.check(Action::Steer)?;
        self.election_op(group, Op::UnblockFailover { group: group.to_owned() }).await
    }

    /// Cancels a pending switchover.
    pub async fn cancel_switchover(
        &self,
        caller: &Caller,
        group: &str,
        reason: &str,
    ) -> Result<ElectionStatus, ServiceError> {
        caller.check(Action::Steer)?;
        self.election_op(group, Op::CancelSwitchover { group: group.to_owned(), reason: reason.to_owned() }).await
    }

    /// Starts a switchover (to `to`, or to the best candidate) and waits up
    /// to `wait_timeout_ms` (0: [`DEFAULT_SWITCHOVER_WAIT`], capped at
    /// [`MAX_SWITCHOVER_WAIT`]) for the target to hold the lease.
    pub async fn switchover(
        &self,
        caller: &Caller,
        group: &str,
        to: Option<&str>,
        wait_timeout_ms: u64,
    ) -> Result<Switched, ServiceError> {
        caller.check(Action::Steer)?;
        check_name(NameKind::Group, group)?;
        if let Some(to) = to {
            check_name(NameKind::Member, to)?;
        }
        let wait = match wait_timeout_ms {
            0 => DEFAULT_SWITCHOVER_WAIT,
            ms => Duration::from_millis(ms).min(MAX_SWITCHOVER_WAIT),
        };
        let started = Instant::now();
        // Subscribed before the proposal, so no change after it is missed.
        let changes = self.reader.subscribe();
        match self.propose(Op::Switchover { group: group.to_owned(), to: to.map(str::to_owned) }).await? {
            Outcome::ElectionChanged { .. } => {}
            Outcome::Rejected(rej) => return Err(rejection(rej)),
            other => return Err(unexpected("Switchover", &other)),
        }
        let target = self
            .reader
            .with_machine(|m, _| m.group(group).and_then(|g| g.election.switchover.as_ref().map(|s| s.to.clone())))
            .ok_or_else(|| ServiceError::Internal("the switchover vanished right after it was committed".into()))?;
        let epoch = self.wait_for_holder(group, &target, changes, wait).await?;
        Ok(Switched { to: target, epoch, took_ms: started.elapsed().as_millis() as u64 })
    }

    /// Waits until `target` holds `group`'s lease (its epoch), the
    /// switchover is cancelled, or `wait` passes.
    async fn wait_for_holder(
        &self,
        group: &str,
        target: &str,
        mut changes: broadcast::Receiver<ChangeEvent>,
        wait: Duration,
    ) -> Result<u64, ServiceError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let lease = self.reader.lease(group);
            if lease.holder.as_deref() == Some(target) {
                return Ok(lease.epoch);
            }
            let (pending, designated) = self.reader.with_machine(|m, _| {
                let g = m.group(group);
                (g.map(|g| g.election.switchover.is_some()), g.and_then(|g| g.election.designated.clone()))
            });
            if pending == Some(false) && designated.as_deref() != Some(target) {
                return Err(ServiceError::Precondition(format!(
                    "the switchover to {target} was cancelled (see `quorate history {group}` and the primary's agent log)"
                )));
            }
            tokio::select! {
                ev = changes.recv() => if let Err(broadcast::error::RecvError::Closed) = ev {
                    return Err(ServiceError::Stopped { node_id: self.id, detail: "state machine closed".into() });
                },
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ServiceError::OutcomeUnknown { waited_ms: wait.as_millis() as u64 });
                }
            }
        }
    }

    /// What the leader would decide if every observer judged the members in
    /// `down` down (a linearizable read; nothing is written).
    pub async fn what_if(&self, caller: &Caller, group: &str, down: &[String]) -> Result<WhatIf, ServiceError> {
        caller.check(Action::WhatIf)?;
        check_name(NameKind::Group, group)?;
        for m in down {
            check_name(NameKind::Member, m)?;
        }
        self.confirm_read(ReadConsistency::Linearizable).await?;
        let voters = self.reader.voters();
        self.reader.with_machine(|m, _| {
            let g = managed(m.group(group).ok_or_else(|| no_such_group(group))?)?;
            let now = self.reader.machine_now(m);
            let (decision, candidates) = quorate_core::election::what_if(g, &verdict(g, &voters, now), now, down)
                .map_err(ServiceError::InvalidArgument)?;
            Ok(WhatIf { text: decision_text(&decision), decision, candidates })
        })
    }
}

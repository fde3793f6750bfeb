//! Managed groups: election status, maintenance, failover blocks,
//! switchover, what-if.

use std::time::{Duration, Instant};

use quorate_core::Op;
use quorate_core::election::{Decision, candidates, decide_for, decision_text, what_if};
use quorate_core::machine::Outcome;
use quorate_core::matrix::GroupState;
use quorate_core::names::NameKind;
use quorate_core::verdict::verdict;
use tokio::sync::broadcast;

use super::CoordinatorService;
use crate::pb::v1 as pb;
use crate::service::ServiceError;
use crate::service::leases::{check_name, rejection};
use crate::wire::convert::{candidate_pb, history_pb, lease_pb, status_pb};

/// The default and largest wait of a switchover call.
const DEFAULT_SWITCHOVER_WAIT: Duration = Duration::from_secs(30);
const MAX_SWITCHOVER_WAIT: Duration = Duration::from_secs(300);

impl CoordinatorService {
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

    pub(super) async fn do_get_election(&self, r: pb::GetElectionRequest) -> Result<pb::ElectionStatus, ServiceError> {
        check_name(NameKind::Group, &r.group)?;
        self.confirm_read(r.consistency).await?;
        let voters = self.node.reader.voters();
        self.node.reader.with_machine_at(|m, clock, revision| {
            let g = Self::managed(
                m.group(&r.group).ok_or_else(|| ServiceError::NotFound(format!("no group named {:?}", r.group)))?,
            )?;
            let now = self.node.reader.machine_now(m);
            let v = verdict(g, &voters, now);
            let policy = g.spec.failover.clone().unwrap_or_default();
            let blocked = g.election.failover_blocked_for_ms(policy.min_failover_interval_ms, now).unwrap_or(0);
            let decision = decide_for(g, &v, now, now.saturating_sub(m.clock_started_ms()));
            let lease = m.lease(&r.group, clock);
            Ok(pb::ElectionStatus {
                group: r.group.clone(),
                designated: g.election.designated.clone().unwrap_or_default(),
                lease: Some(lease_pb(&lease)),
                maintenance: g.election.maintenance,
                failover_blocked_ms: blocked,
                switchover_to: g.election.switchover.as_ref().map(|s| s.to.clone()).unwrap_or_default(),
                history: g.election.history.iter().map(history_pb).collect(),
                candidates: candidates(
                    &g.spec,
                    &g.statuses,
                    &v,
                    g.election.designated.as_deref(),
                    policy.max_lag_bytes,
                )
                .iter()
                .map(candidate_pb)
                .collect(),
                members: g
                    .statuses
                    .iter()
                    .map(|(member, s)| pb::MemberStatusEntry { member: member.clone(), status: Some(status_pb(s)) })
                    .collect(),
                decision: decision_text(&decision),
                revision,
            })
        })
    }

    async fn election_op(&self, group: &str, op: Op) -> Result<pb::ElectionStatus, ServiceError> {
        check_name(NameKind::Group, group)?;
        match self.node.propose(op).await? {
            Outcome::ElectionChanged { .. } => {}
            Outcome::Rejected(r) => return Err(rejection(r)),
            other => return Err(ServiceError::Internal(format!("unexpected outcome: {other:?}"))),
        }
        self.do_get_election(pb::GetElectionRequest {
            group: group.to_owned(),
            consistency: pb::Consistency::Stale as i32,
        })
        .await
    }

    pub(super) async fn do_set_maintenance(
        &self,
        r: pb::SetMaintenanceRequest,
    ) -> Result<pb::ElectionStatus, ServiceError> {
        self.election_op(&r.group, Op::SetMaintenance { group: r.group.clone(), on: r.on }).await
    }

    pub(super) async fn do_unblock(&self, r: pb::UnblockFailoverRequest) -> Result<pb::ElectionStatus, ServiceError> {
        self.election_op(&r.group, Op::UnblockFailover { group: r.group.clone() }).await
    }

    pub(super) async fn do_cancel_switchover(
        &self,
        r: pb::CancelSwitchoverRequest,
    ) -> Result<pb::ElectionStatus, ServiceError> {
        self.election_op(&r.group, Op::CancelSwitchover { group: r.group.clone(), reason: r.reason.clone() }).await
    }

    pub(super) async fn do_switchover(&self, r: pb::SwitchoverRequest) -> Result<pb::SwitchoverResponse, ServiceError> {
        check_name(NameKind::Group, &r.group)?;
        if !r.to.is_empty() {
            check_name(NameKind::Member, &r.to)?;
        }
        let wait = match r.wait_timeout_ms {
            0 => DEFAULT_SWITCHOVER_WAIT,
            ms => Duration::from_millis(ms).min(MAX_SWITCHOVER_WAIT),
        };
        let started = Instant::now();
        let mut changes = self.node.reader.subscribe();
        let to = (!r.to.is_empty()).then(|| r.to.clone());
        match self.node.propose(Op::Switchover { group: r.group.clone(), to }).await? {
            Outcome::ElectionChanged { .. } => {}
            Outcome::Rejected(rej) => return Err(rejection(rej)),
            other => return Err(ServiceError::Internal(format!("unexpected outcome: {other:?}"))),
        }
        let target = self
            .node
            .reader
            .with_machine(|m, _| m.group(&r.group).and_then(|g| g.election.switchover.as_ref().map(|s| s.to.clone())));
        let Some(target) = target else {
            return Err(ServiceError::Internal("the switchover vanished right after it was committed".into()));
        };
        // Wait until the target holds the lease.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let lease = self.node.reader.lease(&r.group);
            if lease.holder.as_deref() == Some(target.as_str()) {
                return Ok(pb::SwitchoverResponse {
                    to: target,
                    epoch: lease.epoch,
                    took_ms: started.elapsed().as_millis() as u64,
                });
            }
            let pending =
                self.node.reader.with_machine(|m, _| m.group(&r.group).map(|g| g.election.switchover.is_some()));
            let designated =
                self.node.reader.with_machine(|m, _| m.group(&r.group).and_then(|g| g.election.designated.clone()));
            if pending == Some(false) && designated.as_deref() != Some(target.as_str()) {
                return Err(ServiceError::Precondition(format!(
                    "the switchover to {target} was cancelled (see `quorate history {}` and the primary's agent log)",
                    r.group
                )));
            }
            tokio::select! {
                ev = changes.recv() => match ev {
                    Ok(ev) if ev.change.group != r.group => {}
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(ServiceError::Stopped { node_id: self.node.id, detail: "state machine closed".into() });
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ServiceError::OutcomeUnknown { waited_ms: wait.as_millis() as u64 });
                }
            }
        }
    }

    pub(super) async fn do_whatif(&self, r: pb::WhatIfRequest) -> Result<pb::WhatIfResponse, ServiceError> {
        check_name(NameKind::Group, &r.group)?;
        for m in &r.down {
            check_name(NameKind::Member, m)?;
        }
        self.confirm_read(pb::Consistency::Linearizable as i32).await?;
        let voters = self.node.reader.voters();
        self.node.reader.with_machine(|m, _| {
            let g = Self::managed(
                m.group(&r.group).ok_or_else(|| ServiceError::NotFound(format!("no group named {:?}", r.group)))?,
            )?;
            let now = self.node.reader.machine_now(m);
            let (d, c) = what_if(g, &verdict(g, &voters, now), now, &r.down).map_err(ServiceError::InvalidArgument)?;
            let to = match &d {
                Decision::Designate { to, .. } => to.clone(),
                _ => String::new(),
            };
            Ok(pb::WhatIfResponse { decision: decision_text(&d), to, candidates: c.iter().map(candidate_pb).collect() })
        })
    }
}

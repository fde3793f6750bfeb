//! Managed groups over gRPC: election status, maintenance, failover blocks,
//! switchover, what-if. Decode → call `service::election` → encode.

use super::{CoordinatorService, read_consistency};
use crate::pb::v1 as pb;
use crate::service::ServiceError;
use crate::service::election::{ElectionStatus, WhatIf};
use crate::tls::caller::Caller;
use crate::wire::convert::{candidate_pb, history_pb, lease_pb, status_pb};

/// The election status as protobuf.
fn election_pb(e: ElectionStatus) -> pb::ElectionStatus {
    pb::ElectionStatus {
        group: e.group,
        designated: e.designated.unwrap_or_default(),
        lease: Some(lease_pb(&e.lease)),
        maintenance: e.maintenance,
        failover_blocked_ms: e.failover_blocked_ms,
        switchover_to: e.switchover_to.unwrap_or_default(),
        history: e.history.iter().map(history_pb).collect(),
        candidates: e.candidates.iter().map(candidate_pb).collect(),
        members: e
            .members
            .iter()
            .map(|(member, s)| pb::MemberStatusEntry { member: member.clone(), status: Some(status_pb(s)) })
            .collect(),
        decision: e.decision,
        revision: e.revision,
    }
}

fn what_if_pb(w: &WhatIf) -> pb::WhatIfResponse {
    pb::WhatIfResponse {
        decision: w.text.clone(),
        to: w.to().unwrap_or_default().to_owned(),
        candidates: w.candidates.iter().map(candidate_pb).collect(),
    }
}

impl CoordinatorService {
    pub(super) async fn get_election_pb(
        &self,
        c: &Caller,
        r: pb::GetElectionRequest,
    ) -> Result<pb::ElectionStatus, ServiceError> {
        let (consistency, _) = read_consistency(r.consistency)?;
        Ok(election_pb(self.node.election_status(c, &r.group, consistency).await?))
    }

    pub(super) async fn set_maintenance_pb(
        &self,
        c: &Caller,
        r: pb::SetMaintenanceRequest,
    ) -> Result<pb::ElectionStatus, ServiceError> {
        Ok(election_pb(self.node.set_maintenance(c, &r.group, r.on).await?))
    }

    pub(super) async fn unblock_pb(
        &self,
        c: &Caller,
        r: pb::UnblockFailoverRequest,
    ) -> Result<pb::ElectionStatus, ServiceError> {
        Ok(election_pb(self.node.unblock_failover(c, &r.group).await?))
    }

    pub(super) async fn cancel_switchover_pb(
        &self,
        c: &Caller,
        r: pb::CancelSwitchoverRequest,
    ) -> Result<pb::ElectionStatus, ServiceError> {
        Ok(election_pb(self.node.cancel_switchover(c, &r.group, &r.reason).await?))
    }

    pub(super) async fn switchover_pb(
        &self,
        c: &Caller,
        r: pb::SwitchoverRequest,
    ) -> Result<pb::SwitchoverResponse, ServiceError> {
        let to = (!r.to.is_empty()).then_some(r.to.as_str());
        let s = self.node.switchover(c, &r.group, to, r.wait_timeout_ms).await?;
        Ok(pb::SwitchoverResponse { to: s.to, epoch: s.epoch, took_ms: s.took_ms })
    }

    pub(super) async fn what_if_pb(
        &self,
        c: &Caller,
        r: pb::WhatIfRequest,
    ) -> Result<pb::WhatIfResponse, ServiceError> {
        Ok(what_if_pb(&self.node.what_if(c, &r.group, &r.down).await?))
    }
}

//! Cluster membership over gRPC: members, add a node, remove a node.
//! Decode → call `service::membership` → encode.

use std::time::Duration;

use quorate_core::quorum::QuorumResult;

use super::CoordinatorService;
use crate::pb::v1 as pb;
use crate::service::ServiceError;
use crate::service::membership::Members;
use crate::tls::caller::Caller;

/// "yes", "no" or "unknown".
fn answer(q: QuorumResult) -> &'static str {
    match q {
        QuorumResult::Yes => "yes",
        QuorumResult::No => "no",
        QuorumResult::NotEnoughInformation => "unknown",
    }
}

fn members_pb(m: &Members) -> pb::ClusterMembersResponse {
    let nodes = m
        .view
        .nodes
        .iter()
        .map(|(id, addr)| {
            let progress = m.view.progress.nodes.iter().find(|n| n.id == *id);
            pb::ClusterMember {
                id: *id,
                addr: addr.clone(),
                role: m.role(*id).into(),
                voter: m.view.voters.contains(id),
                currency: m.currency(*id).as_str().into(),
                lag_entries: progress.and_then(|p| p.lag_entries),
                last_contact_ms: m.view.last_contact.get(id).map(|d| d.as_millis() as u64),
                safe_to_stop: answer(m.safe_to_stop(*id)).into(),
            }
        })
        .collect();
    pb::ClusterMembersResponse {
        voters: m.view.voters.iter().copied().collect(),
        learners: m.view.progress.learners().into_iter().collect(),
        nodes,
        leader_id: m.leader,
        joint: m.view.joint,
        removed: m.removed.iter().copied().collect(),
    }
}

impl CoordinatorService {
    pub(super) async fn cluster_members_pb(&self, c: &Caller) -> Result<pb::ClusterMembersResponse, ServiceError> {
        Ok(members_pb(&self.node.cluster_members(c).await?))
    }

    pub(super) async fn add_node_pb(
        &self,
        c: &Caller,
        r: pb::AddNodeRequest,
    ) -> Result<pb::AddNodeResponse, ServiceError> {
        let wait = (r.wait_timeout_ms > 0).then(|| Duration::from_millis(r.wait_timeout_ms));
        let a = self.node.add_node(c, r.id, &r.addr, wait).await?;
        Ok(pb::AddNodeResponse { id: a.id, was_member: a.was_member, caught_up_ms: a.caught_up_ms, took_ms: a.took_ms })
    }

    pub(super) async fn remove_node_pb(
        &self,
        c: &Caller,
        r: pb::RemoveNodeRequest,
    ) -> Result<pb::RemoveNodeResponse, ServiceError> {
        let d = self.node.remove_node(c, r.id).await?;
        Ok(pb::RemoveNodeResponse { id: d.id, was_voter: d.was_voter, took_ms: d.took_ms })
    }
}

//! The public gRPC service (`quorate.v1.Coordinator`): a translation between
//! protobuf and the service layer (`crate::service`). Every operation is
//! decode → call → encode (leases here; `groups`, `election`,
//! `membership` and `watch` beside it); the rules, validation and waiting live in the service layer,
//! decisions are the state machine's, and every error leaves through
//! `status` (the one mapping of [`ServiceError`] to gRPC status).

mod election;
mod groups;
mod membership;
mod status;
mod watch;

pub use self::groups::{report_from_pb, reported_pb};
pub use crate::wire::lease_pb;

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use quorate_core::LeaseTiming;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use crate::pb::v1 as pb;
use crate::pb::v1::coordinator_server::{Coordinator, CoordinatorServer};
use crate::service::ServiceError;
use crate::service::batch;
use crate::service::leases::{AcquireRequest, Acquired};
use crate::service::{Node, ReadConsistency};
use crate::tls::caller::Caller;
use crate::tls::transport::Peer;
use crate::wire::convert::timing_pb;
use quorate_core::access::Action;

/// Implements `quorate.v1.Coordinator` on one node.
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    node: Node,
    reports: batch::Batcher,
}

impl CoordinatorService {
    /// The service of `node`, whose reports go through `reports`.
    pub fn new(node: Node, reports: batch::Batcher) -> Self {
        Self { node, reports }
    }

    pub fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
    }

    fn timing(&self) -> LeaseTiming {
        self.node.config.lease_timing()
    }

    fn acquired(&self, a: &Acquired) -> pb::AcquireResponse {
        pb::AcquireResponse {
            acquired: a.acquired,
            lease: Some(lease_pb(&a.lease)),
            retry_after_ms: a.retry_after_ms,
            timing: Some(timing_pb(self.timing())),
        }
    }

    async fn do_acquire(&self, c: &Caller, r: pb::AcquireRequest) -> Result<pb::AcquireResponse, ServiceError> {
        let req = AcquireRequest {
            group: r.group,
            holder: r.holder,
            ttl_ms: r.ttl_ms,
            wait: r.wait,
            wait_timeout_ms: r.wait_timeout_ms,
        };
        Ok(self.acquired(&self.node.acquire(c, req).await?))
    }

    async fn do_renew(&self, c: &Caller, r: pb::RenewRequest) -> Result<pb::RenewResponse, ServiceError> {
        let lease = self.node.renew(c, r.group, r.holder, r.epoch).await?;
        Ok(pb::RenewResponse { lease: Some(lease_pb(&lease)), timing: Some(timing_pb(self.timing())) })
    }

    async fn do_release(&self, c: &Caller, r: pb::ReleaseRequest) -> Result<pb::ReleaseResponse, ServiceError> {
        let lease = self.node.release(c, r.group, r.holder, r.epoch).await?;
        Ok(pb::ReleaseResponse { lease: Some(lease_pb(&lease)) })
    }

    async fn do_get_lease(&self, c: &Caller, r: pb::GetLeaseRequest) -> Result<pb::GetLeaseResponse, ServiceError> {
        let (read, served) = read_consistency(r.consistency)?;
        let lease = self.node.read_lease(c, &r.group, read).await?;
        Ok(pb::GetLeaseResponse { lease: Some(lease_pb(&lease)), served_by: self.node.id, consistency: served as i32 })
    }

    fn do_status(&self) -> pb::StatusResponse {
        let st = self.node.raft.status();
        let nodes = st
            .members
            .iter()
            .map(|n| pb::NodeStatus {
                id: n.id,
                addr: n.addr.clone(),
                role: n.role.into(),
                reachable: n.reachable,
                last_ack_ms: n.last_ack.map(|d| d.as_millis() as u64),
            })
            .collect();
        pb::StatusResponse {
            node_id: self.node.id,
            role: st.role.as_str().into(),
            term: st.term,
            leader_id: st.leader,
            leader_addr: st.leader.and_then(|l| self.node.node_addr(l)).unwrap_or_default(),
            last_log_index: st.last_log_index,
            last_applied: st.applied,
            nodes,
            initialized: st.initialized,
            version: crate::VERSION.into(),
            lease_groups: self.node.reader.lease_count() as u64,
            caught_up: self.node.readiness.caught_up(),
            removed: self.node.reader.removed_nodes().into_iter().collect(),
        }
    }
}

/// A requested consistency level, and the level that serves it.
pub(super) fn read_consistency(consistency: i32) -> Result<(ReadConsistency, pb::Consistency), ServiceError> {
    let consistency = pb::Consistency::try_from(consistency)
        .map_err(|_| ServiceError::InvalidArgument(format!("consistency {consistency} is not a known value")))?;
    Ok(match consistency {
        pb::Consistency::Unspecified | pb::Consistency::Linearizable => {
            (ReadConsistency::Linearizable, pb::Consistency::Linearizable)
        }
        pb::Consistency::LeaseRead => (ReadConsistency::LeaseRead, pb::Consistency::LeaseRead),
        pb::Consistency::ReadIndex => (ReadConsistency::ReadIndex, pb::Consistency::ReadIndex),
        pb::Consistency::Stale => (ReadConsistency::Stale, pb::Consistency::Stale),
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;
type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

/// The most file bytes one `SnapshotChunk` carries: well under tonic's
/// 4 MiB message limit.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// A backup file as a stream of chunks. The file is read (and every error
/// reported) before the stream starts, so a refusal is a status the client
/// follows (not the leader: retried there) rather than a broken stream.
fn snapshot_chunks(file: crate::service::snapshot::SnapshotFile) -> SnapshotStream {
    let total_bytes = file.bytes.len() as u64;
    let (revision, served_by) = (file.revision, file.served_by);
    let chunks: Vec<Result<pb::SnapshotChunk, Status>> = file
        .bytes
        .chunks(SNAPSHOT_CHUNK_BYTES)
        .map(|data| Ok(pb::SnapshotChunk { data: data.to_vec(), total_bytes, revision, served_by }))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn acquire(&self, req: Request<pb::AcquireRequest>) -> Result<Response<pb::AcquireResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("acquire", group = %r.group, holder = %r.holder, node_id = self.node.id);
        Ok(Response::new(self.do_acquire(&c, r).instrument(span).await?))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("renew", group = %r.group, holder = %r.holder, epoch = r.epoch);
        Ok(Response::new(self.do_renew(&c, r).instrument(span).await?))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("release", group = %r.group, holder = %r.holder, epoch = r.epoch);
        Ok(Response::new(self.do_release(&c, r).instrument(span).await?))
    }

    async fn get_lease(&self, req: Request<pb::GetLeaseRequest>) -> Result<Response<pb::GetLeaseResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = tracing::debug_span!("get_lease", group = %r.group);
        Ok(Response::new(self.do_get_lease(&c, r).instrument(span).await?))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let c = Caller::of_request(&req);
        let conn = Peer::of_request(&req).and_then(|p| p.addr);
        let group = req.into_inner().group;
        let span = info_span!("watch", group = %group, node_id = self.node.id);
        // The watch ends, and its slot is free, when the client goes away
        // (the stream is dropped) or the node stops.
        let events = span.in_scope(|| self.node.watch(&c, conn, &group))?;
        Ok(Response::new(Box::pin(events.map(|ev| Ok(watch::watch_event_pb(ev))))))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Caller::of_request(&req).check(Action::Read).map_err(ServiceError::from)?;
        Ok(Response::new(self.do_status()))
    }

    async fn apply_group(
        &self,
        req: Request<pb::ApplyGroupRequest>,
    ) -> Result<Response<pb::ApplyGroupResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("apply_group", group = r.spec.as_ref().map_or("", |s| s.name.as_str()));
        Ok(Response::new(self.apply_group_pb(&c, r).instrument(span).await?))
    }

    async fn get_group(&self, req: Request<pb::GetGroupRequest>) -> Result<Response<pb::GetGroupResponse>, Status> {
        Ok(Response::new(self.get_group_pb(&Caller::of_request(&req), req.into_inner()).await?))
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        Ok(Response::new(self.list_groups_pb(&Caller::of_request(&req))?))
    }

    async fn report(&self, req: Request<pb::ReportRequest>) -> Result<Response<pb::ReportResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = tracing::debug_span!("report", observer = %r.observer, views = r.views.len());
        Ok(Response::new(self.report_pb(&c, r).instrument(span).await?))
    }

    async fn get_matrix(&self, req: Request<pb::GetMatrixRequest>) -> Result<Response<pb::Matrix>, Status> {
        Ok(Response::new(self.get_matrix_pb(&Caller::of_request(&req), req.into_inner()).await?))
    }

    async fn explain(&self, req: Request<pb::ExplainRequest>) -> Result<Response<pb::ExplainResponse>, Status> {
        Ok(Response::new(self.explain_pb(&Caller::of_request(&req), req.into_inner()).await?))
    }

    async fn get_election(&self, req: Request<pb::GetElectionRequest>) -> Result<Response<pb::ElectionStatus>, Status> {
        Ok(Response::new(self.get_election_pb(&Caller::of_request(&req), req.into_inner()).await?))
    }

    async fn set_maintenance(
        &self,
        req: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::ElectionStatus>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("set_maintenance", group = %r.group, on = r.on);
        Ok(Response::new(self.set_maintenance_pb(&c, r).instrument(span).await?))
    }

    async fn unblock_failover(
        &self,
        req: Request<pb::UnblockFailoverRequest>,
    ) -> Result<Response<pb::ElectionStatus>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("unblock_failover", group = %r.group);
        Ok(Response::new(self.unblock_pb(&c, r).instrument(span).await?))
    }

    async fn switchover(
        &self,
        req: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::SwitchoverResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("switchover", group = %r.group, to = %r.to);
        Ok(Response::new(self.switchover_pb(&c, r).instrument(span).await?))
    }

    async fn cancel_switchover(
        &self,
        req: Request<pb::CancelSwitchoverRequest>,
    ) -> Result<Response<pb::ElectionStatus>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("cancel_switchover", group = %r.group, reason = %r.reason);
        Ok(Response::new(self.cancel_switchover_pb(&c, r).instrument(span).await?))
    }

    async fn what_if(&self, req: Request<pb::WhatIfRequest>) -> Result<Response<pb::WhatIfResponse>, Status> {
        Ok(Response::new(self.what_if_pb(&Caller::of_request(&req), req.into_inner()).await?))
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("delete_group", group = %r.group, force = r.force);
        Ok(Response::new(self.delete_group_pb(&c, r).instrument(span).await?))
    }

    type SaveSnapshotStream = SnapshotStream;

    async fn save_snapshot(
        &self,
        req: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<Self::SaveSnapshotStream>, Status> {
        let c = Caller::of_request(&req);
        let span = info_span!("save_snapshot", node_id = self.node.id);
        let file = self.node.save_snapshot(&c).instrument(span).await?;
        Ok(Response::new(snapshot_chunks(file)))
    }

    async fn cluster_members(
        &self,
        req: Request<pb::ClusterMembersRequest>,
    ) -> Result<Response<pb::ClusterMembersResponse>, Status> {
        Ok(Response::new(self.cluster_members_pb(&Caller::of_request(&req)).await?))
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Result<Response<pb::AddNodeResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("add_node", node = r.id, addr = %r.addr);
        Ok(Response::new(self.add_node_pb(&c, r).instrument(span).await?))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let c = Caller::of_request(&req);
        let r = req.into_inner();
        let span = info_span!("remove_node", node = r.id);
        Ok(Response::new(self.remove_node_pb(&c, r).instrument(span).await?))
    }
}

//! The public gRPC service (`quorate.v1.Coordinator`): a thin translation
//! between protobuf and the core. Validation happens here first (so bad input
//! never reaches the log), decisions are the state machine's, and every error
//! leaves through `status` (the one mapping of [`ServiceError`] to gRPC status).

mod election;
mod groups;
mod status;
mod watch;

pub use crate::wire::lease_pb;

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::Stream;
use quorate_core::machine::{ChangeKind, Outcome, Rejection};
use quorate_core::names::{self, NameKind};
use quorate_core::{LeaseTiming, LeaseView, Op};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use crate::pb::v1 as pb;
use crate::pb::v1::coordinator_server::{Coordinator, CoordinatorServer};
use crate::service::ServiceError;
use crate::service::batch;
use crate::service::{Node, ReadConsistency};
use crate::wire::convert::timing_pb;

/// The default and the largest wait of a blocking Acquire.
const DEFAULT_ACQUIRE_WAIT: Duration = Duration::from_secs(30);
const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(300);

/// Events buffered per watch stream before the watcher counts as slow.
const WATCH_BUFFER: usize = 256;

/// Implements `quorate.v1.Coordinator` on one node.
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    node: Node,
    reports: batch::Batcher,
}

impl CoordinatorService {
    /// The service, and the report batcher's task (owned by the caller).
    pub fn new(node: Node) -> (Self, tokio::task::JoinHandle<()>) {
        let (reports, task) = batch::Batcher::start(node.clone());
        (Self { node, reports }, task)
    }

    pub fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
    }

    fn timing(&self) -> LeaseTiming {
        self.node.config.lease_timing()
    }

    fn check_ttl(&self, ttl_ms: u64) -> Result<(), ServiceError> {
        let (min, max) = (self.node.config.min_lease_ttl_ms, self.node.config.max_lease_ttl_ms);
        if ttl_ms == 0 {
            return Err(ServiceError::InvalidArgument("ttl_ms must be positive".into()));
        }
        if ttl_ms > max {
            return Err(ServiceError::InvalidArgument(format!(
                "ttl_ms {ttl_ms} is above the maximum lease TTL of {max} ms (max_lease_ttl_ms)"
            )));
        }
        if ttl_ms < min {
            return Err(ServiceError::InvalidArgument(format!(
                "ttl_ms {ttl_ms} is below the minimum lease TTL of {min} ms (min_lease_ttl_ms)"
            )));
        }
        Ok(())
    }

    /// When this node leads on its own clock and somebody other than
    /// `holder` holds the lease: how long until it could be granted. Lets a
    /// waiting Acquire sleep without writing to the log.
    fn local_wait_ms(&self, group: &str, holder: &str) -> Option<u64> {
        if !self.node.raft.is_leader() {
            return None;
        }
        let timing = self.timing();
        self.node.reader.with_machine(|m, _| {
            let now = self.node.reader.own_clock_now(m)?;
            let current = m.lease(group, quorate_core::machine::ReaderClock::Now(now));
            if current.holder.as_deref().is_none_or(|h| h == holder) {
                return None;
            }
            m.grantable_at_ms(group, timing).map(|at| at.saturating_sub(now)).filter(|ms| *ms > 0)
        })
    }

    fn acquired(&self, acquired: bool, lease: &LeaseView, retry_after_ms: u64) -> pb::AcquireResponse {
        pb::AcquireResponse {
            acquired,
            lease: Some(lease_pb(lease)),
            retry_after_ms,
            timing: Some(timing_pb(self.timing())),
        }
    }

    async fn do_acquire(&self, r: pb::AcquireRequest) -> Result<pb::AcquireResponse, ServiceError> {
        check_name(NameKind::Group, &r.group)?;
        check_name(NameKind::Holder, &r.holder)?;
        self.check_ttl(r.ttl_ms)?;
        let wait_for = match r.wait_timeout_ms {
            0 => DEFAULT_ACQUIRE_WAIT,
            ms => Duration::from_millis(ms).min(MAX_ACQUIRE_WAIT),
        };
        let deadline = Instant::now() + wait_for;
        // Subscribe before the first attempt so a release in between is seen.
        let mut changes = self.node.reader.subscribe();
        let mut stopping = self.node.stopping.clone();
        loop {
            let wait_ms = match self.local_wait_ms(&r.group, &r.holder) {
                Some(ms) if !r.wait => {
                    return Ok(self.acquired(false, &self.node.reader.lease(&r.group), ms));
                }
                Some(ms) => ms,
                None => {
                    let op = Op::Acquire { group: r.group.clone(), holder: r.holder.clone(), ttl_ms: r.ttl_ms };
                    match self.node.propose(op).await? {
                        Outcome::Granted(lease) => return Ok(self.acquired(true, &lease, 0)),
                        Outcome::Held { current, grantable_at_ms } => {
                            let now = self.node.reader.with_machine(|m, _| self.node.reader.own_clock_now(m));
                            let ms = now.map_or(0, |now| grantable_at_ms.saturating_sub(now));
                            if !r.wait {
                                return Ok(self.acquired(false, &current, ms));
                            }
                            ms.max(1)
                        }
                        Outcome::Rejected(rej) => return Err(rejection(rej)),
                        other => {
                            return Err(ServiceError::Internal(format!("unexpected outcome of Acquire: {other:?}")));
                        }
                    }
                }
            };
            // Wait for the lease to become grantable, for a change to this
            // group (a release frees it at once), or for the deadline.
            let now = Instant::now();
            if now >= deadline {
                let lease = self.node.reader.lease(&r.group);
                return Ok(self.acquired(false, &lease, wait_ms));
            }
            let sleep = tokio::time::sleep(Duration::from_millis(wait_ms).min(deadline - now));
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    ev = changes.recv() => match ev {
                        // Only a change that can make the lease grantable
                        // sooner is worth another proposal: reports and the
                        // holder's renewals are not (each proposal is a Raft
                        // write, slow on a lossy link).
                        Ok(ev) if ev.change.group != r.group
                            || matches!(ev.change.kind, ChangeKind::ViewReported | ChangeKind::Renewed) => continue,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            return Err(ServiceError::Stopped { node_id: self.node.id, detail: "state machine closed".into() });
                        }
                    },
                    () = crate::shutdown::stopped(&mut stopping) => {
                        return Err(ServiceError::Stopped { node_id: self.node.id, detail: "shutting down".into() });
                    }
                }
            }
        }
    }

    async fn do_renew(&self, r: pb::RenewRequest) -> Result<pb::RenewResponse, ServiceError> {
        check_name(NameKind::Group, &r.group)?;
        check_name(NameKind::Holder, &r.holder)?;
        match self.node.propose(Op::Renew { group: r.group, holder: r.holder, epoch: r.epoch }).await? {
            Outcome::Renewed(lease) => {
                Ok(pb::RenewResponse { lease: Some(lease_pb(&lease)), timing: Some(timing_pb(self.timing())) })
            }
            Outcome::Rejected(rej) => Err(rejection(rej)),
            other => Err(ServiceError::Internal(format!("unexpected outcome of Renew: {other:?}"))),
        }
    }

    async fn do_release(&self, r: pb::ReleaseRequest) -> Result<pb::ReleaseResponse, ServiceError> {
        check_name(NameKind::Group, &r.group)?;
        check_name(NameKind::Holder, &r.holder)?;
        match self.node.propose(Op::Release { group: r.group, holder: r.holder, epoch: r.epoch }).await? {
            Outcome::Released(lease) => Ok(pb::ReleaseResponse { lease: Some(lease_pb(&lease)) }),
            Outcome::Rejected(rej) => Err(rejection(rej)),
            other => Err(ServiceError::Internal(format!("unexpected outcome of Release: {other:?}"))),
        }
    }

    /// Confirms a read at the requested consistency; returns what was used.
    async fn confirm_read(&self, consistency: i32) -> Result<pb::Consistency, ServiceError> {
        let consistency = pb::Consistency::try_from(consistency)
            .map_err(|_| ServiceError::InvalidArgument(format!("consistency {consistency} is not a known value")))?;
        let (read, served) = match consistency {
            pb::Consistency::Unspecified | pb::Consistency::Linearizable => {
                (ReadConsistency::Linearizable, pb::Consistency::Linearizable)
            }
            pb::Consistency::LeaseRead => (ReadConsistency::LeaseRead, pb::Consistency::LeaseRead),
            pb::Consistency::Stale => (ReadConsistency::Stale, pb::Consistency::Stale),
        };
        self.node.confirm_read(read).await?;
        Ok(served)
    }

    async fn do_get_lease(&self, r: pb::GetLeaseRequest) -> Result<pb::GetLeaseResponse, ServiceError> {
        check_name(NameKind::Group, &r.group)?;
        let served = self.confirm_read(r.consistency).await?;
        let lease = self.node.reader.lease(&r.group);
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
            leader_addr: st.leader.and_then(|l| self.node.peers.get(&l).cloned()).unwrap_or_default(),
            last_log_index: st.last_log_index,
            last_applied: st.applied,
            nodes,
            initialized: st.initialized,
            version: crate::VERSION.into(),
            lease_groups: self.node.reader.lease_count() as u64,
            caught_up: self.node.readiness.caught_up(),
        }
    }
}

fn check_name(kind: NameKind, name: &str) -> Result<(), ServiceError> {
    names::validate(kind, name).map_err(|e| ServiceError::InvalidArgument(e.to_string()))
}

/// A state-machine rejection as an API error.
fn rejection(r: Rejection) -> ServiceError {
    let message = r.to_string();
    match r {
        Rejection::NotHolder { current, .. } => ServiceError::NotHolder { message, current_epoch: current.epoch },
        Rejection::Expired { epoch, .. } => ServiceError::Expired { message, current_epoch: epoch },
        Rejection::InvalidName(_)
        | Rejection::ZeroTtl
        | Rejection::TtlTooShort { .. }
        | Rejection::InvalidSpec(_)
        | Rejection::UnknownObserver { .. } => ServiceError::InvalidArgument(message),
        Rejection::UnknownGroup { .. } => ServiceError::NotFound(message),
        Rejection::InvalidTarget(_) => ServiceError::InvalidArgument(message),
        // A holder that is not (or no longer) designated must stop acting:
        // FAILED_PRECONDITION, like a stale epoch.
        Rejection::NotDesignated { .. } => ServiceError::NotHolder { message, current_epoch: 0 },
        Rejection::NotManaged { .. }
        | Rejection::StaleDecision { .. }
        | Rejection::FailoverBlocked { .. }
        | Rejection::InMaintenance { .. } => ServiceError::Precondition(message),
        Rejection::EpochExhausted { .. } | Rejection::ForeignStamp { .. } | Rejection::NestedBatch => {
            ServiceError::Internal(message)
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn acquire(&self, req: Request<pb::AcquireRequest>) -> Result<Response<pb::AcquireResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("acquire", group = %r.group, holder = %r.holder, node_id = self.node.id);
        Ok(Response::new(self.do_acquire(r).instrument(span).await?))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("renew", group = %r.group, holder = %r.holder, epoch = r.epoch);
        Ok(Response::new(self.do_renew(r).instrument(span).await?))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("release", group = %r.group, holder = %r.holder, epoch = r.epoch);
        Ok(Response::new(self.do_release(r).instrument(span).await?))
    }

    async fn get_lease(&self, req: Request<pb::GetLeaseRequest>) -> Result<Response<pb::GetLeaseResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::debug_span!("get_lease", group = %r.group);
        Ok(Response::new(self.do_get_lease(r).instrument(span).await?))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let group = req.into_inner().group;
        check_name(NameKind::Group, &group)?;
        // A watch starts from this node's state: not before it caught up.
        self.node.ensure_caught_up()?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let span = info_span!("watch", group = %group, node_id = self.node.id);
        // The task ends when the client goes away (tx closed) or the node
        // stops; it owns nothing else.
        tokio::spawn(watch::watch_loop(self.node.clone(), group, tx).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.do_status()))
    }

    async fn apply_group(
        &self,
        req: Request<pb::ApplyGroupRequest>,
    ) -> Result<Response<pb::ApplyGroupResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("apply_group", group = r.spec.as_ref().map_or("", |s| s.name.as_str()));
        Ok(Response::new(self.do_apply_group(r).instrument(span).await?))
    }

    async fn get_group(&self, req: Request<pb::GetGroupRequest>) -> Result<Response<pb::GetGroupResponse>, Status> {
        Ok(Response::new(self.do_get_group(req.into_inner()).await?))
    }

    async fn list_groups(
        &self,
        _req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        self.node.ensure_caught_up()?;
        Ok(Response::new(self.do_list_groups()))
    }

    async fn report(&self, req: Request<pb::ReportRequest>) -> Result<Response<pb::ReportResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::debug_span!("report", observer = %r.observer, views = r.views.len());
        Ok(Response::new(self.do_report(r).instrument(span).await?))
    }

    async fn get_matrix(&self, req: Request<pb::GetMatrixRequest>) -> Result<Response<pb::Matrix>, Status> {
        Ok(Response::new(self.do_get_matrix(req.into_inner()).await?))
    }

    async fn explain(&self, req: Request<pb::ExplainRequest>) -> Result<Response<pb::ExplainResponse>, Status> {
        Ok(Response::new(self.do_explain(req.into_inner()).await?))
    }

    async fn get_election(&self, req: Request<pb::GetElectionRequest>) -> Result<Response<pb::ElectionStatus>, Status> {
        Ok(Response::new(self.do_get_election(req.into_inner()).await?))
    }

    async fn set_maintenance(
        &self,
        req: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::ElectionStatus>, Status> {
        let r = req.into_inner();
        let span = info_span!("set_maintenance", group = %r.group, on = r.on);
        Ok(Response::new(self.do_set_maintenance(r).instrument(span).await?))
    }

    async fn unblock_failover(
        &self,
        req: Request<pb::UnblockFailoverRequest>,
    ) -> Result<Response<pb::ElectionStatus>, Status> {
        let r = req.into_inner();
        let span = info_span!("unblock_failover", group = %r.group);
        Ok(Response::new(self.do_unblock(r).instrument(span).await?))
    }

    async fn switchover(
        &self,
        req: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::SwitchoverResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("switchover", group = %r.group, to = %r.to);
        Ok(Response::new(self.do_switchover(r).instrument(span).await?))
    }

    async fn cancel_switchover(
        &self,
        req: Request<pb::CancelSwitchoverRequest>,
    ) -> Result<Response<pb::ElectionStatus>, Status> {
        let r = req.into_inner();
        let span = info_span!("cancel_switchover", group = %r.group, reason = %r.reason);
        Ok(Response::new(self.do_cancel_switchover(r).instrument(span).await?))
    }

    async fn what_if(&self, req: Request<pb::WhatIfRequest>) -> Result<Response<pb::WhatIfResponse>, Status> {
        Ok(Response::new(self.do_whatif(req.into_inner()).await?))
    }
}

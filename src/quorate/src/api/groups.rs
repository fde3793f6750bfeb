//! Groups, reports, the matrix and verdicts over gRPC. Decode → call
//! `service::groups` / `service::reports` → encode.

use super::{CoordinatorService, read_consistency};
use crate::pb::v1 as pb;
use crate::service::ServiceError;
use crate::service::reports::{Report, Reported};
use crate::tls::caller::Caller;
use crate::wire::convert::{
    evidence_cells, matrix_pb, member_verdict_pb, restart_pb, spec_from_pb, spec_pb, status_from_pb, views_from_pb,
};
use crate::wire::lease_pb;

/// A report from protobuf (gRPC, and a coordinator's own in-process).
pub fn report_from_pb(r: pb::ReportRequest) -> Result<Report, ServiceError> {
    Ok(Report {
        observer: r.observer,
        incarnation: r.observer_incarnation,
        views: views_from_pb(r.views)?,
        status: r.status.as_ref().map(status_from_pb),
        refresh: r.refresh.into_iter().map(|v| (v.group, v.version)).collect(),
    })
}

/// A report's outcome as protobuf (gRPC, and a coordinator's own in-process).
pub fn reported_pb(r: &Reported) -> pb::ReportResponse {
    pb::ReportResponse {
        restarts: r.restarts.iter().map(restart_pb).collect(),
        rejected: r.rejected.iter().map(ToString::to_string).collect(),
        unrefreshed: r.unrefreshed.clone(),
        refreshed: u32::try_from(r.refreshed).unwrap_or(u32::MAX),
    }
}

impl CoordinatorService {
    pub(super) async fn apply_group_pb(
        &self,
        c: &Caller,
        r: pb::ApplyGroupRequest,
    ) -> Result<pb::ApplyGroupResponse, ServiceError> {
        let spec = spec_from_pb(r.spec.ok_or_else(|| ServiceError::InvalidArgument("spec: missing".into()))?);
        let applied = self.node.apply_group(c, spec).await?;
        Ok(pb::ApplyGroupResponse { created: applied.created, revision: applied.revision })
    }

    pub(super) async fn delete_group_pb(
        &self,
        c: &Caller,
        r: pb::DeleteGroupRequest,
    ) -> Result<pb::DeleteGroupResponse, ServiceError> {
        let d = self.node.delete_group(c, &r.group, r.force).await?;
        Ok(pb::DeleteGroupResponse { revision: d.revision, lease: Some(lease_pb(&d.lease)) })
    }

    pub(super) async fn get_group_pb(
        &self,
        c: &Caller,
        r: pb::GetGroupRequest,
    ) -> Result<pb::GetGroupResponse, ServiceError> {
        let (consistency, _) = read_consistency(r.consistency)?;
        let g = self.node.group(c, &r.name, consistency).await?;
        Ok(pb::GetGroupResponse { spec: Some(spec_pb(&g.spec)), revision: g.revision })
    }

    pub(super) fn list_groups_pb(&self, c: &Caller) -> Result<pb::ListGroupsResponse, ServiceError> {
        Ok(pb::ListGroupsResponse { names: self.node.group_names(c)? })
    }

    pub(super) async fn report_pb(&self, c: &Caller, r: pb::ReportRequest) -> Result<pb::ReportResponse, ServiceError> {
        let reported = self.reports.report(c, report_from_pb(r)?).await?;
        Ok(reported_pb(&reported))
    }

    pub(super) async fn get_matrix_pb(&self, c: &Caller, r: pb::GetMatrixRequest) -> Result<pb::Matrix, ServiceError> {
        let (consistency, _) = read_consistency(r.consistency)?;
        let m = self.node.matrix(c, &r.group, consistency).await?;
        Ok(matrix_pb(&m.state, &m.verdict, &m.coordinators, m.served_by))
    }

    pub(super) async fn explain_pb(
        &self,
        c: &Caller,
        r: pb::ExplainRequest,
    ) -> Result<pb::ExplainResponse, ServiceError> {
        let e = self.node.explain(c, &r.group, &r.member).await?;
        Ok(pb::ExplainResponse {
            evidence: evidence_cells(&e.verdict, &e.state),
            verdict: Some(member_verdict_pb(&e.verdict)),
            sentence: e.sentence,
            restarts: e.restarts.iter().map(restart_pb).collect(),
        })
    }
}

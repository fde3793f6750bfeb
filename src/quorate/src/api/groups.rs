//! Groups, reports, the matrix and verdicts.

use quorate_core::machine::{GroupView, Outcome};
use quorate_core::matrix::Observer;
use quorate_core::names::NameKind;
use quorate_core::verdict::{explain, verdict};
use quorate_core::{Op, matrix::GroupState};

use super::CoordinatorService;
use crate::pb::v1 as pb;
use crate::service::ServiceError;
use crate::service::leases::{check_name, rejection};
use crate::wire::convert::{
    evidence_cells, matrix_pb, member_verdict_pb, observation_from_pb, restart_pb, spec_from_pb, spec_pb,
};

impl CoordinatorService {
    pub(super) async fn do_apply_group(
        &self,
        r: pb::ApplyGroupRequest,
    ) -> Result<pb::ApplyGroupResponse, ServiceError> {
        let spec = spec_from_pb(r.spec.ok_or_else(|| ServiceError::InvalidArgument("spec: missing".into()))?);
        let applied = self.node.apply_group(spec).await?;
        Ok(pb::ApplyGroupResponse { created: applied.created, revision: applied.revision })
    }

    /// Runs `f` on a group's state after confirming the read.
    async fn with_group<T>(
        &self,
        name: &str,
        consistency: i32,
        f: impl FnOnce(&GroupState, u64) -> T,
    ) -> Result<T, ServiceError> {
        check_name(NameKind::Group, name)?;
        self.confirm_read(consistency).await?;
        self.node.reader.with_machine(|m, _| {
            let now = self.node.reader.machine_now(m);
            match m.group(name) {
                Some(g) => Ok(f(g, now)),
                None => Err(ServiceError::NotFound(format!(
                    "no group named {name:?}; create it with `quorate group apply FILE.toml`"
                ))),
            }
        })
    }

    pub(super) async fn do_get_group(&self, r: pb::GetGroupRequest) -> Result<pb::GetGroupResponse, ServiceError> {
        self.with_group(&r.name, r.consistency, |g, _| pb::GetGroupResponse {
            spec: Some(spec_pb(&g.spec)),
            revision: g.spec_revision,
        })
        .await
    }

    pub(super) fn do_list_groups(&self) -> pb::ListGroupsResponse {
        pb::ListGroupsResponse {
            names: self.node.reader.with_machine(|m, _| m.groups().map(|g| g.spec.name.clone()).collect()),
        }
    }

    pub(super) async fn do_report(&self, r: pb::ReportRequest) -> Result<pb::ReportResponse, ServiceError> {
        if r.observer.is_empty() {
            return Err(ServiceError::InvalidArgument("observer: missing".into()));
        }
        let mut views = Vec::with_capacity(r.views.len());
        for v in &r.views {
            check_name(NameKind::Group, &v.group)?;
            let cells = v.cells.iter().map(observation_from_pb).collect::<Result<Vec<_>, _>>()?;
            views.push(GroupView { group: v.group.clone(), cells });
        }
        let op = Op::Report {
            observer: Observer::parse(&r.observer),
            observer_incarnation: r.observer_incarnation,
            views,
            status: r.status.as_ref().map(crate::wire::convert::status_from_pb),
        };
        match self.reports.propose(op, self.node.id).await? {
            Outcome::Reported { restarts, rejected } => Ok(pb::ReportResponse {
                restarts: restarts.iter().map(restart_pb).collect(),
                rejected: rejected.iter().map(ToString::to_string).collect(),
            }),
            Outcome::Rejected(rej) => Err(rejection(rej)),
            other => Err(ServiceError::Internal(format!("unexpected outcome of Report: {other:?}"))),
        }
    }

    pub(super) async fn do_get_matrix(&self, r: pb::GetMatrixRequest) -> Result<pb::Matrix, ServiceError> {
        let voters = self.node.reader.voters();
        let id = self.node.id;
        self.with_group(&r.group, r.consistency, |g, now| matrix_pb(g, &verdict(g, &voters, now), &voters, id)).await
    }

    pub(super) async fn do_explain(&self, r: pb::ExplainRequest) -> Result<pb::ExplainResponse, ServiceError> {
        check_name(NameKind::Member, &r.member)?;
        let voters = self.node.reader.voters();
        let member = r.member.clone();
        self.with_group(&r.group, pb::Consistency::Linearizable as i32, move |g, now| {
            let v = verdict(g, &voters, now);
            let mv = v
                .member(&member)
                .ok_or_else(|| ServiceError::NotFound(format!("group {:?} has no member {member:?}", g.spec.name)))?;
            Ok(pb::ExplainResponse {
                sentence: explain(mv),
                verdict: Some(member_verdict_pb(mv)),
                evidence: evidence_cells(mv, g),
                restarts: g.restarts.iter().filter(|x| x.member == member).map(restart_pb).collect(),
            })
        })
        .await?
    }
}

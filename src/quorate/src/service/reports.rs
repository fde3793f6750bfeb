//! Observers' reports: one observer's view of its targets, checked and
//! proposed through the [`Batcher`] (many reports share one log entry).
//!
//! Agents send theirs over gRPC; a coordinator hands its own to its node
//! in-process (`server::observers`). Both arrive here.

use crate::tls::caller::Caller;
use quorate_core::Op;
use quorate_core::access::Action;
use quorate_core::election::MemberStatus;
use quorate_core::machine::{GroupView, Outcome, Rejection};
use quorate_core::matrix::{Observer, RestartEvent};
use quorate_core::names::NameKind;

use super::ServiceError;
use super::batch::Batcher;
use super::leases::{check_name, rejection, unexpected};
use crate::wire::MAX_VIEWS_PER_REPORT;
use quorate_core::group::MAX_MEMBERS;

/// A name check's error with the field it is about.
fn prefixed(field: &str, e: ServiceError) -> ServiceError {
    match e {
        ServiceError::InvalidArgument(m) => ServiceError::InvalidArgument(format!("{field}: {m}")),
        other => other,
    }
}

/// One observer's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Who observed: `coordinator-N` or a member id.
    pub observer: String,
    /// Which start of the observer (a restart resets its trackers).
    pub incarnation: u64,
    pub views: Vec<GroupView>,
    /// An agent's own data service, if it runs one.
    pub status: Option<MemberStatus>,
}

/// What the state machine made of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    /// Restarts of targets this report revealed.
    pub restarts: Vec<RestartEvent>,
    /// Views the machine refused (an unknown group, an observer it does not
    /// know), each with its reason; the rest were recorded.
    pub rejected: Vec<Rejection>,
}

impl Batcher {
    /// Checks `r` and records it in the next batch.
    pub async fn report(&self, caller: &Caller, r: Report) -> Result<Reported, ServiceError> {
        if r.observer.is_empty() {
            return Err(ServiceError::InvalidArgument("observer: missing".into()));
        }
        // Every name is checked before it is echoed or stored: bounded in
        // length and charset, so no error carries unbounded input back.
        check_name(NameKind::Member, &r.observer).map_err(|e| prefixed("observer", e))?;
        if r.views.len() > MAX_VIEWS_PER_REPORT {
            return Err(ServiceError::ResourceExhausted(format!(
                "views: {} views in one report; the limit is {MAX_VIEWS_PER_REPORT} (MAX_VIEWS_PER_REPORT): split it",
                r.views.len()
            )));
        }
        for v in &r.views {
            check_name(NameKind::Group, &v.group)?;
            if v.cells.len() > MAX_MEMBERS {
                return Err(ServiceError::InvalidArgument(format!(
                    "views[{}].cells: {} observations; a group has at most {MAX_MEMBERS} members",
                    v.group,
                    v.cells.len()
                )));
            }
            for (target, _) in &v.cells {
                check_name(NameKind::Member, target).map_err(|e| prefixed("target", e))?;
            }
            caller.check(Action::Report { group: &v.group, observer: &r.observer })?;
        }
        let op = Op::Report {
            observer: Observer::parse(&r.observer),
            observer_incarnation: r.incarnation,
            views: r.views,
            status: r.status,
        };
        match self.propose(op).await? {
            Outcome::Reported { restarts, rejected } => Ok(Reported { restarts, rejected }),
            Outcome::Rejected(rej) => Err(rejection(rej)),
            other => Err(unexpected("Report", &other)),
        }
    }
}

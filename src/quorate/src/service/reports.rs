//! Observers' reports: one observer's view of its targets, checked and
//! proposed through the [`Batcher`] (many reports share one log entry).
//! A report may also renew views the observer still holds unchanged, by
//! the token it sent them under ([`Op::Refresh`]), instead of sending them
//! again.
//!
//! Agents send theirs over gRPC; a coordinator hands its own to its node
//! in-process (`server::observers`). Both arrive here.
//!
//! Before a report is proposed, it must be well formed and bounded, its
//! caller allowed to report as its observer ([`Caller::check`]), its
//! observer one that may report (a coordinator of this cluster, or a member
//! of every group it reports about), and its identity within its rate
//! (`max_reports_per_s`, [`rate_key`]). The last two use the leader's state
//! and only bound what is written, so they run on the leader only: a
//! follower's state may lag, and it sends the observer to the leader.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::tls::caller::Caller;
use quorate_core::Op;
use quorate_core::access::{Action, Identity};
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
    /// `(group, version)` of views the observer still holds unchanged:
    /// their time is renewed ([`Op::Refresh`]).
    pub refresh: Vec<(String, u64)>,
}

/// What the state machine made of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    /// Restarts of targets this report revealed.
    pub restarts: Vec<RestartEvent>,
    /// Views the machine refused (an unknown group, an observer it does not
    /// know), each with its reason; the rest were recorded.
    pub rejected: Vec<Rejection>,
    /// Groups of `refresh` whose view was not renewed.
    pub unrefreshed: Vec<String>,
    /// How many views of `refresh` were renewed.
    pub refreshed: usize,
}

impl Batcher {
    /// Checks `r` and records it in the next batch: its views as one
    /// command, its refreshes as another.
    pub async fn report(&self, caller: &Caller, r: Report) -> Result<Reported, ServiceError> {
        check_report(caller, &r)?;
        let observer = Observer::parse(&r.observer);
        let groups = r.views.iter().map(|v| v.group.as_str()).chain(r.refresh.iter().map(|(g, _)| g.as_str()));
        self.admit(caller, &observer, groups)?;
        let mut reported =
            Reported { restarts: Vec::new(), rejected: Vec::new(), unrefreshed: Vec::new(), refreshed: 0 };
        if !r.views.is_empty() || r.refresh.is_empty() {
            let op = Op::Report {
                observer: observer.clone(),
                observer_incarnation: r.incarnation,
                views: r.views,
                status: r.status,
            };
            match self.propose(op).await? {
                Outcome::Reported { restarts, rejected } => {
                    (reported.restarts, reported.rejected) = (restarts, rejected)
                }
                Outcome::Rejected(rej) => return Err(rejection(rej)),
                other => return Err(unexpected("Report", &other)),
            }
        }
        if !r.refresh.is_empty() {
            let asked = r.refresh.len();
            let op = Op::Refresh { observer, observer_incarnation: r.incarnation, views: r.refresh };
            match self.propose(op).await? {
                Outcome::Refreshed { missed } => {
                    reported.refreshed = asked.saturating_sub(missed.len());
                    reported.unrefreshed = missed;
                }
                Outcome::Rejected(rej) => return Err(rejection(rej)),
                other => return Err(unexpected("Refresh", &other)),
            }
        }
        Ok(reported)
    }
}

/// A report is well formed and bounded, and its caller may report as its
/// observer about every group it names. Every name is checked before it is
/// echoed or stored: bounded in length and charset, so no error carries
/// unbounded input back.
fn check_report(caller: &Caller, r: &Report) -> Result<(), ServiceError> {
    if r.observer.is_empty() {
        return Err(ServiceError::InvalidArgument("observer: missing".into()));
    }
    check_name(NameKind::Member, &r.observer).map_err(|e| prefixed("observer", e))?;
    for (what, n) in [("views", r.views.len()), ("refresh", r.refresh.len())] {
        if n > MAX_VIEWS_PER_REPORT {
            return Err(ServiceError::ResourceExhausted(format!(
                "{what}: {n} views in one report; the limit is {MAX_VIEWS_PER_REPORT} (MAX_VIEWS_PER_REPORT): split it"
            )));
        }
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
    for (group, _) in &r.refresh {
        check_name(NameKind::Group, group).map_err(|e| prefixed("refresh", e))?;
        caller.check(Action::Report { group, observer: &r.observer })?;
    }
    Ok(())
}

impl Batcher {
    /// On the leader: may `observer` report `views` now? A coordinator must
    /// be a node of the cluster (its Raft membership, or, before the
    /// cluster has one, this node's configured peers; never a removed
    /// node), a member must be in every group it reports about
    /// that exists (the state machine refuses unknown groups itself), and
    /// the caller's identity must be within `max_reports_per_s`.
    fn admit<'a>(
        &self,
        caller: &Caller,
        observer: &Observer,
        groups: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(), ServiceError> {
        let node = &self.node;
        if !node.raft.is_leader() {
            return Err(node.not_leader());
        }
        let mut nodes: BTreeSet<u64> = node.reader.node_ids();
        if nodes.is_empty() {
            nodes.extend(node.peers.keys());
        }
        let refused = |e: quorate_core::matrix::ObserverRefused| ServiceError::InvalidArgument(e.to_string());
        observer.check_node(&nodes).map_err(refused)?;
        node.reader
            .with_machine(|m, _| {
                groups.clone().filter_map(|name| m.group(name)).try_for_each(|g| observer.check_member_of(&g.spec))
            })
            .map_err(refused)?;
        let Some(key) = rate_key(caller, observer, groups.clone().next()) else { return Ok(()) };
        let mut rates = self.rates.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if rates.try_take(&key, Instant::now()) {
            return Ok(());
        }
        Err(ServiceError::ResourceExhausted(format!(
            "reports: observer {observer} sent more than {} a second (max_reports_per_s); retry later",
            rates.per_s()
        )))
    }
}

/// Whose rate bucket a report takes from: a member's, named by its
/// certificate (`quorate://member/G/M`), or over plain text by the report's
/// first group (`first_group`) and observer. None: exempt. This process is; so are
/// coordinator nodes: a node certificate already reaches the Raft RPCs,
/// so a bound on its reports would protect nothing, and a coordinator
/// reports about every group (up to `max_groups`) every read round, so a
/// bound that fits it would bound no member. (Over plain text anyone may
/// claim to be a coordinator of the cluster, as anyone may do anything.)
fn rate_key(caller: &Caller, observer: &Observer, first_group: Option<&str>) -> Option<String> {
    match (caller, observer) {
        (Caller::Internal | Caller::Known(Identity::Node { .. }), _) => None,
        (Caller::Known(id), _) => Some(id.uri()),
        (Caller::Insecure | Caller::Unusable(_), Observer::Coordinator(_)) => None,
        (Caller::Insecure | Caller::Unusable(_), Observer::Member(m)) => {
            Some(format!("{}/{m}", first_group.unwrap_or("")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_rate_limited_and_nodes_are_not() {
        let member = Caller::Known(Identity::Member { group: "g".into(), member: "m".into() });
        let m = Observer::Member("m".into());
        assert_eq!(rate_key(&member, &m, Some("g")).as_deref(), Some("quorate://member/g/m"));
        let node = Caller::Known(Identity::Node { id: 1 });
        assert_eq!(rate_key(&node, &Observer::Coordinator(1), Some("g")), None);
        assert_eq!(rate_key(&Caller::Internal, &Observer::Coordinator(1), None), None);
        // Plain text: by group and observer, so that members of the same
        // name in different groups (different agents) have their own.
        assert_eq!(rate_key(&Caller::Insecure, &m, Some("g")).as_deref(), Some("g/m"));
        assert_eq!(rate_key(&Caller::Insecure, &m, Some("h")).as_deref(), Some("h/m"));
        assert_eq!(rate_key(&Caller::Insecure, &Observer::Coordinator(2), Some("g")), None);
    }
}

//! Conversions between protobuf messages and core types, in one place.
//! Decoding errors are [`DecodeError`]s; the service layer reports them as
//! invalid arguments.

use quorate_core::election::{Candidate, HistoryEntry, MemberStatus, Role};
use quorate_core::group::{FailoverPolicy, GroupSpec, MemberSpec, Policy};
use quorate_core::machine::{GroupView, LeaseState as CoreLeaseState};
use quorate_core::matrix::{GroupState, Observer, RestartEvent};
use quorate_core::observe::{ObsState, Observation, Reason};
use quorate_core::verdict::{GroupVerdict, MemberVerdict, Verdict, explain};
use quorate_core::{LeaseTiming, LeaseView};

use super::DecodeError;
use crate::pb::v1 as pb;

/// A core lease view as protobuf.
pub fn lease_pb(v: &LeaseView) -> pb::Lease {
    let state = match v.state {
        CoreLeaseState::Free => pb::LeaseState::Free,
        CoreLeaseState::Held => pb::LeaseState::Held,
        CoreLeaseState::Expiring => pb::LeaseState::Expiring,
    };
    pb::Lease {
        group: v.group.clone(),
        holder: v.holder.clone().unwrap_or_default(),
        epoch: v.epoch,
        ttl_ms: v.ttl_ms,
        remaining_ms: v.remaining_ms,
        state: state as i32,
        revision: v.revision,
    }
}

pub fn timing_pb(t: LeaseTiming) -> pb::LeaseTiming {
    pb::LeaseTiming { max_clock_drift_ppm: t.max_clock_drift_ppm, lease_margin_ms: t.lease_margin_ms }
}

/// A protobuf spec as a core spec; zero policy fields take the defaults.
/// Not validated here (the state machine validates).
pub fn spec_from_pb(s: pb::GroupSpec) -> GroupSpec {
    let d = Policy::default();
    let p = s.policy.unwrap_or_default();
    let or = |v: u64, default: u64| if v == 0 { default } else { v };
    GroupSpec {
        name: s.name,
        members: s
            .members
            .into_iter()
            .map(|m| MemberSpec {
                id: m.id,
                heartbeat: m.heartbeat,
                priority: m.priority,
                data: (!m.data.is_empty()).then_some(m.data),
                announce: (!m.announce.is_empty()).then_some(m.announce),
            })
            .collect(),
        policy: Policy {
            heartbeat_interval_ms: or(p.heartbeat_interval_ms, d.heartbeat_interval_ms),
            down_after_ms: or(p.down_after_ms, d.down_after_ms),
            report_interval_ms: or(p.report_interval_ms, d.report_interval_ms),
            freshness_ms: or(p.freshness_ms, d.freshness_ms),
        },
        failover: s.failover.map(|f| {
            let d = FailoverPolicy::default();
            FailoverPolicy {
                lease_ttl_ms: or(f.lease_ttl_ms, d.lease_ttl_ms),
                max_lag_bytes: or(f.max_lag_bytes, d.max_lag_bytes),
                min_failover_interval_ms: or(f.min_failover_interval_ms, d.min_failover_interval_ms),
                initial_primary: (!f.initial_primary.is_empty()).then_some(f.initial_primary),
            }
        }),
    }
}

pub fn policy_pb(p: &Policy) -> pb::GroupPolicy {
    pb::GroupPolicy {
        heartbeat_interval_ms: p.heartbeat_interval_ms,
        down_after_ms: p.down_after_ms,
        report_interval_ms: p.report_interval_ms,
        freshness_ms: p.freshness_ms,
    }
}

pub fn spec_pb(s: &GroupSpec) -> pb::GroupSpec {
    pb::GroupSpec {
        name: s.name.clone(),
        members: s
            .members
            .iter()
            .map(|m| pb::MemberSpec {
                id: m.id.clone(),
                heartbeat: m.heartbeat.clone(),
                priority: m.priority,
                data: m.data.clone().unwrap_or_default(),
                announce: m.announce.clone().unwrap_or_default(),
            })
            .collect(),
        policy: Some(policy_pb(&s.policy)),
        failover: s.failover.as_ref().map(|f| pb::FailoverPolicy {
            lease_ttl_ms: f.lease_ttl_ms,
            max_lag_bytes: f.max_lag_bytes,
            min_failover_interval_ms: f.min_failover_interval_ms,
            initial_primary: f.initial_primary.clone().unwrap_or_default(),
        }),
    }
}

fn role_pb(r: Role) -> pb::MemberRole {
    match r {
        Role::Primary => pb::MemberRole::Primary,
        Role::Replica => pb::MemberRole::Replica,
        Role::Unknown => pb::MemberRole::Unknown,
    }
}

pub fn status_pb(s: &MemberStatus) -> pb::MemberStatus {
    pb::MemberStatus {
        role: s.role.as_str().to_owned(),
        role_code: role_pb(s.role) as i32,
        offset: s.offset,
        link_up: s.link_up,
        synced_epoch: s.synced_epoch,
        healthy: s.healthy,
        error: s.error.clone().unwrap_or_default(),
    }
}

pub fn status_from_pb(s: &pb::MemberStatus) -> MemberStatus {
    let role = match pb::MemberRole::try_from(s.role_code) {
        Ok(pb::MemberRole::Primary) => Role::Primary,
        Ok(pb::MemberRole::Replica) => Role::Replica,
        Ok(pb::MemberRole::Unknown) => Role::Unknown,
        // Unset (an older sender): the display string.
        _ => match s.role.as_str() {
            "primary" => Role::Primary,
            "replica" => Role::Replica,
            _ => Role::Unknown,
        },
    };
    MemberStatus {
        role,
        offset: s.offset,
        link_up: s.link_up,
        synced_epoch: s.synced_epoch,
        healthy: s.healthy,
        error: (!s.error.is_empty()).then(|| s.error.clone()),
    }
}

pub fn history_pb(h: &HistoryEntry) -> pb::HistoryEntry {
    pb::HistoryEntry {
        revision: h.revision,
        kind: h.kind.as_str().to_owned(),
        from: h.from.clone().unwrap_or_default(),
        to: h.to.clone(),
        epoch: h.epoch,
        reason: h.reason.clone(),
        evidence: h.evidence.clone(),
        wall_ms: h.wall_ms,
    }
}

pub fn candidate_pb(c: &Candidate) -> pb::Candidate {
    pb::Candidate {
        member: c.member.clone(),
        priority: c.priority,
        verdict: verdict_state_pb(c.verdict) as i32,
        offset: c.offset,
        lag_bytes: c.lag_bytes,
        eligible: c.eligible(),
        why_not: c.why_not.clone().unwrap_or_default(),
    }
}

pub fn obs_state_pb(s: ObsState) -> pb::ObservationState {
    match s {
        ObsState::Up => pb::ObservationState::ObservedUp,
        ObsState::Down => pb::ObservationState::ObservedDown,
        ObsState::Unknown => pb::ObservationState::ObservedUnknown,
    }
}

const REASONS: [Reason; 6] =
    [Reason::Advancing, Reason::NoReadingYet, Reason::Missing, Reason::Frozen, Reason::Unreachable, Reason::Garbled];

pub fn reason_from_str(s: &str) -> Option<Reason> {
    REASONS.into_iter().find(|r| r.as_str() == s)
}

fn reason_pb(r: Reason) -> pb::ObservationReason {
    match r {
        Reason::Advancing => pb::ObservationReason::ReasonAdvancing,
        Reason::NoReadingYet => pb::ObservationReason::ReasonNoReadingYet,
        Reason::Missing => pb::ObservationReason::ReasonMissing,
        Reason::Frozen => pb::ObservationReason::ReasonFrozen,
        Reason::Unreachable => pb::ObservationReason::ReasonUnreachable,
        Reason::Garbled => pb::ObservationReason::ReasonGarbled,
    }
}

/// A reason from its code, or (code unset: an older sender) its string.
fn reason_from_pb(o: &pb::Observation) -> Option<Reason> {
    match pb::ObservationReason::try_from(o.reason_code) {
        Ok(pb::ObservationReason::Unspecified) => reason_from_str(&o.reason),
        Ok(code) => REASONS.into_iter().find(|r| reason_pb(*r) == code),
        Err(_) => None,
    }
}

pub fn observation_pb(target: &str, o: &Observation) -> pb::Observation {
    pb::Observation {
        target: target.to_owned(),
        state: obs_state_pb(o.state) as i32,
        reason: o.reason.as_str().to_owned(),
        reason_code: reason_pb(o.reason) as i32,
        state_age_ms: o.state_age_ms,
        incarnation: o.incarnation,
        seq: o.seq,
        restarts: o.restarts,
    }
}

/// A reported observation as a core one; refuses unknown states and reasons.
pub fn observation_from_pb(o: &pb::Observation) -> Result<(String, Observation), DecodeError> {
    let state = match pb::ObservationState::try_from(o.state) {
        Ok(pb::ObservationState::ObservedUp) => ObsState::Up,
        Ok(pb::ObservationState::ObservedDown) => ObsState::Down,
        Ok(pb::ObservationState::ObservedUnknown) => ObsState::Unknown,
        _ => {
            return Err(DecodeError(format!("cells[{}].state: {} is not a valid state", o.target, o.state)));
        }
    };
    let reason = reason_from_pb(o).ok_or_else(|| {
        DecodeError(format!(
            "cells[{}].reason: {:?} (code {}) is not a known reason",
            o.target, o.reason, o.reason_code
        ))
    })?;
    Ok((
        o.target.clone(),
        Observation {
            state,
            reason,
            state_age_ms: o.state_age_ms,
            incarnation: o.incarnation,
            seq: o.seq,
            restarts: o.restarts,
        },
    ))
}

/// Reported views as core ones; refuses an unknown state or reason.
pub fn views_from_pb(views: Vec<pb::GroupView>) -> Result<Vec<GroupView>, DecodeError> {
    views
        .into_iter()
        .map(|v| {
            let cells = v.cells.iter().map(observation_from_pb).collect::<Result<Vec<_>, _>>()?;
            Ok(GroupView { group: v.group, cells, version: v.version })
        })
        .collect()
}

pub fn verdict_state_pb(v: Verdict) -> pb::VerdictState {
    match v {
        Verdict::Up => pb::VerdictState::VerdictUp,
        Verdict::Partial => pb::VerdictState::VerdictPartial,
        Verdict::Down => pb::VerdictState::VerdictDown,
        Verdict::Unknown => pb::VerdictState::VerdictUnknown,
    }
}

pub fn member_verdict_pb(mv: &MemberVerdict) -> pb::MemberVerdict {
    let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    pb::MemberVerdict {
        member: mv.member.clone(),
        state: verdict_state_pb(mv.state) as i32,
        up_votes: n(mv.up_votes),
        down_votes: n(mv.down_votes),
        unknown_votes: n(mv.unknown_votes),
        silent: n(mv.silent),
        observers: n(mv.observers),
        quorum: n(mv.quorum),
        explanation: explain(mv),
    }
}

pub fn restart_pb(r: &RestartEvent) -> pb::Restart {
    pb::Restart {
        member: r.member.clone(),
        from_incarnation: r.from_incarnation,
        to_incarnation: r.to_incarnation,
        seen_by: r.seen_by.to_string(),
        revision: r.revision,
    }
}

/// The evidence cells of one member's verdict: one per configured observer.
pub fn evidence_cells(mv: &MemberVerdict, state: &GroupState) -> Vec<pb::MatrixCell> {
    mv.evidence
        .iter()
        .map(|e| {
            let incarnation =
                state.views.get(&e.observer).and_then(|v| v.cells.get(&mv.member)).and_then(|c| c.incarnation);
            pb::MatrixCell {
                observer: e.observer.to_string(),
                target: mv.member.clone(),
                state: e.state.map_or(pb::ObservationState::Unspecified, obs_state_pb) as i32,
                reason: e.reason.map_or_else(|| "no report".to_owned(), |r| r.as_str().to_owned()),
                age_ms: e.view_age_ms.unwrap_or(0),
                state_age_ms: e.state_age_ms.unwrap_or(0),
                fresh: e.fresh,
                incarnation,
            }
        })
        .collect()
}

/// The whole matrix with its verdicts.
pub fn matrix_pb(state: &GroupState, v: &GroupVerdict, coordinators: &[u64], served_by: u64) -> pb::Matrix {
    let mut observers: Vec<String> = state.spec.member_ids().map(str::to_owned).collect();
    observers.extend(coordinators.iter().map(|c| Observer::Coordinator(*c).to_string()));
    // Observers that reported but are no longer configured (a removed
    // coordinator) still show, last.
    for o in state.views.keys() {
        let name = o.to_string();
        if !observers.contains(&name) {
            observers.push(name);
        }
    }
    let mut cells: Vec<pb::MatrixCell> = v.members.iter().flat_map(|mv| evidence_cells(mv, state)).collect();
    cells.sort_by_key(|c| {
        (observers.iter().position(|o| *o == c.observer), state.spec.members.iter().position(|m| m.id == c.target))
    });
    pb::Matrix {
        group: state.spec.name.clone(),
        observers,
        targets: state.spec.member_ids().map(str::to_owned).collect(),
        cells,
        verdicts: v.members.iter().map(member_verdict_pb).collect(),
        cut_links: v
            .cut_links
            .iter()
            .map(|c| pb::CutLink { observer: c.observer.to_string(), target: c.target.clone() })
            .collect(),
        isolated: v.isolated.iter().map(Observer::to_string).collect(),
        restarts: state.restarts.iter().map(restart_pb).collect(),
        revision: state.revision,
        served_by,
        policy: Some(policy_pb(&state.spec.policy)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(reason: Reason) -> Observation {
        Observation { state: ObsState::Down, reason, state_age_ms: 5, incarnation: Some(1), seq: Some(2), restarts: 0 }
    }

    #[test]
    fn reasons_and_roles_travel_as_codes_and_older_strings_still_read() {
        for r in REASONS {
            let p = observation_pb("m1", &obs(r));
            assert_eq!(observation_from_pb(&p).unwrap().1.reason, r);
            // An older sender: the string only.
            let old = pb::Observation { reason_code: 0, ..p.clone() };
            assert_eq!(observation_from_pb(&old).unwrap().1.reason, r);
            // The code wins over a string it disagrees with.
            let odd = pb::Observation { reason: "something else".into(), ..p };
            assert_eq!(observation_from_pb(&odd).unwrap().1.reason, r);
        }
        let bad = pb::Observation { reason_code: 99, ..observation_pb("m1", &obs(Reason::Frozen)) };
        assert!(observation_from_pb(&bad).unwrap_err().0.contains("code 99"));
        for role in [Role::Primary, Role::Replica, Role::Unknown] {
            let s = MemberStatus { role, offset: 1, link_up: true, synced_epoch: None, healthy: true, error: None };
            let p = status_pb(&s);
            assert_eq!(status_from_pb(&p).role, role);
            assert_eq!(status_from_pb(&pb::MemberStatus { role_code: 0, ..p }).role, role);
        }
    }
}

//! Primary election for managed groups: the replicated election state, and
//! the pure decision the Raft leader takes from the verdicts.
//!
//! The primary is whoever holds the group's lease; its epoch is the fencing
//! token. The election state names the *designated* member: only it may
//! acquire or renew the group's lease. Moving the primary therefore takes two
//! steps, and only the second one makes a new primary:
//!
//! 1. the leader designates a candidate (committed with its evidence): the
//!    old primary's renewals are refused from then on, so it fences itself;
//! 2. the candidate acquires the lease, which the state machine grants only
//!    once the old lease has expired with the drift margin on the leader's
//!    clock, with epoch + 1.
//!
//! [`decide`] designates only when every condition holds: the primary's
//! verdict is down; the candidate's is up; its priority is above 0; it has
//! replicated from a primary and lags by at most `max_lag_bytes`; the group
//! is not in maintenance; the minimum interval since the last failover has
//! passed; and the leader has been in office long enough to have fresh views
//! of its own. Among eligible candidates: the best by [`crate::ranking`]
//! (highest priority, then most data, then name).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::group::GroupSpec;
use crate::ranking::Rank;
use crate::verdict::{GroupVerdict, Verdict, explain};

pub use crate::designation::{Election, HistoryEntry, MAX_HISTORY, MemberStatus, MoveKind, Role, Switchover};

/// One member assessed as a candidate for the primary role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The member's name.
    pub member: String,
    /// Its configured priority (0 = never primary).
    pub priority: u32,
    /// Its quorum verdict: only an up member may take over.
    pub verdict: Verdict,
    /// Its reported replication offset; `None` before its agent reports.
    pub offset: Option<u64>,
    /// How far it is behind the most advanced member, in bytes.
    pub lag_bytes: Option<u64>,
    /// `None` when eligible, else why not.
    pub why_not: Option<String>,
}

impl Candidate {
    /// Whether it may be designated now.
    pub fn eligible(&self) -> bool {
        self.why_not.is_none()
    }

    /// Where this candidate stands in [`crate::ranking`]'s order.
    pub fn rank(&self) -> Rank<'_> {
        Rank {
            eligible: self.eligible(),
            priority: self.priority,
            offset: self.offset.unwrap_or(0),
            member: &self.member,
        }
    }
}

/// Every member but `exclude`, assessed and sorted best first by
/// [`crate::ranking`]: eligible before ineligible, then highest priority,
/// then most data, then name.
pub fn candidates(
    spec: &GroupSpec,
    statuses: &BTreeMap<String, MemberStatus>,
    verdict: &GroupVerdict,
    exclude: Option<&str>,
    max_lag_bytes: u64,
) -> Vec<Candidate> {
    // How much data a candidate must have: the most any member that could
    // hold it reports, i.e. the designated primary (down or not: its offset
    // when it went is what a failover must not lose) and every member seen
    // up. A member judged down that is not the primary is left out: a
    // replica cannot hold writes the primary did not, and one that claims
    // to (a compromised member reporting an offset of 2^64 - 1 after going
    // down) would otherwise make every other member lag and block every
    // failover.
    let counts =
        |member: &str| Some(member) == exclude || verdict.member(member).is_some_and(|mv| mv.state == Verdict::Up);
    let reference = statuses.iter().filter(|(m, _)| counts(m)).map(|(_, s)| s.offset).max().unwrap_or(0);
    let anyone_synced = statuses.values().any(|s| s.synced_epoch.is_some());
    let mut out: Vec<Candidate> = spec
        .members
        .iter()
        .filter(|m| Some(m.id.as_str()) != exclude)
        .map(|m| {
            let v = verdict.member(&m.id).map_or(Verdict::Unknown, |mv| mv.state);
            let status = statuses.get(&m.id);
            let offset = status.map(|s| s.offset);
            let lag_bytes = offset.map(|o| reference.saturating_sub(o));
            let why_not = if m.priority == 0 {
                Some("priority 0 (never primary)".to_owned())
            } else if v != Verdict::Up {
                Some(format!("its verdict is {}", v.as_str()))
            } else if status.is_none() {
                Some("its agent has not reported its data state".to_owned())
            } else if anyone_synced && status.is_some_and(|s| s.synced_epoch.is_none()) {
                Some("it has never synced from a primary (restarted empty?)".to_owned())
            } else if lag_bytes.is_some_and(|l| l > max_lag_bytes) {
                Some(format!("it lags by {} bytes (max_lag_bytes {max_lag_bytes})", lag_bytes.unwrap_or(0)))
            } else {
                None
            };
            Candidate { member: m.id.clone(), priority: m.priority, verdict: v, offset, lag_bytes, why_not }
        })
        .collect();
    out.sort_by(|a, b| a.rank().cmp(&b.rank()));
    out
}

/// What the leader should do about a managed group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Nothing: the designated primary is not down (or the group is not
    /// managed).
    Keep,
    /// Designate `to` (commit it with the reason and evidence).
    Designate {
        /// Why the designation moves.
        kind: MoveKind,
        /// The member designated now (the decision is stale if it changed).
        from: Option<String>,
        /// The member to designate.
        to: String,
        /// The decision in words.
        reason: String,
        /// What it was based on, committed with it.
        evidence: Vec<String>,
    },
    /// The primary is down but something prevents a failover.
    Blocked {
        /// What prevents it, in words.
        reason: String,
        /// Every candidate as assessed, best first.
        candidates: Vec<Candidate>,
    },
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct DecisionInput<'a> {
    /// The group's spec: members, priorities, failover policy.
    pub spec: &'a GroupSpec,
    /// Its replicated election state (designated member, blocks).
    pub election: &'a Election,
    /// What each member's agent last reported of its data service.
    pub statuses: &'a BTreeMap<String, MemberStatus>,
    /// The verdict over views reported in the current leader's term only.
    pub verdict: &'a GroupVerdict,
    /// Now, on the machine's clock.
    pub now_ms: u64,
    /// How long this leader's clock has been the machine's clock.
    pub term_age_ms: u64,
}

/// [`decide`] for a group as stored in the state machine.
pub fn decide_for(
    group: &crate::matrix::GroupState,
    verdict: &GroupVerdict,
    now_ms: u64,
    term_age_ms: u64,
) -> Decision {
    decide(DecisionInput {
        spec: &group.spec,
        election: &group.election,
        statuses: &group.statuses,
        verdict,
        now_ms,
        term_age_ms,
    })
}

/// The leader's decision for one managed group. Pure.
pub fn decide(input: DecisionInput<'_>) -> Decision {
    let DecisionInput { spec, election, statuses, verdict, now_ms, term_age_ms } = input;
    let Some(policy) = &spec.failover else { return Decision::Keep };
    let grace_ms = spec.policy.report_interval_ms + spec.policy.down_after_ms;
    let ranked = |exclude: Option<&str>| candidates(spec, statuses, verdict, exclude, policy.max_lag_bytes);

    let Some(primary) = &election.designated else {
        // A new group (or one whose designated member was removed).
        let c = ranked(None);
        return match c.iter().find(|c| c.eligible()) {
            Some(best) => Decision::Designate {
                kind: MoveKind::Initial,
                from: None,
                to: best.member.clone(),
                reason: format!("no primary designated; {} is the best eligible member", best.member),
                evidence: evidence_of(verdict, &c),
            },
            None => Decision::Blocked { reason: "no primary designated and no eligible member".into(), candidates: c },
        };
    };
    let Some(pv) = verdict.member(primary) else { return Decision::Keep };
    if pv.state != Verdict::Down {
        return Decision::Keep;
    }
    let c = ranked(Some(primary));
    let blocked = |reason: String| Decision::Blocked { reason, candidates: c.clone() };
    if election.maintenance {
        return blocked(format!("{primary} is down but the group is in maintenance"));
    }
    if term_age_ms < grace_ms {
        return blocked(format!(
            "{primary} looks down, but this Raft leader has been in office {term_age_ms} ms; it acts only on views of its own term, after {grace_ms} ms"
        ));
    }
    if election.failover_blocked_for_ms(policy.min_failover_interval_ms, now_ms).is_some() {
        return blocked(format!(
            "{primary} is down but the last failover was less than min_failover_interval_ms ({} ms) ago; clear the block with `quorate failover unblock {}`",
            policy.min_failover_interval_ms, spec.name
        ));
    }
    match c.iter().find(|c| c.eligible()) {
        Some(best) => Decision::Designate {
            kind: MoveKind::Failover,
            from: Some(primary.clone()),
            to: best.member.clone(),
            reason: format!(
                "{}; {} is up, priority {}, lag {} bytes",
                explain(pv),
                best.member,
                best.priority,
                best.lag_bytes.unwrap_or(0)
            ),
            evidence: evidence_of(verdict, &c),
        },
        None => blocked(format!("{primary} is down and no member is eligible to replace it")),
    }
}

/// The evidence committed with a decision: every verdict and every
/// candidate assessment, in words.
fn evidence_of(verdict: &GroupVerdict, candidates: &[Candidate]) -> Vec<String> {
    let mut out: Vec<String> = verdict.members.iter().map(explain).collect();
    for c in candidates {
        out.push(match &c.why_not {
            None => format!(
                "candidate {}: eligible (priority {}, offset {}, lag {} bytes)",
                c.member,
                c.priority,
                c.offset.unwrap_or(0),
                c.lag_bytes.unwrap_or(0)
            ),
            Some(w) => format!("candidate {}: not eligible: {w}", c.member),
        });
    }
    out
}

#[cfg(test)]
mod tests;

/// A decision in words (the election status and `quorate what-if`).
pub fn decision_text(d: &Decision) -> String {
    match d {
        Decision::Keep => "keep: the designated primary is not down".to_owned(),
        Decision::Designate { kind, from, to, reason, .. } => {
            format!("{} {} -> {to}: {reason}", kind.as_str(), from.as_deref().unwrap_or("(none)"))
        }
        Decision::Blocked { reason, .. } => format!("blocked: {reason}"),
    }
}

/// What the leader would decide if the members in `down` were judged down
/// by every observer, and it had been in office long enough: the decision
/// and the candidates it ranks. Refuses a name that is not a member.
pub fn what_if(
    group: &crate::matrix::GroupState,
    verdict: &GroupVerdict,
    now_ms: u64,
    down: &[String],
) -> Result<(Decision, Vec<Candidate>), String> {
    if let Some(d) = down.iter().find(|d| group.spec.member(d).is_none()) {
        return Err(format!("down: {d:?} is not a member of {:?}", group.spec.name));
    }
    let mut v = verdict.clone();
    for mv in v.members.iter_mut().filter(|mv| down.contains(&mv.member)) {
        mv.state = Verdict::Down;
        mv.down_votes = mv.observers;
        mv.up_votes = 0;
    }
    let decision = decide_for(group, &v, now_ms, u64::MAX / 2);
    let policy = group.spec.failover.clone().unwrap_or_default();
    let ranked =
        candidates(&group.spec, &group.statuses, &v, group.election.designated.as_deref(), policy.max_lag_bytes);
    Ok((decision, ranked))
}

//! The verdict: a pure function of a group's matrix, its spec, the set of
//! coordinators and the time.
//!
//! For each member, its *configured observers* are the other members and every
//! coordinator, whether or not they happen to report. Quorum is a majority of
//! them. Only fresh views count (reported within `freshness_ms`).
//!
//! - `down`: a quorum of fresh reports say down;
//! - `up`: a quorum of fresh reports say up and none says down;
//! - `partial`: some observers see it, but not all that report (a cut
//!   link), or not yet a quorum;
//! - `unknown`: nobody freshly sees it, and not a quorum says down.
//!
//! The verdict also names cut links (an observer that loses a member a quorum
//! sees) and isolated observers (an observer that loses every member a quorum
//! sees). Every member verdict carries its evidence: who said what, how old.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::matrix::{GroupState, Observer};
use crate::observe::{ObsState, Reason};
use crate::quorum::{QuorumResult, majority, majority_of};

/// A member's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// A quorum of fresh reports say up and none says down.
    Up,
    /// Some observers see it, but not all that report, or not yet a quorum.
    Partial,
    /// A quorum of fresh reports say down: the only verdict that fails over.
    Down,
    /// Nobody freshly sees it, and not a quorum says down.
    Unknown,
}

impl Verdict {
    /// The verdict in words, as the CLI and explanations show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Up => "up",
            Verdict::Partial => "partial",
            Verdict::Down => "down",
            Verdict::Unknown => "unknown",
        }
    }
}

/// What one configured observer contributed to a member's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The observer.
    pub observer: Observer,
    /// `None` when this observer has no report about the member at all.
    pub state: Option<ObsState>,
    /// Why it says so, as it reported.
    pub reason: Option<Reason>,
    /// Age of the observer's view, in ms.
    pub view_age_ms: Option<u64>,
    /// How long the observer had held its state when it reported.
    pub state_age_ms: Option<u64>,
    /// Whether the report counts (younger than the freshness bound).
    pub fresh: bool,
}

/// One member's verdict with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberVerdict {
    /// The member judged.
    pub member: String,
    /// The verdict.
    pub state: Verdict,
    /// Fresh reports that say up.
    pub up_votes: usize,
    /// Fresh reports that say down.
    pub down_votes: usize,
    /// Fresh reports that say unknown.
    pub unknown_votes: usize,
    /// Configured observers without a fresh report.
    pub silent: usize,
    /// Number of configured observers.
    pub observers: usize,
    /// Votes a quorum needs: a majority of the configured observers.
    pub quorum: usize,
    /// Is a quorum saying down?
    pub quorum_down: QuorumResult,
    /// Is a quorum saying up?
    pub quorum_up: QuorumResult,
    /// Each configured observer's contribution, for explanations.
    pub evidence: Vec<Evidence>,
}

/// An observer that loses a member a quorum sees.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CutLink {
    /// The observer that loses it.
    pub observer: Observer,
    /// The member it loses.
    pub target: String,
}

/// The verdict of a whole group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVerdict {
    /// In spec order.
    pub members: Vec<MemberVerdict>,
    /// Observers that lose a member a quorum sees.
    pub cut_links: Vec<CutLink>,
    /// Observers that lose every member a quorum sees.
    pub isolated: Vec<Observer>,
}

impl GroupVerdict {
    /// The verdict of the member named `id`.
    pub fn member(&self, id: &str) -> Option<&MemberVerdict> {
        self.members.iter().find(|m| m.member == id)
    }

    /// Member id to verdict state.
    pub fn states(&self) -> BTreeMap<String, Verdict> {
        self.members.iter().map(|m| (m.member.clone(), m.state)).collect()
    }
}

/// The configured observers of `member`: the other members, then every
/// coordinator.
pub fn observers_of(state: &GroupState, coordinators: &[u64], member: &str) -> Vec<Observer> {
    let mut out: Vec<Observer> =
        state.spec.member_ids().filter(|m| *m != member).map(|m| Observer::Member(m.to_owned())).collect();
    out.extend(coordinators.iter().map(|c| Observer::Coordinator(*c)));
    out
}

/// Computes the verdict of every member at `now_ms` (the machine's clock).
/// `coordinators` are the Raft voters.
pub fn verdict(state: &GroupState, coordinators: &[u64], now_ms: u64) -> GroupVerdict {
    verdict_since(state, coordinators, now_ms, None)
}

/// Like [`verdict`], counting only views reported at or after `since_ms`
/// (the current leader's first entry): a new leader acts only on views of
/// its own term.
pub fn verdict_since(state: &GroupState, coordinators: &[u64], now_ms: u64, since_ms: Option<u64>) -> GroupVerdict {
    let freshness = state.spec.policy.freshness_ms;
    let counts = |v: &crate::matrix::StoredView| {
        GroupState::view_age_ms(v, now_ms) <= freshness
            && since_ms.is_none_or(|s| i128::from(v.reported_at_ms) >= i128::from(s))
    };
    let mut members = Vec::with_capacity(state.spec.members.len());
    for m in &state.spec.members {
        let observers = observers_of(state, coordinators, &m.id);
        let mut evidence = Vec::with_capacity(observers.len());
        let (mut up, mut down, mut unknown) = (0, 0, 0);
        for o in observers {
            let view = state.views.get(&o);
            let cell = view.and_then(|v| v.cells.get(&m.id));
            let view_age_ms = view.map(|v| GroupState::view_age_ms(v, now_ms));
            let fresh = cell.is_some() && view.is_some_and(counts);
            if fresh {
                match cell.map(|c| c.state) {
                    Some(ObsState::Up) => up += 1,
                    Some(ObsState::Down) => down += 1,
                    _ => unknown += 1,
                }
            }
            evidence.push(Evidence {
                observer: o,
                state: cell.map(|c| c.state),
                reason: cell.map(|c| c.reason),
                view_age_ms: cell.and(view_age_ms),
                state_age_ms: cell.map(|c| c.state_age_ms),
                fresh,
            });
        }
        let total = evidence.len();
        let quorum_down = majority(total, down, up);
        let quorum_up = majority(total, up, down);
        let state = if quorum_down == QuorumResult::Yes {
            Verdict::Down
        } else if quorum_up == QuorumResult::Yes && down == 0 {
            Verdict::Up
        } else if up > 0 {
            Verdict::Partial
        } else {
            Verdict::Unknown
        };
        members.push(MemberVerdict {
            member: m.id.clone(),
            state,
            up_votes: up,
            down_votes: down,
            unknown_votes: unknown,
            silent: total - up - down - unknown,
            observers: total,
            quorum: majority_of(total),
            quorum_down,
            quorum_up,
            evidence,
        });
    }

    // Cut links: fresh down reports about members a quorum sees.
    let mut cut_links = Vec::new();
    for mv in members.iter().filter(|mv| mv.quorum_up == QuorumResult::Yes) {
        for e in mv.evidence.iter().filter(|e| e.fresh && e.state == Some(ObsState::Down)) {
            cut_links.push(CutLink { observer: e.observer.clone(), target: mv.member.clone() });
        }
    }
    cut_links.sort();

    // Isolated: an observer whose fresh view loses every member that a
    // quorum sees (and that it observes), with at least one such member.
    let mut isolated = Vec::new();
    for (observer, view) in &state.views {
        if !counts(view) {
            continue;
        }
        let seen_by_quorum: Vec<&MemberVerdict> = members
            .iter()
            .filter(|mv| mv.quorum_up == QuorumResult::Yes && view.cells.contains_key(&mv.member))
            .collect();
        let loses_all = seen_by_quorum.iter().all(|mv| view.cells[&mv.member].state == ObsState::Down);
        if !seen_by_quorum.is_empty() && loses_all {
            isolated.push(observer.clone());
        }
    }
    GroupVerdict { members, cut_links, isolated }
}

/// The verdict of one member in one sentence.
pub fn explain(mv: &MemberVerdict) -> String {
    let who_down: Vec<String> = mv
        .evidence
        .iter()
        .filter(|e| e.fresh && e.state == Some(ObsState::Down))
        .map(|e| format!("{} ({})", e.observer, e.reason.map_or("down", Reason::as_str)))
        .collect();
    let n = mv.observers;
    let q = mv.quorum;
    match mv.state {
        Verdict::Down => format!(
            "{} is DOWN: {} of {n} observers report it down (quorum {q}): {}.",
            mv.member,
            mv.down_votes,
            who_down.join(", ")
        ),
        Verdict::Up => {
            format!("{} is UP: {} of {n} observers see its heartbeat advancing (quorum {q}).", mv.member, mv.up_votes)
        }
        Verdict::Partial if mv.quorum_up == QuorumResult::Yes => format!(
            "{} is PARTIAL: a quorum sees it ({} of {n}, quorum {q}) but {} lose it: {}; cut links, not a failure.",
            mv.member,
            mv.up_votes,
            mv.down_votes,
            who_down.join(", ")
        ),
        Verdict::Partial => format!(
            "{} is PARTIAL: {} of {n} observers see it and {} report it down, neither a quorum of {q}; {} have no fresh report.",
            mv.member, mv.up_votes, mv.down_votes, mv.silent
        ),
        Verdict::Unknown => format!(
            "{} is UNKNOWN: no fresh report sees it, and only {} of {n} report it down (quorum {q}); {} observers have no fresh report.",
            mv.member, mv.down_votes, mv.silent
        ),
    }
}

#[cfg(test)]
mod tests;

//! The replicated election state of a managed group, as data: who is
//! designated primary, the history of moves, what each member's agent
//! reports about its data service. Kept apart from the decisions over it
//! ([`crate::election`]), which read verdicts, so that the group state
//! ([`crate::matrix::GroupState`]) can hold it without an import circle.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// History entries kept per group.
pub const MAX_HISTORY: usize = 64;

/// The data role a member's agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// It accepts writes (or would, unfenced).
    Primary,
    /// It replicates from a primary.
    Replica,
    /// Unreachable, or a role quorate does not know.
    Unknown,
}

impl Role {
    /// The role in words, as the CLI and logs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        }
    }
}

/// What a member's agent reports about its own data service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// The role the data service reports for itself.
    pub role: Role,
    /// Replication offset (bytes of the replication stream applied).
    pub offset: u64,
    /// For a replica: its link to the primary is up.
    pub link_up: bool,
    /// The lease epoch of the primary this member last fully synced from
    /// (or acted as primary under); `None` for a member that never did,
    /// such as one that restarted empty.
    pub synced_epoch: Option<u64>,
    /// Whether the agent's role driver is healthy (last action succeeded).
    pub healthy: bool,
    /// The last driver error, if any.
    pub error: Option<String>,
}

/// How the designation moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveKind {
    /// The group was created (or lost its designated member).
    Initial,
    /// Automatic: the primary was judged down.
    Failover,
    /// Planned by an operator.
    Switchover,
}

impl MoveKind {
    /// The kind in words, as history and logs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::Initial => "initial",
            MoveKind::Failover => "failover",
            MoveKind::Switchover => "switchover",
        }
    }
}

/// One change of designated primary, as committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Raft log index of the decision.
    pub revision: u64,
    /// Why the designation moved.
    pub kind: MoveKind,
    /// The member designated before; `None` for a group's first.
    pub from: Option<String>,
    /// The member designated by this entry.
    pub to: String,
    /// The epoch `to` acquired the lease at (filled in when it does).
    pub epoch: Option<u64>,
    /// The decision in words, for people reading the history.
    pub reason: String,
    /// The evidence the decision used (verdict explanations, candidates).
    pub evidence: Vec<String>,
    /// The deciding leader's wall clock, for people (never compared).
    pub wall_ms: u64,
}

/// A planned switchover in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// The member that takes over once the primary releases its lease.
    pub to: String,
    /// The Raft log index of the request, so history can name it.
    pub requested_revision: u64,
}

/// The replicated election state of a managed group.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Election {
    /// The only member allowed to hold (acquire, renew) the group's lease.
    pub designated: Option<String>,
    /// No automatic failover while on.
    pub maintenance: bool,
    /// When the last automatic failover was decided, on the machine's clock.
    pub last_failover_ms: Option<i64>,
    /// A planned switchover waiting for the primary to release its lease.
    pub switchover: Option<Switchover>,
    /// The latest moves of the designation, oldest first, at most
    /// [`MAX_HISTORY`].
    pub history: VecDeque<HistoryEntry>,
}

impl Election {
    /// Appends a move to the history, dropping the oldest beyond
    /// [`MAX_HISTORY`] so the replicated state stays bounded.
    pub fn record(&mut self, entry: HistoryEntry) {
        if self.history.len() == MAX_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(entry);
    }

    /// When automatic failovers are allowed again (machine clock).
    pub fn blocked_until_ms(&self, min_interval_ms: u64) -> Option<i64> {
        self.last_failover_ms.map(|t| t.saturating_add(i64::try_from(min_interval_ms).unwrap_or(i64::MAX)))
    }

    /// How long automatic failovers stay blocked after `now_ms` (machine
    /// clock); `None` when they are allowed. The one computation of the
    /// block: the state machine refuses by it, the decision and the status
    /// report it.
    pub fn failover_blocked_for_ms(&self, min_interval_ms: u64, now_ms: u64) -> Option<u64> {
        let until = self.blocked_until_ms(min_interval_ms)?;
        let remaining = i128::from(until) - i128::from(now_ms);
        (remaining > 0).then(|| u64::try_from(remaining).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failover_blocks_the_next_for_the_minimum_interval() {
        let mut e = Election::default();
        assert_eq!(e.failover_blocked_for_ms(30_000, 5_000), None, "no failover yet");
        e.last_failover_ms = Some(10_000);
        assert_eq!(e.failover_blocked_for_ms(30_000, 10_000), Some(30_000));
        assert_eq!(e.failover_blocked_for_ms(30_000, 39_999), Some(1));
        assert_eq!(e.failover_blocked_for_ms(30_000, 40_000), None);
        // A failover stamped on a clock shifted below zero (matrix rebase).
        e.last_failover_ms = Some(-5_000);
        assert_eq!(e.failover_blocked_for_ms(30_000, 0), Some(25_000));
        assert_eq!(e.failover_blocked_for_ms(u64::MAX, 0), Some(i64::MAX as u64 - 5_000));
    }
}

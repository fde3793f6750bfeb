//! Cluster membership decisions: may a node be added, removed or promoted,
//! is it safe to stop one now, and what a node's own standing is.
//!
//! The Raft library does the joint-consensus change itself; what it does
//! not decide is whether a change is *wise*. Removing a healthy voter while
//! another is down leaves a cluster that can no longer commit; promoting a
//! learner that is far behind stalls commits until it catches up; reusing
//! the id of a removed node lets a stale log vote. Those rules live here,
//! on plain values the leader measured (who it heard from lately, how far
//! behind each node is), so they are tested without a cluster.
//!
//! Whether a node is *current* (heard from lately and close behind the
//! leader's log) has three answers, like every quorum question here
//! ([`crate::quorum`]): a follower cannot know how the others are doing, and
//! "unknown" must never count as "current".

use std::collections::BTreeSet;
use std::fmt;

use crate::quorum::{QuorumResult, majority, majority_of};

/// How recently the leader heard from a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Contact {
    /// Within the contact window (the leader's heartbeat was acknowledged).
    Recent,
    /// Not within it: down, cut off, or restarting.
    Stale,
    /// Not known: only the leader measures contact.
    Unknown,
}

/// One node of the membership as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeProgress {
    /// The Raft node id.
    pub id: u64,
    /// A voter (else a learner).
    pub voter: bool,
    /// How recently the leader heard from it.
    pub contact: Contact,
    /// Entries it is behind the leader's last log entry; `None` when not
    /// known (no replication reported yet, or not the leader's view).
    pub lag_entries: Option<u64>,
}

/// The membership with the leader's measurements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterProgress {
    /// The node whose view this is, when it leads (it is current by
    /// definition); `None` when the view is a follower's.
    pub leader: Option<u64>,
    /// Every node of the membership, voters and learners.
    pub nodes: Vec<NodeProgress>,
    /// How many entries behind still counts as up to date.
    pub max_lag_entries: u64,
}

/// Whether a node is up to date with the leader, three ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Currency {
    /// Heard from lately and at most `max_lag_entries` behind.
    Current,
    /// Not heard from lately, or further behind.
    Behind,
    /// Not known (a follower's view, or no replication reported yet).
    Unknown,
}

impl Currency {
    /// The name in output and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Currency::Current => "current",
            Currency::Behind => "behind",
            Currency::Unknown => "unknown",
        }
    }
}

impl ClusterProgress {
    /// The voters' ids.
    pub fn voters(&self) -> BTreeSet<u64> {
        self.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect()
    }

    /// The learners' ids.
    pub fn learners(&self) -> BTreeSet<u64> {
        self.nodes.iter().filter(|n| !n.voter).map(|n| n.id).collect()
    }

    fn node(&self, id: u64) -> Option<&NodeProgress> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Whether node `id` is up to date. The leader always is; a node the
    /// leader lost contact with is behind whatever its last known lag.
    pub fn currency(&self, id: u64) -> Currency {
        if self.leader == Some(id) {
            return Currency::Current;
        }
        let Some(n) = self.node(id) else { return Currency::Unknown };
        match (n.contact, n.lag_entries) {
            (Contact::Stale, _) => Currency::Behind,
            (Contact::Recent, Some(lag)) if lag <= self.max_lag_entries => Currency::Current,
            (Contact::Recent, Some(_)) => Currency::Behind,
            (Contact::Recent, None) | (Contact::Unknown, _) => Currency::Unknown,
        }
    }

    /// Whether the voters in `voters` that are current form a majority of
    /// them, counted over all of them (silence is not consent).
    fn current_majority(&self, voters: &BTreeSet<u64>) -> QuorumResult {
        let (mut yes, mut no) = (0, 0);
        for id in voters {
            match self.currency(*id) {
                Currency::Current => yes += 1,
                Currency::Behind => no += 1,
                Currency::Unknown => {}
            }
        }
        if voters.is_empty() {
            return QuorumResult::No;
        }
        majority(voters.len(), yes, no)
    }

    /// Whether node `id` may be taken down now (a restart, an upgrade)
    /// without the cluster losing its quorum: the other voters that are
    /// current must form a majority of all voters. A learner may always go.
    /// `Yes` only when the leader's view shows it.
    pub fn stop_safety(&self, id: u64) -> QuorumResult {
        let Some(n) = self.node(id) else { return QuorumResult::NotEnoughInformation };
        if !n.voter {
            return QuorumResult::Yes;
        }
        let voters = self.voters();
        let (mut yes, mut no) = (0, 1);
        for v in voters.iter().filter(|v| **v != id) {
            match self.currency(*v) {
                Currency::Current => yes += 1,
                Currency::Behind => no += 1,
                Currency::Unknown => {}
            }
        }
        majority(voters.len(), yes, no)
    }

    /// Whether learner `id` is caught up enough to become a voter.
    pub fn promotion(&self, id: u64) -> Promotion {
        match self.node(id) {
            None => Promotion::NotMember,
            Some(n) if n.voter => Promotion::AlreadyVoter,
            Some(_) => match self.currency(id) {
                Currency::Current => Promotion::Ready,
                Currency::Behind => Promotion::NotYet,
                Currency::Unknown => Promotion::Unknown,
            },
        }
    }

    /// May node `id` be removed now? A learner always; a voter only if the
    /// voters left behind can still commit: the current ones among them
    /// form a majority of them (and of today's voters, since a joint change
    /// needs both), and it is not the only node that is up to date.
    pub fn removal(&self, id: u64) -> Result<(), RemovalRefused> {
        let Some(n) = self.node(id) else { return Err(RemovalRefused::NotMember { id }) };
        if !n.voter {
            return Ok(());
        }
        let voters = self.voters();
        let remaining: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != id).collect();
        if remaining.is_empty() {
            return Err(RemovalRefused::LastVoter { id });
        }
        let current_left = remaining.iter().filter(|v| self.currency(**v) == Currency::Current).count();
        if self.currency(id) == Currency::Current && current_left == 0 {
            return Err(RemovalRefused::OnlyUpToDate { id });
        }
        let needed = majority_of(remaining.len());
        match self.current_majority(&remaining) {
            QuorumResult::Yes => {}
            QuorumResult::No => {
                return Err(RemovalRefused::WouldLoseQuorum {
                    id,
                    remaining: remaining.len(),
                    current: current_left,
                    needed,
                });
            }
            QuorumResult::NotEnoughInformation => return Err(RemovalRefused::Unknown { id }),
        }
        match self.current_majority(&voters) {
            QuorumResult::Yes => Ok(()),
            QuorumResult::No => Err(RemovalRefused::NoQuorumNow { voters: voters.len() }),
            QuorumResult::NotEnoughInformation => Err(RemovalRefused::Unknown { id }),
        }
    }
}

/// Whether a learner may be promoted to voter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// Caught up: promote it.
    Ready,
    /// Still catching up (or not heard from): wait.
    NotYet,
    /// Not known from this view (not the leader's, or no progress yet).
    Unknown,
    /// Already a voter: nothing to do.
    AlreadyVoter,
    /// Not in the membership at all.
    NotMember,
}

/// Why a node may not be removed now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemovalRefused {
    /// It is not in the membership.
    #[error("node {id} is not a member of this cluster")]
    NotMember {
        /// The node.
        id: u64,
    },
    /// It is the only voter.
    #[error("node {id} is the only voter: removing it would leave no cluster")]
    LastVoter {
        /// The node.
        id: u64,
    },
    /// Every other voter is behind or out of reach.
    #[error(
        "node {id} is the only voter that is up to date: removing it now could lose acknowledged writes; \
         wait until another voter has caught up"
    )]
    OnlyUpToDate {
        /// The node.
        id: u64,
    },
    /// The voters left would not form a quorum of themselves.
    #[error(
        "removing node {id} would leave {remaining} voters of which only {current} are reachable and up to date, \
         fewer than the {needed} a quorum needs; bring the others back (or remove an unreachable one) first"
    )]
    WouldLoseQuorum {
        /// The node.
        id: u64,
        /// Voters after the removal.
        remaining: usize,
        /// Of those, how many are current.
        current: usize,
        /// The quorum of the remaining voters.
        needed: usize,
    },
    /// Today's voters lack a quorum: no change can commit.
    #[error(
        "the {voters} voters do not have a quorum of reachable, up-to-date nodes now: no membership change can commit"
    )]
    NoQuorumNow {
        /// Voters now.
        voters: usize,
    },
    /// This view cannot tell (not the leader's, or no progress yet).
    #[error(
        "cannot tell whether removing node {id} is safe: the leader has not measured every voter yet; retry shortly"
    )]
    Unknown {
        /// The node.
        id: u64,
    },
}

/// Why a node may not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddRefused {
    /// The id belonged to a node that was removed: ids are never reused.
    #[error(
        "node id {id} belonged to a node that was removed from this cluster; ids are never reused \
         (a stale log under an old id could vote): add it with a new id"
    )]
    Removed {
        /// The id.
        id: u64,
    },
    /// Another member already has this address.
    #[error("node {other} already has address {addr}")]
    AddressTaken {
        /// The address.
        addr: String,
        /// Who has it.
        other: u64,
    },
    /// The id is a member with another address.
    #[error("node {id} is already a member, at {current}; remove it first to move it")]
    OtherAddress {
        /// The id.
        id: u64,
        /// Its address in the membership.
        current: String,
    },
    /// The id is 0 (reserved: never a valid node).
    #[error("node id 0 is not valid; use 1 or more")]
    ZeroId,
}

/// Whether node `id` at `addr` may join, given the membership's nodes
/// (id, address) and the ids ever removed. Adding a node that is already
/// a member at that address is allowed (a retried add continues).
pub fn check_add(id: u64, addr: &str, nodes: &[(u64, String)], removed: &BTreeSet<u64>) -> Result<(), AddRefused> {
    if id == 0 {
        return Err(AddRefused::ZeroId);
    }
    if removed.contains(&id) {
        return Err(AddRefused::Removed { id });
    }
    if let Some((other, _)) = nodes.iter().find(|(o, a)| *o != id && a == addr) {
        return Err(AddRefused::AddressTaken { addr: addr.to_owned(), other: *other });
    }
    match nodes.iter().find(|(o, _)| *o == id) {
        Some((_, current)) if current != addr => Err(AddRefused::OtherAddress { id, current: current.clone() }),
        _ => Ok(()),
    }
}

/// The ids a membership change took out: in `before`, not in `after`.
/// Once out, an id stays removed for ever (see [`AddRefused::Removed`]).
pub fn removed_by(before: &BTreeSet<u64>, after: &BTreeSet<u64>) -> BTreeSet<u64> {
    before.difference(after).copied().collect()
}

/// A node's standing in a cluster, from what a member of it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// In the membership.
    Member,
    /// Not (yet) in it: a new node waiting to be added.
    NotYetAdded,
    /// Removed from it: it must not rejoin under this id.
    Removed,
}

impl fmt::Display for Standing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Standing::Member => "a member",
            Standing::NotYetAdded => "not yet added",
            Standing::Removed => "removed",
        })
    }
}

/// Node `id`'s standing, given a member's membership and removed ids.
pub fn standing(id: u64, members: &BTreeSet<u64>, removed: &BTreeSet<u64>) -> Standing {
    if removed.contains(&id) {
        Standing::Removed
    } else if members.contains(&id) {
        Standing::Member
    } else {
        Standing::NotYetAdded
    }
}

#[cfg(test)]
mod tests;

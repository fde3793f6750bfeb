//! The one order of members for the primary role.
//!
//! Every choice of a primary ranks members the same way: the candidates of
//! a failover ([`crate::election::candidates`]), the target of a planned
//! switchover without one named, and the initial primary of a new group
//! ([`crate::group::GroupSpec::initial_primary`]). One rule, so that what
//! `quorate what-if` shows is what a failover or a switchover does.
//!
//! The order, best first:
//!
//! 1. eligible before ineligible;
//! 2. higher priority;
//! 3. more data: the higher replication offset (a member that has not
//!    reported one counts as 0);
//! 4. the tie-break: the name, ascending. Names are unique in a group, so
//!    the order is total, and it depends on nothing but the members
//!    themselves (not on the order of the spec's list), so every replica
//!    and every caller picks the same member.

use std::cmp::{Ordering, Reverse};

/// What ranks one member for the primary role. Compares best first: the
/// smallest `Rank` is the best member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rank<'a> {
    /// Whether the member may take the role now (the caller's rules: its
    /// verdict, its lag, a priority above 0...).
    pub eligible: bool,
    /// The member's configured preference (higher is better).
    pub priority: u32,
    /// The member's replication offset; 0 when unknown.
    pub offset: u64,
    /// The member's name, the tie-break.
    pub member: &'a str,
}

impl Rank<'_> {
    /// The sort key: keys compare ascending in the order documented above.
    fn key(&self) -> (Reverse<bool>, Reverse<u32>, Reverse<u64>, &str) {
        (Reverse(self.eligible), Reverse(self.priority), Reverse(self.offset), self.member)
    }
}

impl Ord for Rank<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for Rank<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The best of `items` by `rank`, if there is any.
pub fn best<T>(items: impl IntoIterator<Item = T>, rank: impl Fn(&T) -> Rank<'_>) -> Option<T> {
    items.into_iter().min_by(|a, b| rank(a).cmp(&rank(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(eligible: bool, priority: u32, offset: u64, member: &str) -> Rank<'_> {
        Rank { eligible, priority, offset, member }
    }

    #[test]
    fn each_rule_decides_only_when_the_ones_before_tie() {
        // Eligibility beats priority, offset and name.
        assert!(rank(true, 1, 0, "z") < rank(false, 200, 9, "a"));
        // Priority beats offset and name.
        assert!(rank(true, 200, 0, "z") < rank(true, 100, 9, "a"));
        // Offset beats name.
        assert!(rank(true, 100, 9, "z") < rank(true, 100, 0, "a"));
        // The name breaks the last tie, ascending.
        assert!(rank(true, 100, 9, "a") < rank(true, 100, 9, "b"));
        assert_eq!(rank(true, 1, 2, "a").cmp(&rank(true, 1, 2, "a")), Ordering::Equal);
    }

    #[test]
    fn best_picks_the_smallest_rank_whatever_the_input_order() {
        let members = [("db-3", 100, 5), ("db-1", 50, 9), ("db-2", 100, 5)];
        fn of<'a>(m: &'a (&str, u32, u64)) -> Rank<'a> {
            rank(true, m.1, m.2, m.0)
        }
        assert_eq!(best(members, of).map(|m| m.0), Some("db-2"));
        let mut reversed = members;
        reversed.reverse();
        assert_eq!(best(reversed, of).map(|m| m.0), Some("db-2"));
        assert_eq!(best(Vec::<(&str, u32, u64)>::new(), of), None);
    }
}

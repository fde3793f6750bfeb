//! Majority questions, with three answers.
//!
//! "Is a quorum of these observers saying X?" can be yes, no (it can no
//! longer happen whatever the silent observers would say), or not enough
//! information yet. Collapsing the third answer into "no" is how failure
//! detectors end up acting on silence (raft-rs `quorum.rs` has the same shape).

/// The answer to a majority question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum QuorumResult {
    /// At least a majority of all configured voters said yes.
    Yes,
    /// So many said no that a majority of yes is impossible.
    No,
    /// Neither: too many voters have not (freshly) spoken.
    NotEnoughInformation,
}

/// The majority of `total` voters: more than half.
pub fn majority_of(total: usize) -> usize {
    total / 2 + 1
}

/// Whether `yes` out of `total` configured voters is a majority, given that
/// `no` of them said no (the rest are silent). Counts are over *all
/// configured* voters, never over those that happened to answer.
pub fn majority(total: usize, yes: usize, no: usize) -> QuorumResult {
    assert!(yes + no <= total, "{yes} yes + {no} no votes from {total} voters");
    let q = majority_of(total);
    if yes >= q {
        QuorumResult::Yes
    } else if total - no < q {
        QuorumResult::No
    } else {
        QuorumResult::NotEnoughInformation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_answers() {
        assert_eq!(majority(4, 3, 0), QuorumResult::Yes);
        assert_eq!(majority(4, 2, 2), QuorumResult::No);
        assert_eq!(majority(4, 2, 0), QuorumResult::NotEnoughInformation);
        assert_eq!(majority(4, 2, 1), QuorumResult::NotEnoughInformation);
        assert_eq!(majority(5, 3, 2), QuorumResult::Yes);
        assert_eq!(majority(5, 0, 3), QuorumResult::No);
        assert_eq!(majority(1, 0, 0), QuorumResult::NotEnoughInformation);
    }

    #[test]
    fn yes_for_both_sides_is_impossible() {
        for total in 1..12 {
            for a in 0..=total {
                for b in 0..=(total - a) {
                    let x = majority(total, a, b);
                    let y = majority(total, b, a);
                    assert!(!(x == QuorumResult::Yes && y == QuorumResult::Yes));
                    if x == QuorumResult::Yes {
                        assert_eq!(y, QuorumResult::No);
                    }
                }
            }
        }
    }
}

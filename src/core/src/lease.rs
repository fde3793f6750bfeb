//! Lease arithmetic, for both sides of a lease.
//!
//! A lease is granted (or renewed) by the Raft leader and used by a holder. The
//! two sides never share a clock, so each side works on its own monotonic clock
//! and the arithmetic absorbs the worst-case rate difference between them:
//!
//! - the **holder** takes `t_send` on its clock *before* it sends a renewal and
//!   treats the lease as valid until `t_send + ttl * (1 - drift) - margin`;
//! - the **grantor** (the Raft leader, through the state machine) grants the
//!   lease to somebody else only at `t_renewed + ttl * (1 + drift) + margin` on
//!   its clock, where `t_renewed` is its stamp on the last renewal, taken after
//!   the holder's `t_send` in real time.
//!
//! With clock rates bounded by `1 ± drift`, the holder's validity ends (in real
//! time) before the grantor's wait does; see the property test
//! `holder_validity_ends_before_grantor_wait`. Everything is integer
//! arithmetic in milliseconds and parts per million so that replicas compute
//! exactly the same numbers.

use serde::{Deserialize, Serialize};

/// One million: the denominator of `max_clock_drift_ppm`.
pub const PPM: u64 = 1_000_000;

/// The clock assumptions a lease is computed under.
///
/// Carried inside every lease command (see [`crate::machine::LeaderStamp`]), so
/// that the replicated state machine never depends on a replica's local config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseTiming {
    /// The largest rate difference between any two clocks in the system, in
    /// parts per million (10_000 = 1%). Must be below 500_000.
    pub max_clock_drift_ppm: u64,
    /// Extra safety time subtracted on the holder side and added on the
    /// grantor side, in milliseconds. Covers scheduling jitter between the
    /// holder checking its deadline and acting on it.
    pub lease_margin_ms: u64,
    /// UNSAFE, for the fault suite's negative control only: the grantor does
    /// not wait for a lease to expire before granting it to someone else.
    /// The suite must flag overlapping holders when this is on. Off unless a
    /// server is started with `--test-only-skip-lease-wait`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub test_only_skip_wait: bool,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self { max_clock_drift_ppm: 10_000, lease_margin_ms: 50, test_only_skip_wait: false }
    }
}

/// Why a [`LeaseTiming`] or a TTL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    /// A drift bound of half a clock's rate or more leaves no lease valid.
    #[error("max_clock_drift_ppm must be below 500000 (50%), got {0}")]
    DriftTooLarge(u64),
    /// The drift and the margin eat the whole TTL.
    #[error(
        "a lease of {ttl_ms} ms leaves the holder no valid time: ttl * (1 - drift) - lease_margin_ms <= 0; use a longer TTL or a smaller margin"
    )]
    TtlTooShort {
        /// The TTL asked for.
        ttl_ms: u64,
    },
}

impl LeaseTiming {
    /// Checks the timing itself.
    pub fn validate(&self) -> Result<(), TimingError> {
        if self.max_clock_drift_ppm >= PPM / 2 {
            return Err(TimingError::DriftTooLarge(self.max_clock_drift_ppm));
        }
        Ok(())
    }

    /// Checks that a lease of `ttl_ms` gives its holder some valid time.
    pub fn check_ttl(&self, ttl_ms: u64) -> Result<(), TimingError> {
        if self.holder_valid_for_ms(ttl_ms) == 0 {
            return Err(TimingError::TtlTooShort { ttl_ms });
        }
        Ok(())
    }

    /// How long after `t_send` the holder may act: `ttl * (1 - drift) - margin`,
    /// rounded down, never negative.
    pub fn holder_valid_for_ms(&self, ttl_ms: u64) -> u64 {
        let slow = mul_ppm_floor(ttl_ms, PPM - self.max_clock_drift_ppm.min(PPM));
        slow.saturating_sub(self.lease_margin_ms)
    }

    /// The holder's deadline on its own clock for a renewal sent at `send_ms`.
    pub fn holder_deadline_ms(&self, send_ms: u64, ttl_ms: u64) -> u64 {
        send_ms.saturating_add(self.holder_valid_for_ms(ttl_ms))
    }

    /// How long the grantor waits after the last renewal before it may grant
    /// the lease to a different holder: `ttl * (1 + drift) + margin`, rounded up.
    pub fn grant_delay_ms(&self, ttl_ms: u64) -> u64 {
        if self.test_only_skip_wait {
            return 0;
        }
        mul_ppm_ceil(ttl_ms, PPM + self.max_clock_drift_ppm).saturating_add(self.lease_margin_ms)
    }

    /// The grantor-clock time at which a lease renewed at `renewed_ms` may be
    /// granted to someone else.
    pub fn grantable_at_ms(&self, renewed_ms: u64, ttl_ms: u64) -> u64 {
        renewed_ms.saturating_add(self.grant_delay_ms(ttl_ms))
    }

    /// How long a quorum acknowledgement lets the Raft leader act as leader
    /// without asking the quorum again (linearizable reads, unlogged
    /// renewals), in microseconds.
    ///
    /// A follower that acknowledged a heartbeat sent at `t` refuses votes
    /// until `leader_lease_ms` after it received it, on its own clock: no
    /// other leader is elected before `t + leader_lease_ms` in real time as
    /// measured by that follower. The leader measures the age on its clock,
    /// so the usable age is shortened for two clocks' drift (the leader's
    /// slow, the follower's fast: `lease * (1 - 2 * drift)`, below
    /// `lease * (1 - drift) / (1 + drift)`) and by the margin. Zero means
    /// never: every such read or renewal then waits for a quorum round
    /// (ReadIndex). The runtime hands this age to openraft, which compares it
    /// with its quorum-acknowledged send time inside its core, atomically with
    /// taking the read's log position.
    pub fn leader_lease_usable_us(&self, leader_lease_ms: u64) -> u64 {
        let drift2 = self.max_clock_drift_ppm.saturating_mul(2).min(PPM);
        let slow = mul_ppm_floor(leader_lease_ms.saturating_mul(1000), PPM - drift2);
        slow.saturating_sub(self.lease_margin_ms.saturating_mul(1000))
    }

    /// How often a holder renews: a quarter of the TTL. The holder's slack
    /// when the Raft leader dies just before a renewal is
    /// `valid - lead - interval` (about 640 ms for a one-second lease): the
    /// new leader must be elected and found within it, so the interval is
    /// kept short. Two renewals in a row may fail before the lease is in
    /// danger.
    pub fn renew_interval_ms(&self, ttl_ms: u64) -> u64 {
        (ttl_ms / 4).max(1)
    }

    /// How long before its deadline a holder signals the loss of its lease.
    ///
    /// A process cannot promise to wake up exactly at a deadline, so the
    /// keeper announces the loss early by this lead: 5% of the valid time, at
    /// least 10 ms, and never more than the valid time itself.
    pub fn loss_signal_lead_ms(&self, ttl_ms: u64) -> u64 {
        let valid = self.holder_valid_for_ms(ttl_ms);
        (valid / 20).max(10).min(valid)
    }
}

fn mul_ppm_floor(value: u64, ppm: u64) -> u64 {
    let product = u128::from(value) * u128::from(ppm) / u128::from(PPM);
    u64::try_from(product).unwrap_or(u64::MAX)
}

fn mul_ppm_ceil(value: u64, ppm: u64) -> u64 {
    let product = (u128::from(value) * u128::from(ppm)).div_ceil(u128::from(PPM));
    u64::try_from(product).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_numbers_for_a_one_second_lease() {
        let t = LeaseTiming::default();
        assert_eq!(t.holder_valid_for_ms(1000), 940);
        assert_eq!(t.grant_delay_ms(1000), 1060);
        assert_eq!(t.holder_deadline_ms(5_000, 1000), 5_940);
        assert_eq!(t.grantable_at_ms(5_000, 1000), 6_060);
        assert_eq!(t.renew_interval_ms(1000), 250);
        assert_eq!(t.loss_signal_lead_ms(1000), 47);
    }

    #[test]
    fn leader_lease_defaults() {
        let t = LeaseTiming::default();
        // 150 ms * (1 - 2%) - 50 ms.
        assert_eq!(t.leader_lease_usable_us(150), 97_000);
        // A margin as long as the lease leaves nothing: always a quorum round.
        let t = LeaseTiming { lease_margin_ms: 150, ..t };
        assert_eq!(t.leader_lease_usable_us(150), 0);
    }

    #[test]
    fn the_test_only_switch_removes_the_wait() {
        let t = LeaseTiming { test_only_skip_wait: true, ..LeaseTiming::default() };
        assert_eq!(t.grant_delay_ms(1000), 0);
        assert_eq!(t.grantable_at_ms(5_000, 1000), 5_000);
        assert_eq!(t.holder_valid_for_ms(1000), 940, "the holder side is unchanged");
    }

    #[test]
    fn too_short_ttl_is_refused() {
        let t = LeaseTiming::default();
        assert_eq!(t.check_ttl(50), Err(TimingError::TtlTooShort { ttl_ms: 50 }));
        assert!(t.check_ttl(60).is_ok());
        assert!(
            LeaseTiming { max_clock_drift_ppm: 500_000, lease_margin_ms: 0, test_only_skip_wait: false }
                .validate()
                .is_err()
        );
    }

    proptest! {
        /// The safety argument in integers: with both clocks off by at most
        /// `drift` in rate, the holder's validity (at most `valid / (1 - d)` of
        /// real time) ends no later than the grantor's wait (at least
        /// `delay / (1 + d)` of real time), which also starts later.
        #[test]
        fn holder_validity_ends_before_grantor_wait(
            ttl in 1u64..10_000_000,
            drift in 0u64..499_999,
            margin in 0u64..10_000,
        ) {
            let t = LeaseTiming { max_clock_drift_ppm: drift, lease_margin_ms: margin, test_only_skip_wait: false };
            let valid = u128::from(t.holder_valid_for_ms(ttl));
            let delay = u128::from(t.grant_delay_ms(ttl));
            let ppm = u128::from(PPM);
            let d = u128::from(drift);
            prop_assert!(valid * (ppm + d) <= delay * (ppm - d));
            prop_assert!(t.holder_valid_for_ms(ttl) < t.grant_delay_ms(ttl));
        }

        /// The leader lease in integers: an age the leader measures below
        /// the usable age, with the leader's clock up to `drift` slow and a
        /// follower's up to `drift` fast, is less than the lease on the
        /// follower's clock, which refuses votes for that long:
        /// `usable * (1 + d) < lease * (1 - d)`.
        #[test]
        fn leader_lease_ends_before_followers_vote(
            lease_ms in 1u64..100_000,
            drift in 0u64..499_999,
            margin in 0u64..1_000,
        ) {
            let t = LeaseTiming { max_clock_drift_ppm: drift, lease_margin_ms: margin, test_only_skip_wait: false };
            let usable = u128::from(t.leader_lease_usable_us(lease_ms));
            let ppm = u128::from(PPM);
            let d = u128::from(drift);
            let lease_us = u128::from(lease_ms) * 1000;
            prop_assert!(usable * (ppm + d) <= lease_us * (ppm - d));
            prop_assert!(usable < lease_us);
        }

        /// The loss signal always comes before the deadline (or at the send
        /// time when there is no valid time at all), and renewals come well
        /// before the signal for any TTL that passes `check_ttl` with room.
        #[test]
        fn loss_signal_precedes_deadline(ttl in 1u64..10_000_000, margin in 0u64..1_000) {
            let t = LeaseTiming { max_clock_drift_ppm: 10_000, lease_margin_ms: margin, test_only_skip_wait: false };
            let valid = t.holder_valid_for_ms(ttl);
            let lead = t.loss_signal_lead_ms(ttl);
            prop_assert!(lead <= valid);
            if valid > 0 {
                prop_assert!(lead > 0);
            }
            if t.holder_valid_for_ms(ttl) >= 2 * t.renew_interval_ms(ttl) + lead {
                prop_assert!(t.renew_interval_ms(ttl) < valid - lead);
            }
        }
    }
}

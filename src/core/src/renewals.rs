//! Renewals without a log entry each: the leader's ledger of renewals it
//! confirmed and has not logged yet.
//!
//! A renewal only moves a lease's deadline forward, and a new Raft leader
//! restarts every held lease's TTL on its own clock anyway (the machine's
//! clock rebase): what a renewal must not do is reach a holder after the
//! lease could have gone to somebody else. So the leader confirms a renewal
//! without writing it to the log when all of this holds (the runtime does
//! the I/O; this module decides):
//!
//! 1. it takes `t_recv` on its own clock when the renewal arrives (after the
//!    holder's `t_send`), on the machine's current clock base;
//! 2. it then confirms its leadership after `t_recv`, either by its Raft
//!    leader lease (a quorum acknowledged a heartbeat sent at `t_ack`, and
//!    `now - t_ack` is below the lease shortened for drift and margin,
//!    [`crate::lease::LeaseTiming::leader_lease_usable_us`]) or by a quorum
//!    round that starts after `t_recv` (a ReadIndex round; concurrent
//!    renewals share it); the check below reads the machine as applied
//!    then, which may lag entries already proposed or committed (the
//!    runtime's lease fast path does not wait for them; the property test
//!    confirms renewals against a machine with entries still in flight);
//! 3. it checks the renewal against the applied machine at `t_recv`, counting
//!    its own earlier unlogged confirmations ([`Machine::check_renewal`]),
//!    and records `t_recv` here ([`RenewalLedger::renew`]);
//! 4. it never proposes a grant of that lease to anybody else before
//!    `t_recv + ttl * (1 + drift) + margin` ([`RenewalLedger::grant_wait_ms`]
//!    answers how long to wait).
//!
//! **Why no two holders act at once.** A grant to someone else comes either
//! from this leader, which waits as in 4, or from a later leader. A later
//! leader was elected by a majority of voters; the quorum round of 2 was
//! acknowledged by a majority in this leader's term; the two majorities
//! share a voter, which acknowledged before it voted (a voter that voted in
//! a newer term refuses the older term's heartbeats). With the leader lease
//! instead, that shared voter refuses every vote until the lease has run
//! out on its own clock, which (drift and margin absorbed) is after the
//! check of 2, itself after `t_recv`. Either way the later leader's
//! first entry, where the machine restarts every held lease's TTL, is
//! stamped after `t_recv` in real time, and it grants the lease only a full
//! `ttl * (1 + drift) + margin` after that: after the holder's validity
//! `t_send + ttl * (1 - drift) - margin` has run out, as for a logged
//! renewal. A renewal confirmed by a deposed leader never gets past 2. A
//! grant by this leader is proposed only after 4's wait, and the machine
//! refuses it at apply unless the lease's logged time is past too; a
//! confirmation while that Acquire is in flight needs the lease unexpired
//! at its receipt, which the Acquire's earlier stamp already found expired
//! (or found free, when the lease was granted in between: then the machine
//! sees that grant's time and holds the Acquire back).
//!
//! Grants, releases and every other change stay durable log entries. The
//! ledger is written to the log in batches ([`RenewalLedger::take_flush`],
//! `Op::Renewed` at each renewal's `t_recv`) so that the replicated lease,
//! which followers, watchers and elections read, keeps up with its holder;
//! a flush is bookkeeping, never what makes a renewal safe.
//!
//! The property test `no_overlap_with_unlogged_renewals` replays random
//! interleavings of grants, logged and unlogged renewals, flushes, releases
//! and leader changes against the same no-overlap check as the machine's.

use std::collections::BTreeMap;

use crate::lease::LeaseTiming;
use crate::machine::{ClockBase, LeaseView, Machine, Op, Rejection};

/// What to do with a renewal the leader received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewDecision {
    /// Confirmed without a log entry: answer the holder with this lease.
    Confirmed(LeaseView),
    /// Write it to the log (`Op::Renew`): the machine's clock is not this
    /// leader's (its first entry is not applied yet), or the ledger is full.
    Durable,
    /// Refused, as the machine would refuse a logged renewal.
    Rejected(Rejection),
}

/// A renewal confirmed and not (known to be) logged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Confirmed {
    holder: String,
    epoch: u64,
    at_ms: u64,
    /// Taken by a flush since `at_ms` was last raised.
    flushed: bool,
}

/// The leader's unlogged renewals and its grants in flight. Pure: time is
/// passed in, on the machine's clock (the leader's own).
#[derive(Debug, Clone)]
pub struct RenewalLedger {
    /// The clock the confirmations are on; a different clock base in the
    /// machine (a leader change) makes them meaningless, and the machine's
    /// rebase already covers them.
    base: Option<ClockBase>,
    confirmed: BTreeMap<String, Confirmed>,
    /// The most groups with unlogged renewals; past it renewals are logged.
    max_groups: usize,
}

impl RenewalLedger {
    /// An empty ledger keeping at most `max_groups` groups' confirmations.
    pub fn new(max_groups: usize) -> Self {
        Self { base: None, confirmed: BTreeMap::new(), max_groups }
    }

    /// Forgets confirmations made on another clock than the machine's.
    fn follow_clock(&mut self, m: &Machine) -> Option<ClockBase> {
        let base = m.clock().map(|(b, _)| b);
        if self.base != base {
            self.confirmed.clear();
            self.base = base;
        }
        base
    }

    /// The unlogged confirmation of `group`'s current grant, if any.
    fn confirmed_at(&self, m: &Machine, group: &str) -> Option<u64> {
        let (holder, epoch) = m.lease_holder(group)?;
        self.confirmed.get(group).filter(|c| c.holder == holder && c.epoch == epoch).map(|c| c.at_ms)
    }

    /// Decides a renewal received at `t_recv_ms` on the clock `base`, after
    /// the leader's quorum round (step 2 of the module's protocol) and
    /// against the machine applied up to it.
    pub fn renew(
        &mut self,
        m: &Machine,
        base: ClockBase,
        t_recv_ms: u64,
        group: &str,
        holder: &str,
        epoch: u64,
    ) -> RenewDecision {
        if self.follow_clock(m) != Some(base) {
            return RenewDecision::Durable;
        }
        if self.confirmed.len() >= self.max_groups && !self.confirmed.contains_key(group) {
            return RenewDecision::Durable;
        }
        if let Err(r) = m.check_renewal(group, holder, epoch, t_recv_ms, self.confirmed_at(m, group)) {
            return RenewDecision::Rejected(r);
        }
        let entry = self.confirmed.entry(group.to_owned()).or_insert_with(|| Confirmed {
            holder: holder.to_owned(),
            epoch,
            at_ms: t_recv_ms,
            flushed: false,
        });
        if entry.holder != holder || entry.epoch != epoch {
            *entry = Confirmed { holder: holder.to_owned(), epoch, at_ms: t_recv_ms, flushed: false };
        } else if t_recv_ms > entry.at_ms {
            entry.at_ms = t_recv_ms;
            entry.flushed = false;
        }
        RenewDecision::Confirmed(m.lease_renewed_at(group, t_recv_ms))
    }

    /// When `group`'s lease may be granted to someone other than its
    /// holder, counting unlogged confirmations; `None` when free.
    pub fn grantable_at_ms(&mut self, m: &Machine, group: &str, timing: LeaseTiming) -> Option<u64> {
        self.follow_clock(m);
        m.grantable_at_ms_with(group, timing, self.confirmed_at(m, group))
    }

    /// Before proposing an Acquire of `group`'s lease by `holder` at
    /// `now`: `Some(ms)` while somebody else holds it and it may not be
    /// granted for another `ms`, counting unlogged confirmations. The
    /// machine checks the Acquire again when it applies; a confirmation
    /// made while the Acquire is in flight cannot be for a lease the
    /// machine would give away: the Acquire's stamp is no later than its
    /// apply, and a confirmation needs the lease unexpired at its receipt
    /// (the property test covers those interleavings).
    pub fn grant_wait_ms(
        &mut self,
        m: &Machine,
        now: u64,
        group: &str,
        holder: &str,
        timing: LeaseTiming,
    ) -> Option<u64> {
        let (current, _) = m.lease_holder(group)?;
        if current == holder {
            return None;
        }
        self.grantable_at_ms(m, group, timing).filter(|at| *at > now).map(|at| at - now)
    }

    /// Up to `max` confirmations not flushed yet, as `Op::Renewed` to log;
    /// drops confirmations of grants that are over. Taken ones are marked
    /// flushed (a later confirmation marks its group again).
    pub fn take_flush(&mut self, m: &Machine, max: usize) -> Vec<Op> {
        self.follow_clock(m);
        self.confirmed.retain(|g, c| m.lease_holder(g) == Some((c.holder.as_str(), c.epoch)));
        let mut ops = Vec::new();
        for (group, c) in self.confirmed.iter_mut().filter(|(_, c)| !c.flushed).take(max) {
            c.flushed = true;
            ops.push(Op::Renewed { group: group.clone(), holder: c.holder.clone(), epoch: c.epoch, at_ms: c.at_ms });
        }
        ops
    }

    /// Groups with confirmations held here.
    pub fn len(&self) -> usize {
        self.confirmed.len()
    }

    /// Whether no confirmation is held.
    pub fn is_empty(&self) -> bool {
        self.confirmed.is_empty()
    }
}

#[cfg(test)]
mod tests;

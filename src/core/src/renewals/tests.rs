use std::collections::{BTreeSet, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::machine::{Command, LeaderStamp, LogPosition, Outcome};

const GROUPS: [&str; 2] = ["g0", "g1"];
const HOLDERS: [&str; 3] = ["h0", "h1", "h2"];

fn timing() -> LeaseTiming {
    LeaseTiming::default()
}

/// One entry proposed and not applied yet.
#[derive(Debug)]
struct Inflight {
    term: u64,
    leader: u64,
    stamp: LeaderStamp,
    op: Op,
    /// Real time of the proposal (the holder sent its request before it).
    sent_real: u64,
}

/// A leader with its ledger, a log of entries in flight and the real-time
/// no-overlap check of `machine::tests`, under leader changes that commit
/// or lose what was in flight.
struct Sim {
    m: Machine,
    ledger: RenewalLedger,
    real: u64,
    term: u64,
    leader: u64,
    offset: u64,
    index: u64,
    queue: VecDeque<Inflight>,
    /// Per group: (holder, epoch, real time until which the holder may act).
    valid: [Option<(String, u64, u64)>; 2],
    /// Grants whose holder released (and so stopped renewing).
    stopped: BTreeSet<(String, u64)>,
    confirmed: usize,
}

impl Sim {
    fn new() -> Self {
        let mut s = Self {
            m: Machine::new(),
            ledger: RenewalLedger::new(64),
            real: 0,
            term: 1,
            leader: 1,
            offset: 1_000,
            index: 0,
            queue: VecDeque::new(),
            valid: [None, None],
            stopped: BTreeSet::new(),
            confirmed: 0,
        };
        s.propose(Op::LeaderStart);
        s
    }

    fn now(&self) -> u64 {
        self.real + self.offset
    }

    /// The machine's clock base when it is the current leader's.
    fn own_base(&self) -> Option<ClockBase> {
        self.m.clock().map(|(b, _)| b).filter(|b| b.term == self.term && b.node_id == self.leader)
    }

    fn propose(&mut self, op: Op) {
        let stamp =
            LeaderStamp { node_id: self.leader, boot_id: self.term, now_ms: self.now(), timing: timing(), wall_ms: 0 };
        self.queue.push_back(Inflight { term: self.term, leader: self.leader, stamp, op, sent_real: self.real });
    }

    fn apply_front(&mut self) {
        let Some(e) = self.queue.pop_front() else { return };
        self.index += 1;
        let pos = LogPosition { index: self.index, term: e.term, leader_node_id: e.leader };
        let applied = self.m.apply(pos, &Command { stamp: e.stamp, op: e.op.clone() });
        match (&e.op, &applied.outcome) {
            (Op::Acquire { group, holder, .. }, Outcome::Granted(v)) => {
                let g = GROUPS.iter().position(|x| x == group).unwrap();
                if let Some((prev_holder, prev_epoch, until)) = &self.valid[g] {
                    assert_eq!(v.epoch, prev_epoch + 1, "epochs go up by one per grant");
                    assert!(
                        prev_holder == holder || e.sent_real >= *until,
                        "{holder} granted {group} (proposed at {}) while {prev_holder} may act until {until}",
                        e.sent_real
                    );
                }
                self.valid[g] = Some((holder.clone(), v.epoch, e.sent_real + timing().holder_valid_for_ms(v.ttl_ms)));
            }
            (Op::Renew { group, holder, .. }, Outcome::Renewed(v)) => {
                let g = GROUPS.iter().position(|x| x == group).unwrap();
                let slot = self.valid[g].as_mut().expect("renewed a lease never granted");
                assert_eq!((slot.0.as_str(), slot.1), (holder.as_str(), v.epoch));
                // A holder that released since acts no more, whatever the
                // answer to a renewal it sent before.
                if !self.stopped.contains(&(holder.clone(), v.epoch)) {
                    slot.2 = slot.2.max(e.sent_real + timing().holder_valid_for_ms(v.ttl_ms));
                }
            }
            _ => {}
        }
    }

    fn step(&mut self, s: &Step) {
        match *s {
            Step::Advance(ms) => self.real += ms,
            Step::Commit(n) => {
                for _ in 0..n {
                    self.apply_front();
                }
            }
            Step::NewLeader { offset, commit } => {
                // The new leader commits the first `commit` entries in
                // flight (before its own first entry); the rest are lost.
                let keep = commit.min(self.queue.len());
                for _ in 0..keep {
                    self.apply_front();
                }
                self.queue.clear();
                self.term += 1;
                self.leader = self.leader % 3 + 1;
                self.offset = offset;
                // Another process: its ledger is its own.
                self.ledger = RenewalLedger::new(64);
                self.propose(Op::LeaderStart);
            }
            Step::Acquire { group, holder, ttl_ms } => {
                let (g, h) = (GROUPS[group], HOLDERS[holder]);
                // Before its first entry is applied the leader has no
                // confirmations and the machine alone decides.
                let wait = match self.own_base() {
                    Some(_) => self.ledger.grant_wait_ms(&self.m, self.now(), g, h, timing()),
                    None => None,
                };
                if wait.is_none() {
                    self.propose(Op::Acquire { group: g.into(), holder: h.into(), ttl_ms });
                }
            }
            Step::Renew { group, holder, epoch_delta } => {
                let (g, h) = (GROUPS[group], HOLDERS[holder]);
                let epoch = self
                    .m
                    .lease(g, crate::machine::ReaderClock::Unknown)
                    .epoch
                    .saturating_add_signed(epoch_delta.into());
                if self.stopped.contains(&(h.to_owned(), epoch)) {
                    return;
                }
                let Some(base) = self.own_base() else {
                    self.propose(Op::Renew { group: g.into(), holder: h.into(), epoch });
                    return;
                };
                // Received now; the quorum round succeeds (a leader change
                // is a step of its own, so none happens in between).
                match self.ledger.renew(&self.m, base, self.now(), g, h, epoch) {
                    RenewDecision::Confirmed(v) => {
                        self.confirmed += 1;
                        let slot = self.valid[group].as_mut().expect("confirmed a lease never granted");
                        assert_eq!((slot.0.as_str(), slot.1), (h, epoch), "confirmed for the current grant only");
                        assert_eq!(v.epoch, epoch);
                        slot.2 = slot.2.max(self.real + timing().holder_valid_for_ms(v.ttl_ms));
                    }
                    RenewDecision::Durable => self.propose(Op::Renew { group: g.into(), holder: h.into(), epoch }),
                    RenewDecision::Rejected(_) => {}
                }
            }
            Step::Release { group, holder } => {
                let (g, h) = (GROUPS[group], HOLDERS[holder]);
                let Some((current, epoch)) = self.m.lease_holder(g).map(|(c, e)| (c.to_owned(), e)) else { return };
                if current != h {
                    return;
                }
                // The holder stops acting before it sends the release.
                if let Some(slot) = self.valid[group].as_mut().filter(|s| s.0 == h && s.1 == epoch) {
                    slot.2 = slot.2.min(self.real);
                }
                self.stopped.insert((h.to_owned(), epoch));
                self.propose(Op::Release { group: g.into(), holder: h.into(), epoch });
            }
            Step::Flush => {
                if self.own_base().is_some() {
                    let ops = self.ledger.take_flush(&self.m, 8);
                    if !ops.is_empty() {
                        self.propose(Op::Batch(ops));
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Advance(u64),
    Commit(usize),
    NewLeader { offset: u64, commit: usize },
    Acquire { group: usize, holder: usize, ttl_ms: u64 },
    Renew { group: usize, holder: usize, epoch_delta: i8 },
    Release { group: usize, holder: usize },
    Flush,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u64..400).prop_map(Step::Advance),
        3 => (1usize..4).prop_map(Step::Commit),
        1 => (0u64..100_000, 0usize..4).prop_map(|(offset, commit)| Step::NewLeader { offset, commit }),
        2 => (0usize..2, 0usize..3, 500u64..2_000).prop_map(|(group, holder, ttl_ms)| Step::Acquire { group, holder, ttl_ms }),
        5 => (0usize..2, 0usize..3, -1i8..=0).prop_map(|(group, holder, epoch_delta)| Step::Renew { group, holder, epoch_delta }),
        1 => (0usize..2, 0usize..3).prop_map(|(group, holder)| Step::Release { group, holder }),
        2 => Just(Step::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// No two holders may act at once when renewals are confirmed without a
    /// log entry, whatever the interleaving of grants in flight, flushes,
    /// releases and leader changes that commit or lose entries in flight.
    #[test]
    fn no_overlap_with_unlogged_renewals(steps in prop::collection::vec(step(), 1..200)) {
        let mut sim = Sim::new();
        for s in &steps {
            sim.step(s);
        }
        while !sim.queue.is_empty() {
            sim.apply_front();
        }
    }
}

/// A leader on its own clock, group `g` granted to `a` at epoch 1 (ttl 1000)
/// at leader time 100.
fn granted() -> (Machine, ClockBase) {
    let mut m = Machine::new();
    let stamp = |now_ms| LeaderStamp { node_id: 1, boot_id: 1, now_ms, timing: timing(), wall_ms: 0 };
    let pos = |index| LogPosition { index, term: 1, leader_node_id: 1 };
    m.apply(pos(1), &Command { stamp: stamp(0), op: Op::LeaderStart });
    let acquire = Op::Acquire { group: "g".into(), holder: "a".into(), ttl_ms: 1_000 };
    assert!(matches!(m.apply(pos(2), &Command { stamp: stamp(100), op: acquire }).outcome, Outcome::Granted(_)));
    let base = m.clock().unwrap().0;
    (m, base)
}

#[test]
fn a_grant_to_someone_else_waits_for_unlogged_renewals() {
    let (m, base) = granted();
    let mut l = RenewalLedger::new(8);
    assert!(matches!(l.renew(&m, base, 900, "g", "a", 1), RenewDecision::Confirmed(v) if v.remaining_ms == 1_000));
    // Logged alone, the lease could go at 100 + 1010 + 50; counting the
    // confirmation at 900, not before 900 + 1060.
    assert_eq!(m.grantable_at_ms("g", timing()), Some(1_160));
    assert_eq!(l.grantable_at_ms(&m, "g", timing()), Some(1_960));
    assert_eq!(l.grant_wait_ms(&m, 1_500, "g", "b", timing()), Some(460));
    assert_eq!(l.grant_wait_ms(&m, 1_960, "g", "b", timing()), None);
    assert_eq!(l.grant_wait_ms(&m, 1_500, "g", "a", timing()), None, "the holder itself may re-acquire");
}

#[test]
fn renewals_are_checked_as_the_machine_checks_them() {
    let (m, base) = granted();
    let mut l = RenewalLedger::new(8);
    assert!(matches!(l.renew(&m, base, 300, "g", "a", 0), RenewDecision::Rejected(Rejection::NotHolder { .. })));
    assert!(matches!(l.renew(&m, base, 300, "g", "b", 1), RenewDecision::Rejected(Rejection::NotHolder { .. })));
    assert!(matches!(l.renew(&m, base, 1_100, "g", "a", 1), RenewDecision::Rejected(Rejection::Expired { .. })));
    // Each confirmation extends from its own time.
    assert!(matches!(l.renew(&m, base, 1_000, "g", "a", 1), RenewDecision::Confirmed(_)));
    assert!(matches!(l.renew(&m, base, 1_900, "g", "a", 1), RenewDecision::Confirmed(_)));
    assert!(matches!(l.renew(&m, base, 2_900, "g", "a", 1), RenewDecision::Rejected(Rejection::Expired { .. })));
    // Not on this leader's clock: logged.
    let other = ClockBase { term: 2, ..base };
    assert_eq!(l.renew(&m, other, 1_000, "g", "a", 1), RenewDecision::Durable);
}

#[test]
fn flushes_log_each_confirmation_once_at_its_time() {
    let (mut m, base) = granted();
    let mut l = RenewalLedger::new(1);
    assert!(matches!(l.renew(&m, base, 400, "g", "a", 1), RenewDecision::Confirmed(_)));
    assert!(matches!(l.renew(&m, base, 600, "g", "a", 1), RenewDecision::Confirmed(_)));
    let ops = l.take_flush(&m, 8);
    assert_eq!(ops, vec![Op::Renewed { group: "g".into(), holder: "a".into(), epoch: 1, at_ms: 600 }]);
    assert!(l.take_flush(&m, 8).is_empty(), "flushed once");
    let stamp = LeaderStamp { node_id: 1, boot_id: 1, now_ms: 700, timing: timing(), wall_ms: 0 };
    let pos = LogPosition { index: 3, term: 1, leader_node_id: 1 };
    m.apply(pos, &Command { stamp, op: Op::Batch(ops) });
    assert_eq!(m.grantable_at_ms("g", timing()), Some(600 + 1_060));
    // Full: another group's renewals are logged.
    assert_eq!(l.renew(&m, base, 650, "h", "a", 1), RenewDecision::Durable);
    assert_eq!(l.len(), 1);
}

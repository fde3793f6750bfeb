//! Election decisions, and the state machine's election rules.

use proptest::prelude::*;

use super::*;
use crate::group::{FailoverPolicy, MemberSpec, Policy};
use crate::lease::LeaseTiming;
use crate::machine::{Command, LeaderStamp, LogPosition, Machine, Op, Outcome, ReaderClock, Rejection};
use crate::matrix::{GroupState, Observer};
use crate::observe::{ObsState, Observation, Reason};
use crate::verdict::verdict;

const COORDS: [u64; 3] = [1, 2, 3];

fn spec(priorities: &[u32]) -> GroupSpec {
    GroupSpec {
        name: "db".into(),
        members: priorities
            .iter()
            .enumerate()
            .map(|(i, p)| MemberSpec {
                id: format!("db-{}", i + 1),
                heartbeat: format!("redis://h:{}", 7000 + i),
                priority: *p,
                data: Some(format!("redis://h:{}", 8000 + i)),
                announce: None,
            })
            .collect(),
        policy: Policy::default(),
        failover: Some(FailoverPolicy::default()),
    }
}

fn status(offset: u64, synced: Option<u64>) -> MemberStatus {
    MemberStatus { role: Role::Replica, offset, link_up: true, synced_epoch: synced, healthy: true, error: None }
}

/// A group whose members `down` are lost by every observer, everyone else
/// seen by everyone, all views fresh at `now`.
fn group_with(priorities: &[u32], down: &[usize], now: u64) -> GroupState {
    let s = spec(priorities);
    let mut g = GroupState::new(s.clone(), 1);
    g.ensure_designation(1, 0);
    let mut observers: Vec<Observer> = s.members.iter().map(|m| Observer::Member(m.id.clone())).collect();
    observers.extend(COORDS.iter().map(|c| Observer::Coordinator(*c)));
    for o in observers {
        let cells: Vec<(String, Observation)> = s
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| o != Observer::Member(m.id.clone()))
            .map(|(i, m)| {
                let st = if down.contains(&i) { ObsState::Down } else { ObsState::Up };
                let obs = Observation {
                    state: st,
                    reason: Reason::Missing,
                    state_age_ms: 0,
                    incarnation: None,
                    seq: None,
                    restarts: 0,
                };
                (m.id.clone(), obs)
            })
            .collect();
        g.report(o, 1, &cells, now, 2);
    }
    g
}

fn decide_at(g: &GroupState, now: u64, term_age_ms: u64) -> Decision {
    let v = verdict(g, &COORDS, now);
    decide(DecisionInput {
        spec: &g.spec,
        election: &g.election,
        statuses: &g.statuses,
        verdict: &v,
        now_ms: now,
        term_age_ms,
    })
}

const SETTLED: u64 = 60_000;

#[test]
fn a_healthy_primary_is_kept() {
    let mut g = group_with(&[100, 100], &[], 1_000);
    g.statuses.insert("db-2".into(), status(10, Some(1)));
    assert_eq!(g.election.designated.as_deref(), Some("db-1"));
    assert_eq!(decide_at(&g, 1_000, SETTLED), Decision::Keep);
}

#[test]
fn a_down_primary_is_replaced_by_the_best_eligible_candidate() {
    let mut g = group_with(&[100, 50, 100, 100], &[0], 1_000);
    g.statuses.insert("db-1".into(), status(1_000, Some(1)));
    g.statuses.insert("db-2".into(), status(1_000, Some(1)));
    g.statuses.insert("db-3".into(), status(900, Some(1)));
    g.statuses.insert("db-4".into(), status(990, Some(1)));
    match decide_at(&g, 1_000, SETTLED) {
        Decision::Designate { kind, from, to, reason, evidence } => {
            assert_eq!(kind, MoveKind::Failover);
            assert_eq!(from.as_deref(), Some("db-1"));
            // db-2 has the most data but a lower priority; db-4 beats db-3 on data.
            assert_eq!(to, "db-4");
            assert!(reason.starts_with("db-1 is DOWN"), "{reason}");
            assert!(evidence.iter().any(|e| e.starts_with("candidate db-4: eligible")), "{evidence:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_guard_blocks_a_failover() {
    let base = || {
        let mut g = group_with(&[100, 100], &[0], 100_000);
        g.statuses.insert("db-1".into(), status(5_000, Some(1)));
        g.statuses.insert("db-2".into(), status(5_000, Some(1)));
        g
    };
    let reason = |d: Decision| match d {
        Decision::Blocked { reason, .. } => reason,
        other => panic!("not blocked: {other:?}"),
    };
    let mut g = base();
    g.election.maintenance = true;
    assert!(reason(decide_at(&g, 100_000, SETTLED)).contains("maintenance"));

    let g = base();
    assert!(reason(decide_at(&g, 100_000, 500)).contains("in office 500 ms"));

    let mut g = base();
    g.election.last_failover_ms = Some(90_000);
    assert!(reason(decide_at(&g, 100_000, SETTLED)).contains("min_failover_interval_ms"));

    let mut g = base();
    g.statuses.insert("db-1".into(), status(5_000 + (2 << 20), Some(1)));
    let d = decide_at(&g, 100_000, SETTLED);
    let Decision::Blocked { candidates, .. } = &d else { panic!("{d:?}") };
    assert!(candidates[0].why_not.as_deref().unwrap().starts_with("it lags by"), "{candidates:?}");

    let mut g = base();
    g.statuses.insert("db-2".into(), status(5_000, None));
    let d = decide_at(&g, 100_000, SETTLED);
    let Decision::Blocked { candidates, .. } = &d else { panic!("{d:?}") };
    assert!(candidates[0].why_not.as_deref().unwrap().contains("never synced"), "{candidates:?}");

    let mut g = base();
    g.statuses.remove("db-2");
    assert!(matches!(decide_at(&g, 100_000, SETTLED), Decision::Blocked { .. }));

    // The candidate itself is down too.
    let mut g = group_with(&[100, 100], &[0, 1], 100_000);
    g.statuses.insert("db-2".into(), status(5_000, Some(1)));
    assert!(reason(decide_at(&g, 100_000, SETTLED)).contains("no member is eligible"));

    // Priority 0 never.
    let mut g = group_with(&[100, 0], &[0], 100_000);
    g.statuses.insert("db-2".into(), status(5_000, Some(1)));
    assert!(matches!(decide_at(&g, 100_000, SETTLED), Decision::Blocked { .. }));
}

#[test]
fn a_down_replica_claiming_more_data_than_the_primary_blocks_nothing() {
    // db-1 (primary) and db-3 are down; db-3 last claimed 2^64 - 1 bytes.
    let mut g = group_with(&[100, 100, 100], &[0, 2], 100_000);
    g.statuses.insert("db-1".into(), status(5_000, Some(1)));
    g.statuses.insert("db-2".into(), status(5_000, Some(1)));
    g.statuses.insert("db-3".into(), status(u64::MAX, Some(1)));
    match decide_at(&g, 100_000, SETTLED) {
        Decision::Designate { to, .. } => assert_eq!(to, "db-2"),
        other => panic!("a down replica's claim blocked the failover: {other:?}"),
    }
    // The down primary's own offset still counts: db-2 lags it.
    g.statuses.insert("db-1".into(), status(5_000 + (2 << 20), Some(1)));
    assert!(matches!(decide_at(&g, 100_000, SETTLED), Decision::Blocked { .. }));
    // A member seen up that claims more counts too (it is the best
    // candidate; see the README's threat model).
    let mut g = group_with(&[100, 100, 100], &[0], 100_000);
    g.statuses.insert("db-1".into(), status(5_000, Some(1)));
    g.statuses.insert("db-2".into(), status(5_000, Some(1)));
    g.statuses.insert("db-3".into(), status(u64::MAX, Some(1)));
    match decide_at(&g, 100_000, SETTLED) {
        Decision::Designate { to, .. } => assert_eq!(to, "db-3"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_partial_primary_is_not_replaced() {
    // One cut link: db-2 loses db-1, everyone else sees it.
    let mut g = group_with(&[100, 100], &[], 1_000);
    let obs = Observation {
        state: ObsState::Down,
        reason: Reason::Missing,
        state_age_ms: 0,
        incarnation: None,
        seq: None,
        restarts: 0,
    };
    g.report(Observer::Member("db-2".into()), 1, &[("db-1".into(), obs)], 1_000, 3);
    g.statuses.insert("db-2".into(), status(10, Some(1)));
    assert_eq!(decide_at(&g, 1_000, SETTLED), Decision::Keep);
}

fn stamp(now_ms: u64) -> LeaderStamp {
    LeaderStamp { node_id: 1, boot_id: 1, now_ms, timing: LeaseTiming::default(), wall_ms: 0 }
}

fn run(m: &mut Machine, index: u64, now: u64, op: Op) -> Outcome {
    m.apply(LogPosition { index, term: 1, leader_node_id: 1 }, &Command { stamp: stamp(now), op }).outcome
}

fn acquire(holder: &str) -> Op {
    Op::Acquire { group: "db".into(), holder: holder.into(), ttl_ms: 1_000 }
}

#[test]
fn only_the_designated_member_holds_the_lease_and_history_records_epochs() {
    let mut m = Machine::new();
    run(&mut m, 1, 0, Op::ApplyGroup { spec: spec(&[100, 100]) });
    assert!(matches!(run(&mut m, 2, 0, acquire("db-2")), Outcome::Rejected(Rejection::NotDesignated { .. })));
    assert!(matches!(run(&mut m, 3, 0, acquire("db-1")), Outcome::Granted(_)));
    let designate = |from: &str, to: &str| Op::Designate {
        group: "db".into(),
        kind: MoveKind::Failover,
        from: Some(from.into()),
        to: to.into(),
        reason: "test".into(),
        evidence: vec![],
    };
    // A stale decision is refused.
    assert!(matches!(
        run(&mut m, 4, 100, designate("db-2", "db-1")),
        Outcome::Rejected(Rejection::StaleDecision { .. })
    ));
    assert!(matches!(run(&mut m, 5, 100, designate("db-1", "db-2")), Outcome::ElectionChanged { .. }));
    // The deposed primary can no longer renew: it must fence itself.
    let renew = Op::Renew { group: "db".into(), holder: "db-1".into(), epoch: 1 };
    assert!(matches!(run(&mut m, 6, 200, renew), Outcome::Rejected(Rejection::NotDesignated { .. })));
    // The new designated member waits for the old lease to expire.
    assert!(matches!(run(&mut m, 7, 300, acquire("db-2")), Outcome::Held { .. }));
    assert!(matches!(run(&mut m, 8, 1_060, acquire("db-2")), Outcome::Granted(ref v) if v.epoch == 2));
    let g = m.group("db").unwrap();
    let h: Vec<(MoveKind, Option<u64>)> = g.election.history.iter().map(|e| (e.kind, e.epoch)).collect();
    assert_eq!(h, vec![(MoveKind::Initial, Some(1)), (MoveKind::Failover, Some(2))]);
    // Another automatic failover within the minimum interval is refused ...
    assert!(matches!(
        run(&mut m, 9, 2_000, designate("db-2", "db-1")),
        Outcome::Rejected(Rejection::FailoverBlocked { .. })
    ));
    // ... until an operator lifts the block.
    run(&mut m, 10, 2_000, Op::UnblockFailover { group: "db".into() });
    run(&mut m, 11, 2_000, Op::SetMaintenance { group: "db".into(), on: true });
    assert!(matches!(
        run(&mut m, 12, 2_000, designate("db-2", "db-1")),
        Outcome::Rejected(Rejection::InMaintenance { .. })
    ));
    run(&mut m, 13, 2_000, Op::SetMaintenance { group: "db".into(), on: false });
    assert!(matches!(run(&mut m, 14, 2_000, designate("db-2", "db-1")), Outcome::ElectionChanged { .. }));
}

#[test]
fn a_switchover_moves_the_designation_when_the_primary_releases() {
    let mut m = Machine::new();
    run(&mut m, 1, 0, Op::ApplyGroup { spec: spec(&[100, 100]) });
    run(&mut m, 2, 0, acquire("db-1"));
    assert!(matches!(
        run(&mut m, 3, 10, Op::Switchover { group: "db".into(), to: Some("db-1".into()) }),
        Outcome::Rejected(Rejection::InvalidTarget(_))
    ));
    run(&mut m, 4, 10, Op::Switchover { group: "db".into(), to: None });
    assert_eq!(m.group("db").unwrap().election.switchover.as_ref().map(|s| s.to.as_str()), Some("db-2"));
    run(&mut m, 5, 20, Op::Release { group: "db".into(), holder: "db-1".into(), epoch: 1 });
    let g = m.group("db").unwrap();
    assert_eq!(g.election.designated.as_deref(), Some("db-2"));
    assert!(g.election.switchover.is_none());
    // Released: the target takes over at once, with a new epoch.
    assert!(matches!(run(&mut m, 6, 21, acquire("db-2")), Outcome::Granted(ref v) if v.epoch == 2));
    assert_eq!(
        m.group("db").unwrap().election.history.back().map(|e| (e.kind, e.epoch)),
        Some((MoveKind::Switchover, Some(2)))
    );
}

#[test]
fn the_initial_primary_and_a_switchover_target_follow_the_one_ranking() {
    // Equal priorities, listed against name order: the name decides, not
    // the list.
    let mut s = spec(&[100, 100, 100]);
    s.members.reverse();
    let mut m = Machine::new();
    run(&mut m, 1, 0, Op::ApplyGroup { spec: s });
    assert_eq!(m.group("db").unwrap().election.designated.as_deref(), Some("db-1"));
    run(&mut m, 2, 10, Op::Switchover { group: "db".into(), to: None });
    assert_eq!(m.group("db").unwrap().election.switchover.as_ref().map(|s| s.to.as_str()), Some("db-2"));
}

// ---- property: designations never bypass the lease ---------------------------

#[derive(Debug, Clone)]
enum Step {
    Acquire(usize),
    Renew(usize),
    Release(usize),
    Designate(usize),
    Switchover(Option<usize>),
}

fn step() -> impl Strategy<Value = (u64, Step)> {
    let who = 0usize..3;
    (
        0u64..600,
        prop_oneof![
            who.clone().prop_map(Step::Acquire),
            who.clone().prop_map(Step::Renew),
            who.clone().prop_map(Step::Release),
            who.clone().prop_map(Step::Designate),
            prop::option::of(who).prop_map(Step::Switchover),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the sequence of designations, switchovers and lease calls,
    /// every grant goes to the designated member and no two members can act
    /// as primary at once.
    #[test]
    fn designations_never_bypass_the_lease(steps in prop::collection::vec(step(), 1..150)) {
        let mut m = Machine::new();
        let failover = FailoverPolicy { min_failover_interval_ms: 0, ..FailoverPolicy::default() };
        let mut s = spec(&[100, 100, 100]);
        s.failover = Some(failover);
        run(&mut m, 1, 0, Op::ApplyGroup { spec: s });
        let name = |i: usize| format!("db-{}", i + 1);
        let mut now = 0;
        // (holder, epoch, valid until) of the last grant, as in the lease test.
        let mut valid: Option<(String, u64, u64)> = None;
        let timing = LeaseTiming::default();
        for (i, (advance, st)) in steps.iter().enumerate() {
            now += advance;
            let index = i as u64 + 2;
            let epoch = m.lease("db", ReaderClock::Unknown).epoch;
            let designated = m.group("db").unwrap().election.designated.clone();
            let op = match st {
                Step::Acquire(h) => acquire(&name(*h)),
                Step::Renew(h) => Op::Renew { group: "db".into(), holder: name(*h), epoch },
                Step::Release(h) => Op::Release { group: "db".into(), holder: name(*h), epoch },
                Step::Designate(h) => Op::Designate {
                    group: "db".into(), kind: MoveKind::Failover, from: designated.clone(), to: name(*h),
                    reason: String::new(), evidence: vec![],
                },
                Step::Switchover(h) => Op::Switchover { group: "db".into(), to: h.map(name) },
            };
            match run(&mut m, index, now, op) {
                Outcome::Granted(v) => {
                    let holder = v.holder.clone().unwrap();
                    prop_assert_eq!(Some(&holder), designated.as_ref(), "granted to a member not designated");
                    if let Some((prev, _, until)) = &valid {
                        prop_assert!(prev == &holder || now >= *until, "{} granted at {} while {} valid until {}", holder, now, prev, until);
                    }
                    valid = Some((holder, v.epoch, now + timing.holder_valid_for_ms(v.ttl_ms)));
                }
                Outcome::Renewed(v) => {
                    let slot = valid.as_mut().unwrap();
                    prop_assert_eq!(Some(&slot.0), designated.as_ref());
                    slot.2 = now + timing.holder_valid_for_ms(v.ttl_ms);
                }
                Outcome::Released(_) => {
                    if let Some(slot) = valid.as_mut() { slot.2 = now; }
                }
                _ => {}
            }
        }
    }
}

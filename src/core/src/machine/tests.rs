//! Unit and property tests of the lease state machine.

use proptest::prelude::*;

use super::*;

const LEADER: u64 = 1;

fn stamp(now_ms: u64) -> LeaderStamp {
    LeaderStamp { node_id: LEADER, boot_id: 7, now_ms, timing: LeaseTiming::default(), wall_ms: 0 }
}

fn pos(index: u64) -> LogPosition {
    LogPosition { index, term: 1, leader_node_id: LEADER }
}

fn acquire(group: &str, holder: &str, ttl_ms: u64) -> Op {
    Op::Acquire { group: group.into(), holder: holder.into(), ttl_ms }
}

fn run(m: &mut Machine, index: u64, now_ms: u64, op: Op) -> Outcome {
    m.apply(pos(index), &Command { stamp: stamp(now_ms), op }).outcome
}

fn granted_epoch(o: &Outcome) -> u64 {
    match o {
        Outcome::Granted(v) => v.epoch,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[test]
fn first_acquire_gets_epoch_one_and_a_second_holder_waits() {
    let mut m = Machine::new();
    assert_eq!(granted_epoch(&run(&mut m, 1, 0, acquire("g", "a", 1000))), 1);
    match run(&mut m, 2, 500, acquire("g", "b", 1000)) {
        Outcome::Held { current, grantable_at_ms } => {
            assert_eq!(current.holder.as_deref(), Some("a"));
            assert_eq!(current.remaining_ms, 500);
            assert_eq!(grantable_at_ms, 1060);
        }
        other => panic!("{other:?}"),
    }
    // Expired but inside the drift margin: still not grantable.
    assert!(matches!(run(&mut m, 3, 1059, acquire("g", "b", 1000)), Outcome::Held { .. }));
    assert_eq!(m.lease("g", ReaderClock::Now(1030)).state, LeaseState::Expiring);
    assert_eq!(granted_epoch(&run(&mut m, 4, 1060, acquire("g", "b", 1000))), 2);
}

#[test]
fn renew_extends_and_checks_holder_and_epoch() {
    let mut m = Machine::new();
    run(&mut m, 1, 0, acquire("g", "a", 1000));
    assert!(matches!(
        run(&mut m, 2, 900, Op::Renew { group: "g".into(), holder: "a".into(), epoch: 1 }),
        Outcome::Renewed(_)
    ));
    assert!(matches!(run(&mut m, 3, 1500, acquire("g", "b", 1000)), Outcome::Held { .. }));
    let stale = run(&mut m, 4, 1600, Op::Renew { group: "g".into(), holder: "a".into(), epoch: 0 });
    assert_eq!(
        stale,
        Outcome::Rejected(Rejection::NotHolder {
            group: "g".into(),
            holder: "a".into(),
            epoch: 0,
            current: CurrentHolder { holder: Some("a".into()), epoch: 1 },
        })
    );
    let late = run(&mut m, 5, 1900, Op::Renew { group: "g".into(), holder: "a".into(), epoch: 1 });
    assert_eq!(late, Outcome::Rejected(Rejection::Expired { group: "g".into(), epoch: 1 }));
}

#[test]
fn release_frees_at_once_and_the_epoch_is_never_reused() {
    let mut m = Machine::new();
    run(&mut m, 1, 0, acquire("g", "a", 1000));
    assert!(matches!(
        run(&mut m, 2, 10, Op::Release { group: "g".into(), holder: "a".into(), epoch: 1 }),
        Outcome::Released(_)
    ));
    assert_eq!(m.lease("g", ReaderClock::Now(11)).holder, None);
    assert_eq!(m.lease("g", ReaderClock::Now(11)).epoch, 1);
    assert_eq!(granted_epoch(&run(&mut m, 3, 20, acquire("g", "b", 1000))), 2);
    // The same holder acquiring again gets a fresh epoch immediately.
    assert_eq!(granted_epoch(&run(&mut m, 4, 30, acquire("g", "b", 1000))), 3);
}

#[test]
fn a_new_leader_restarts_every_ttl_on_its_own_clock() {
    let mut m = Machine::new();
    run(&mut m, 1, 100_000, acquire("g", "a", 1000));
    // The new leader's clock reads a much larger number. Without the reset
    // the lease would look long expired.
    let new_leader =
        LeaderStamp { node_id: 2, boot_id: 9, now_ms: 900_000_000, timing: LeaseTiming::default(), wall_ms: 0 };
    let p = LogPosition { index: 2, term: 2, leader_node_id: 2 };
    let o = m.apply(p, &Command { stamp: new_leader, op: acquire("g", "b", 1000) }).outcome;
    assert!(matches!(o, Outcome::Held { grantable_at_ms: 900_001_060, .. }), "{o:?}");
    // A clock that reads *smaller* numbers is handled alike.
    let restarted = LeaderStamp { node_id: 2, boot_id: 10, now_ms: 5, timing: LeaseTiming::default(), wall_ms: 0 };
    let p = LogPosition { index: 3, term: 2, leader_node_id: 2 };
    let o = m.apply(p, &Command { stamp: restarted, op: acquire("g", "b", 1000) }).outcome;
    assert!(matches!(o, Outcome::Held { grantable_at_ms: 1065, .. }), "{o:?}");
}

#[test]
fn invalid_commands_are_rejected_not_applied() {
    let mut m = Machine::new();
    assert!(matches!(run(&mut m, 1, 0, acquire("", "a", 1000)), Outcome::Rejected(Rejection::InvalidName(_))));
    assert_eq!(run(&mut m, 2, 0, acquire("g", "a", 0)), Outcome::Rejected(Rejection::ZeroTtl));
    assert_eq!(run(&mut m, 3, 0, acquire("g", "a", 40)), Outcome::Rejected(Rejection::TtlTooShort { ttl_ms: 40 }));
    let foreign = m
        .apply(LogPosition { index: 4, term: 1, leader_node_id: 3 }, &Command { stamp: stamp(0), op: Op::LeaderStart });
    assert!(matches!(foreign.outcome, Outcome::Rejected(Rejection::ForeignStamp { .. })));
    assert_eq!(m.lease_count(), 0);
}

#[test]
fn time_never_goes_backwards_within_one_clock() {
    let mut m = Machine::new();
    run(&mut m, 1, 1000, acquire("g", "a", 1000));
    // A command stamped earlier but appended later is applied at the later time.
    run(&mut m, 2, 900, Op::LeaderStart);
    assert_eq!(m.clock().map(|c| c.1), Some(1000));
}

// ---- property tests ----------------------------------------------------------

/// One step of a generated history: real time advances, maybe a new leader
/// (with an arbitrary clock offset) takes over, then a command is applied.
#[derive(Debug, Clone)]
struct Step {
    advance_ms: u64,
    new_leader: Option<(u64, u64)>,
    group: usize,
    holder: usize,
    kind: u8,
    ttl_ms: u64,
    epoch_delta: i8,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0u64..800,
        prop::option::weighted(0.1, (0u64..3, 0u64..10_000_000)),
        0usize..2,
        0usize..3,
        0u8..4,
        prop::sample::select(vec![100u64, 300, 1000]),
        -1i8..=1,
    )
        .prop_map(|(advance_ms, new_leader, group, holder, kind, ttl_ms, epoch_delta)| Step {
            advance_ms,
            new_leader,
            group,
            holder,
            kind,
            ttl_ms,
            epoch_delta,
        })
}

const GROUPS: [&str; 2] = ["g0", "g1"];
const HOLDERS: [&str; 3] = ["h0", "h1", "h2"];

/// Replays steps, returning every outcome, the final machine, and checking
/// the lease safety property in real time on the way.
fn replay(steps: &[Step], snapshot_at: Option<usize>) -> (Vec<Outcome>, Machine) {
    let mut m = Machine::new();
    let mut real_ms = 0u64;
    let (mut term, mut leader, mut offset) = (1u64, 0u64, 0u64);
    // Per group: (holder, epoch, real time until which the holder may act).
    let mut valid: [Option<(String, u64, u64)>; 2] = [None, None];
    let mut outcomes = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        if Some(i) == snapshot_at {
            let bytes = serde_json::to_vec(&m).unwrap();
            m = serde_json::from_slice(&bytes).unwrap();
        }
        real_ms += s.advance_ms;
        if let Some((node, new_offset)) = s.new_leader {
            term += 1;
            leader = node;
            offset = new_offset;
        }
        let group = GROUPS[s.group];
        let holder = HOLDERS[s.holder];
        let current_epoch = m.lease(group, ReaderClock::Unknown).epoch;
        let epoch = current_epoch.saturating_add_signed(i64::from(s.epoch_delta));
        let op = match s.kind {
            0 | 1 => Op::Acquire { group: group.into(), holder: holder.into(), ttl_ms: s.ttl_ms },
            2 => Op::Renew { group: group.into(), holder: holder.into(), epoch },
            _ => Op::Release { group: group.into(), holder: holder.into(), epoch },
        };
        let stamp = LeaderStamp {
            node_id: leader,
            boot_id: term,
            now_ms: real_ms + offset,
            timing: LeaseTiming::default(),
            wall_ms: 0,
        };
        let applied =
            m.apply(LogPosition { index: i as u64 + 1, term, leader_node_id: leader }, &Command { stamp, op });
        let timing = LeaseTiming::default();
        match &applied.outcome {
            Outcome::Granted(v) => {
                if let Some((prev_holder, prev_epoch, until)) = &valid[s.group] {
                    assert_eq!(v.epoch, prev_epoch + 1, "epochs go up by one per grant");
                    assert!(
                        prev_holder == holder || real_ms >= *until,
                        "{holder} granted {group} at {real_ms} while {prev_holder} may act until {until}"
                    );
                }
                // The holder sent its request no later than the stamp.
                valid[s.group] = Some((holder.into(), v.epoch, real_ms + timing.holder_valid_for_ms(v.ttl_ms)));
            }
            Outcome::Renewed(v) => {
                let slot = valid[s.group].as_mut().expect("renewed a lease never granted");
                assert_eq!((slot.0.as_str(), slot.1), (holder, v.epoch));
                slot.2 = real_ms + timing.holder_valid_for_ms(v.ttl_ms);
            }
            Outcome::Released(v) => {
                let slot = valid[s.group].as_mut().expect("released a lease never granted");
                assert_eq!(slot.1, v.epoch);
                // The holder stopped acting before it released.
                slot.2 = real_ms;
            }
            _ => {}
        }
        for c in &applied.changes {
            assert_eq!(c.lease.as_ref().map(|l| l.revision), Some(i as u64 + 1));
        }
        outcomes.push(applied.outcome);
    }
    (outcomes, m)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No two holders may act at once, whatever the leader changes and clock
    /// offsets; epochs go up by exactly one per grant.
    #[test]
    fn no_overlapping_holders_and_epochs_increase(steps in prop::collection::vec(step(), 1..120)) {
        replay(&steps, None);
    }

    /// Same commands, same state: with or without a snapshot round trip.
    #[test]
    fn apply_is_deterministic(steps in prop::collection::vec(step(), 1..80), cut in 0usize..80) {
        let (a_out, a) = replay(&steps, None);
        let (b_out, b) = replay(&steps, Some(cut.min(steps.len())));
        prop_assert_eq!(a_out, b_out);
        prop_assert_eq!(a, b);
    }
}

#[test]
fn groups_are_applied_validated_and_reported_on() {
    use crate::group::{MemberSpec, Policy};
    use crate::observe::{ObsState, Reason};
    let spec = GroupSpec {
        name: "cache".into(),
        members: vec![
            MemberSpec { id: "c1".into(), heartbeat: "redis://h:1".into(), priority: 1, data: None, announce: None },
            MemberSpec { id: "c2".into(), heartbeat: "redis://h:2".into(), priority: 1, data: None, announce: None },
        ],
        policy: Policy::default(),
        failover: None,
    };
    let mut m = Machine::new();
    assert_eq!(
        run(&mut m, 1, 0, Op::ApplyGroup { spec: spec.clone() }),
        Outcome::GroupApplied { revision: 1, created: true }
    );
    let mut bad = spec.clone();
    bad.members[1].id = "c1".into();
    assert!(matches!(run(&mut m, 2, 0, Op::ApplyGroup { spec: bad }), Outcome::Rejected(Rejection::InvalidSpec(_))));
    let cell = |inc| Observation {
        state: ObsState::Up,
        reason: Reason::Advancing,
        state_age_ms: 5,
        incarnation: Some(inc),
        seq: Some(1),
        restarts: 0,
    };
    let report = |observer: Observer, inc| Op::Report {
        observer,
        observer_incarnation: 9,
        status: None,
        views: vec![GroupView { group: "cache".into(), cells: vec![("c2".into(), cell(inc))], version: 0 }],
    };
    assert_eq!(
        run(&mut m, 3, 10, report(Observer::Member("c1".into()), 7)),
        Outcome::Reported { restarts: vec![], rejected: vec![] }
    );
    // A new incarnation of c2 is recorded as a restart.
    match run(&mut m, 4, 20, report(Observer::Coordinator(2), 8)) {
        Outcome::Reported { restarts, .. } => {
            assert_eq!((restarts[0].from_incarnation, restarts[0].to_incarnation), (7, 8))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        run(&mut m, 5, 20, report(Observer::Member("zz".into()), 8)),
        Outcome::Rejected(Rejection::UnknownObserver { .. })
    ));
    let view = |group: &str| GroupView { group: group.into(), cells: vec![], version: 0 };
    let unknown = Op::Report {
        observer: Observer::Coordinator(1),
        observer_incarnation: 1,
        views: vec![view("nope")],
        status: None,
    };
    assert!(matches!(run(&mut m, 6, 20, unknown), Outcome::Rejected(Rejection::UnknownGroup { .. })));
    // In a batch, an unknown group does not stop the others.
    let batch = Op::Report {
        observer: Observer::Coordinator(1),
        observer_incarnation: 1,
        views: vec![view("nope"), view("cache")],
        status: None,
    };
    match run(&mut m, 6, 20, batch) {
        Outcome::Reported { rejected, .. } => assert!(matches!(&rejected[..], [Rejection::UnknownGroup { .. }])),
        other => panic!("{other:?}"),
    }
    let g = m.group("cache").unwrap();
    assert_eq!(g.views.len(), 3, "c1, coordinator-2 and (from the batch) coordinator-1");
    assert_eq!(g.restarts.len(), 1);
    // Dropping a member drops its views and cells.
    let mut smaller = spec;
    smaller.members.pop();
    assert_eq!(
        run(&mut m, 7, 30, Op::ApplyGroup { spec: smaller }),
        Outcome::GroupApplied { revision: 7, created: false }
    );
    let g = m.group("cache").unwrap();
    assert!(g.views.values().all(|v| v.cells.is_empty()));
    // Survives a snapshot round trip.
    let copy: Machine = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(copy, m);
}

#[test]
fn a_refresh_renews_only_the_view_stored_under_its_token() {
    use crate::group::{MemberSpec, Policy};
    use crate::observe::{ObsState, Reason};
    let member = |id: &str| MemberSpec {
        id: id.into(),
        heartbeat: "redis://h:1".into(),
        priority: 1,
        data: None,
        announce: None,
    };
    let spec = GroupSpec {
        name: "g".into(),
        members: vec![member("a"), member("b"), member("c")],
        policy: Policy::default(),
        failover: None,
    };
    let mut m = Machine::new();
    run(&mut m, 1, 0, Op::ApplyGroup { spec: spec.clone() });
    let cell = Observation {
        state: ObsState::Up,
        reason: Reason::Advancing,
        state_age_ms: 100,
        incarnation: Some(1),
        seq: Some(1),
        restarts: 0,
    };
    let cells = vec![("a".into(), cell.clone()), ("b".into(), cell.clone()), ("c".into(), cell)];
    let c1 = Observer::Coordinator(1);
    let report = |version| Op::Report {
        observer: Observer::Coordinator(1),
        observer_incarnation: 9,
        views: vec![GroupView { group: "g".into(), cells: cells.clone(), version }],
        status: None,
    };
    let refresh = |inc, views: &[(&str, u64)]| Op::Refresh {
        observer: Observer::Coordinator(1),
        observer_incarnation: inc,
        views: views.iter().map(|(g, v)| ((*g).to_owned(), *v)).collect(),
    };
    let refreshed = |missed: &[&str]| Outcome::Refreshed { missed: missed.iter().map(|g| (*g).to_owned()).collect() };
    run(&mut m, 2, 1_000, report(5));
    // The token matches: the view's time moves, its ages grow with it, and
    // nothing else changes.
    assert_eq!(run(&mut m, 3, 2_500, refresh(9, &[("g", 5)])), refreshed(&[]));
    let v = &m.group("g").unwrap().views[&c1];
    assert_eq!((v.reported_at_ms, v.cells["a"].state_age_ms, v.cells["a"].seq), (2_500, 1_600, Some(1)));
    assert_eq!(m.group("g").unwrap().revision, 3);
    // Another token, another incarnation of the observer, an unknown group,
    // an observer without a view, or a view without a token: missed, and
    // nothing changes.
    let before = m.clone();
    assert_eq!(run(&mut m, 4, 3_000, refresh(9, &[("g", 4), ("nope", 5)])), refreshed(&["g", "nope"]));
    assert_eq!(run(&mut m, 5, 3_000, refresh(8, &[("g", 5)])), refreshed(&["g"]));
    let other =
        Op::Refresh { observer: Observer::Coordinator(2), observer_incarnation: 9, views: vec![("g".into(), 5)] };
    assert_eq!(run(&mut m, 6, 3_000, other), refreshed(&["g"]));
    assert_eq!(m.group("g").unwrap().views, before.group("g").unwrap().views);
    run(&mut m, 7, 3_000, report(0));
    assert_eq!(run(&mut m, 8, 3_100, refresh(9, &[("g", 0)])), refreshed(&["g"]));
    // A spec change that drops one of the view's cells voids the token: the
    // observer must send what it sees in full again.
    run(&mut m, 9, 3_200, report(6));
    let mut smaller = spec;
    smaller.members.pop();
    run(&mut m, 10, 3_300, Op::ApplyGroup { spec: smaller.clone() });
    assert_eq!(run(&mut m, 11, 3_400, refresh(9, &[("g", 6)])), refreshed(&["g"]));
    assert_eq!(m.group("g").unwrap().views[&c1].reported_at_ms, 3_200);
    // One that keeps every cell keeps it.
    run(&mut m, 12, 3_500, report(7));
    run(&mut m, 13, 3_600, Op::ApplyGroup { spec: smaller });
    assert_eq!(run(&mut m, 14, 3_700, refresh(9, &[("g", 7)])), refreshed(&[]));
    // Tokens survive a snapshot round trip; entries without one encode as
    // before (no `version` field).
    let copy: Machine = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(copy, m);
    let old = serde_json::to_string(&report(0)).unwrap();
    assert!(!old.contains("version"), "{old}");
    assert_eq!(serde_json::from_str::<Op>(&old).unwrap(), report(0));
}

#[test]
fn a_batch_applies_each_command_in_order() {
    let mut m = Machine::new();
    let batch = Op::Batch(vec![
        acquire("g", "a", 1000),
        acquire("g", "b", 1000),
        Op::Batch(vec![]),
        Op::Release { group: "g".into(), holder: "a".into(), epoch: 1 },
    ]);
    match run(&mut m, 1, 0, batch) {
        Outcome::Batch(o) => {
            assert_eq!(o.len(), 4);
            assert!(matches!(o[0], Outcome::Granted(_)));
            assert!(matches!(o[1], Outcome::Held { .. }));
            assert_eq!(o[2], Outcome::Rejected(Rejection::NestedBatch));
            assert!(matches!(o[3], Outcome::Released(_)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.lease("g", ReaderClock::Unknown).holder, None);
}

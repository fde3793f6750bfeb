//! Deleting groups and restoring from a backup: unit and property tests.

use proptest::prelude::*;

use super::super::{Command, LeaderStamp, LeaseState, LogPosition, Op, Outcome, ReaderClock, Rejection};
use super::*;
use crate::group::{FailoverPolicy, GroupSpec, MemberSpec, Policy};
use crate::lease::LeaseTiming;

fn spec(name: &str, managed: bool) -> GroupSpec {
    let member = |id: &str| MemberSpec {
        id: id.into(),
        heartbeat: "redis://h:1".into(),
        priority: 100,
        data: None,
        announce: None,
    };
    GroupSpec {
        name: name.into(),
        members: vec![member(&format!("{name}-1")), member(&format!("{name}-2"))],
        policy: Policy::default(),
        failover: managed.then(FailoverPolicy::default),
    }
}

fn run(m: &mut Machine, index: u64, now_ms: u64, op: Op) -> Outcome {
    let stamp = LeaderStamp { node_id: 1, boot_id: 7, now_ms, timing: LeaseTiming::default(), wall_ms: 0 };
    m.apply(LogPosition { index, term: 1, leader_node_id: 1 }, &Command { stamp, op }).outcome
}

fn acquire(group: &str, holder: &str) -> Op {
    Op::Acquire { group: group.into(), holder: holder.into(), ttl_ms: 1000 }
}

fn delete(group: &str, force: bool) -> Op {
    Op::DeleteGroup { group: group.into(), force }
}

fn granted(o: &Outcome) -> u64 {
    match o {
        Outcome::Granted(v) => v.epoch,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[test]
fn a_deleted_group_is_gone_and_its_name_never_reuses_an_epoch() {
    let mut m = Machine::new();
    run(&mut m, 1, 0, Op::ApplyGroup { spec: spec("cache", false) });
    for i in 0..3 {
        granted(&run(&mut m, 2 + i, 0, acquire("cache", "svc")));
    }
    assert_eq!(m.lease("cache", ReaderClock::Now(0)).epoch, 3);
    match run(&mut m, 5, 10, delete("cache", false)) {
        Outcome::GroupDeleted { revision: 5, lease } => {
            assert_eq!((lease.holder, lease.epoch, lease.state), (None, 3, LeaseState::Free));
        }
        other => panic!("{other:?}"),
    }
    assert!(m.group("cache").is_none());
    assert_eq!(m.lease_count(), 0, "its lease record is gone too");
    assert_eq!(m.epoch_floor(), 3);
    // The old holder's renewal is refused, naming the epoch it builds on.
    match run(&mut m, 6, 20, Op::Renew { group: "cache".into(), holder: "svc".into(), epoch: 3 }) {
        Outcome::Rejected(Rejection::NotHolder { current, .. }) => {
            assert_eq!((current.holder, current.epoch), (None, 3))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(run(&mut m, 7, 20, delete("cache", false)), rejected_outcome(unknown("cache")).outcome);
    // Created again: it starts above every epoch the old one granted.
    run(&mut m, 8, 30, Op::ApplyGroup { spec: spec("cache", false) });
    assert_eq!(granted(&run(&mut m, 9, 30, acquire("cache", "svc"))), 4);
    // A snapshot keeps the floor.
    let copy: Machine = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(copy, m);
}

fn unknown(group: &str) -> Rejection {
    Rejection::UnknownGroup { group: group.into() }
}

#[test]
fn a_managed_group_with_a_live_primary_needs_force() {
    let mut m = Machine::new();
    run(&mut m, 1, 0, Op::ApplyGroup { spec: spec("db", true) });
    assert_eq!(granted(&run(&mut m, 2, 100, acquire("db", "db-1"))), 1);
    match run(&mut m, 3, 400, delete("db", false)) {
        Outcome::Rejected(r @ Rejection::LivePrimary { .. }) => {
            assert_eq!(
                r,
                Rejection::LivePrimary { group: "db".into(), holder: "db-1".into(), epoch: 1, remaining_ms: 700 }
            );
            assert!(r.to_string().contains("--force"), "{r}");
        }
        other => panic!("{other:?}"),
    }
    assert!(m.group("db").is_some(), "a refused delete changes nothing");
    // Once the lease has run out (at the entry's time), no force is needed.
    let mut later = m.clone();
    assert!(matches!(run(&mut later, 4, 1100, delete("db", false)), Outcome::GroupDeleted { .. }));
    // With force, at once; the primary's next renewal is refused.
    assert!(matches!(run(&mut m, 4, 500, delete("db", true)), Outcome::GroupDeleted { .. }));
    assert!(matches!(
        run(&mut m, 5, 600, Op::Renew { group: "db".into(), holder: "db-1".into(), epoch: 1 }),
        Outcome::Rejected(Rejection::NotHolder { .. })
    ));
    // An unmanaged group's lease does not block a delete.
    run(&mut m, 6, 600, Op::ApplyGroup { spec: spec("plain", false) });
    granted(&run(&mut m, 7, 600, acquire("plain", "svc")));
    assert!(matches!(run(&mut m, 8, 700, delete("plain", false)), Outcome::GroupDeleted { .. }));
    assert!(matches!(run(&mut m, 9, 700, delete("no such", true)), Outcome::Rejected(Rejection::InvalidName(_))));
}

#[test]
fn a_restore_frees_every_lease_above_the_backups_highest_epoch_plus_the_bump() {
    let mut m = Machine::new();
    run(&mut m, 1, 0, Op::ApplyGroup { spec: spec("db", true) });
    run(&mut m, 2, 0, Op::ApplyGroup { spec: spec("cache", false) });
    granted(&run(&mut m, 3, 0, acquire("db", "db-1")));
    for i in 0..5 {
        granted(&run(&mut m, 4 + i, 0, acquire("orders", "svc")));
    }
    let r = m.restored(1_000_000).unwrap();
    // db was at 1 and orders at 5: both start free at 5 + the bump.
    for group in ["db", "orders"] {
        let l = r.lease(group, ReaderClock::Unknown);
        assert_eq!((l.holder.as_deref(), l.epoch, l.state), (None, 1_000_005, LeaseState::Free), "{group}");
    }
    assert_eq!(r.lease("never", ReaderClock::Unknown).epoch, 1_000_005, "new names start above the backup");
    assert_eq!(r.clock(), None);
    let (db, old_db) = (r.group("db").unwrap(), m.group("db").unwrap());
    assert_eq!(
        (&db.spec, &db.election.designated, &db.election.history),
        (&old_db.spec, &old_db.election.designated, &old_db.election.history)
    );
    assert!(db.views.is_empty() && db.statuses.is_empty());
    // The designated member takes the lease at once, above the bump.
    let mut r = r;
    assert_eq!(granted(&run(&mut r, 1, 5, acquire("db", "db-1"))), 1_000_006);
    assert_eq!(granted(&run(&mut r, 2, 5, acquire("other", "svc"))), 1_000_006);
    assert_eq!(m.restored(0), Err(RestoreError::ZeroBump));
    let e = m.restored(u64::MAX - 2).unwrap_err();
    assert!(matches!(e, RestoreError::Overflow { .. }), "{e}");
}

/// One step of a random history: an op on one of a few names, at a time.
#[derive(Debug, Clone)]
struct Step {
    advance_ms: u64,
    name: usize,
    holder: usize,
    kind: u8,
    force: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (0u64..700, 0usize..3, 0usize..2, 0u8..6, any::<bool>()).prop_map(|(advance_ms, name, holder, kind, force)| Step {
        advance_ms,
        name,
        holder,
        kind,
        force,
    })
}

const NAMES: [&str; 3] = ["db", "cache", "orders"];

/// Applies `steps` from index `first` and time `start`; returns the epoch
/// of every grant, by name, in order.
fn replay(m: &mut Machine, steps: &[Step], first: u64, start: u64) -> Vec<(usize, u64)> {
    let mut now = start;
    let mut grants = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        now += s.advance_ms;
        let name = NAMES[s.name];
        // db is managed: only its designated member (db-1) may hold it.
        let holder = if s.name == 0 { "db-1" } else { ["h0", "h1"][s.holder] };
        let epoch = m.lease(name, ReaderClock::Unknown).epoch;
        let op = match s.kind {
            0 | 1 => acquire(name, holder),
            2 => Op::Release { group: name.into(), holder: holder.into(), epoch },
            3 => delete(name, s.force),
            _ => Op::ApplyGroup { spec: spec(name, s.name == 0) },
        };
        if let Outcome::Granted(v) = run(m, first + i as u64, now, op) {
            grants.push((s.name, v.epoch));
        }
    }
    grants
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Deletes and re-creations never let a name's epoch go back: every
    /// grant of a name is above every earlier grant of it.
    #[test]
    fn epochs_of_a_name_only_go_up_across_deletes(steps in prop::collection::vec(step(), 1..150)) {
        let mut m = Machine::new();
        let mut last = [0u64; 3];
        for (name, epoch) in replay(&mut m, &steps, 1, 0) {
            prop_assert!(epoch > last[name], "{} granted {epoch} after {}", NAMES[name], last[name]);
            last[name] = epoch;
        }
    }

    /// After a restore, no epoch at or below any epoch in the backup is
    /// ever granted, for any name; and every name's grants start above its
    /// backed-up epoch plus the bump.
    #[test]
    fn a_restored_cluster_never_grants_an_epoch_of_the_backup(
        before in prop::collection::vec(step(), 1..100),
        after in prop::collection::vec(step(), 1..100),
        bump in 1u64..2_000,
        offset in 0u64..10_000_000,
    ) {
        let mut old = Machine::new();
        replay(&mut old, &before, 1, 0);
        let backup: Machine = serde_json::from_slice(&serde_json::to_vec(&old).unwrap()).unwrap();
        let top = backup.max_epoch();
        let mut restored = backup.restored(bump).unwrap();
        // The new cluster's log and clock start wherever they start.
        for (name, epoch) in replay(&mut restored, &after, 1, offset) {
            prop_assert!(epoch > top, "{} granted {epoch}, in the backup up to {top}", NAMES[name]);
            let backed_up = backup.lease(NAMES[name], ReaderClock::Unknown).epoch;
            prop_assert!(epoch > backed_up + bump);
        }
    }
}

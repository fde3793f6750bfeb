//! The role machine: scripted cases, and properties over random event
//! sequences (a model fencer checks that every held deadline is armed).

use proptest::prelude::*;

use super::*;

fn view(revision: u64, designated: &str, holder: &str, epoch: u64) -> Event {
    Event::Election(ElectionView {
        revision,
        designated: (!designated.is_empty()).then(|| designated.to_owned()),
        holder: (!holder.is_empty()).then(|| holder.to_owned()),
        epoch,
        switchover_to: None,
    })
}

fn up(role: Role) -> Event {
    Event::Service(ServiceView {
        reachable: true,
        role: Some(role),
        link_up: role == Role::Replica,
        run_id: "r1".into(),
    })
}

#[test]
fn designated_member_takes_the_lease_arms_the_fence_then_promotes() {
    let mut m = RoleMachine::new("m1");
    assert!(m.step(0, up(Role::Replica)).is_empty());
    assert_eq!(m.step(1, view(5, "m1", "", 0)), vec![Action::StartKeeper]);
    // No second keeper while one runs.
    assert!(m.step(2, Event::Tick).is_empty());
    assert_eq!(
        m.step(10, Event::Acquired { epoch: 1, valid_until_ms: 950 }),
        vec![Action::ArmFence { epoch: 1, deadline_ms: 950 }, Action::Promote { epoch: 1, deadline_ms: 950 }]
    );
    // A failed promotion is retried on the next tick, under the deadline.
    assert!(m.step(11, Event::Done { action: ActionKind::Promote, ok: false }).is_empty());
    assert_eq!(m.step(20, Event::Tick), vec![Action::Promote { epoch: 1, deadline_ms: 950 }]);
    m.step(21, Event::Done { action: ActionKind::Promote, ok: true });
    assert!(m.step(30, Event::Tick).is_empty());
    assert_eq!(
        m.step(340, Event::Renewed { epoch: 1, valid_until_ms: 1_280 }),
        vec![Action::ArmFence { epoch: 1, deadline_ms: 1_280 }]
    );
    assert_eq!(m.synced_epoch(), Some(1));
}

#[test]
fn a_member_serves_as_primary_only_promoted_under_a_lease_it_still_holds() {
    let mut m = RoleMachine::new("m1");
    m.step(0, up(Role::Primary));
    assert!(!m.serves_as_primary(0), "a primary without a lease");
    m.step(1, view(5, "m1", "", 0));
    m.step(10, Event::Acquired { epoch: 1, valid_until_ms: 950 });
    assert!(m.holds_lease(10) && !m.serves_as_primary(10), "not promoted yet");
    m.step(11, Event::Done { action: ActionKind::Promote, ok: true });
    assert!(m.serves_as_primary(12));
    assert!(!m.serves_as_primary(950) && !m.holds_lease(950), "past the deadline");
    m.step(20, up(Role::Replica));
    assert!(!m.serves_as_primary(21), "its service says replica");
}

#[test]
fn a_deadline_without_renewal_fences_and_nothing_is_promoted_after_it() {
    let mut m = RoleMachine::new("m1");
    m.step(0, up(Role::Replica));
    m.step(1, view(5, "m1", "", 0));
    m.step(10, Event::Acquired { epoch: 1, valid_until_ms: 950 });
    // The promotion keeps failing; at the deadline the machine stops
    // trying and fences instead.
    m.step(11, Event::Done { action: ActionKind::Promote, ok: false });
    assert_eq!(m.step(950, Event::Tick), vec![Action::FenceNow]);
    assert_eq!(m.held(), None);
    // Owed until it succeeds.
    m.step(951, Event::Done { action: ActionKind::Fence, ok: false });
    assert_eq!(m.step(1_000, Event::Tick), vec![Action::FenceNow]);
    m.step(1_001, Event::Done { action: ActionKind::Fence, ok: true });
    assert!(m.step(1_100, Event::Tick).is_empty());
}

#[test]
fn a_lost_lease_fences_at_once_and_the_new_holder_is_followed() {
    let mut m = RoleMachine::new("m1");
    m.step(0, up(Role::Primary));
    m.step(1, view(5, "m1", "m1", 3));
    m.step(10, Event::Acquired { epoch: 4, valid_until_ms: 950 });
    m.step(11, Event::Done { action: ActionKind::Promote, ok: true });
    assert_eq!(m.step(400, Event::Lost { epoch: 4 }), vec![Action::FenceNow]);
    m.step(401, Event::Done { action: ActionKind::Fence, ok: true });
    // Still designated (as far as it knows): it tries to take the lease
    // again, which the coordinators grant only after the old one expired.
    assert_eq!(m.step(402, Event::KeeperEnded), vec![Action::StartKeeper]);
    // A keeper that ends at once is restarted only on a later tick.
    assert!(m.step(410, Event::KeeperEnded).is_empty());
    assert_eq!(m.step(502, Event::Tick), vec![Action::StartKeeper]);
    // The coordinators moved the primary (the keeper's acquire is refused).
    m.step(1_400, Event::KeeperEnded);
    assert_eq!(m.step(1_500, view(9, "m2", "m2", 5)), vec![Action::Follow { holder: "m2".into(), epoch: 5 }]);
    m.step(1_501, Event::Done { action: ActionKind::Follow, ok: true });
    m.step(1_600, up(Role::Replica));
    assert_eq!(m.synced_epoch(), Some(5));
}

#[test]
fn a_primary_nobody_holds_a_lease_for_is_fenced_once() {
    let mut m = RoleMachine::new("m1");
    // The agent starts beside a Redis that is a master (restarted with a
    // master's config); another member is designated.
    m.step(0, up(Role::Primary));
    assert_eq!(m.step(1, Event::Tick), vec![Action::FenceNow]);
    m.step(2, Event::Done { action: ActionKind::Fence, ok: true });
    m.step(3, up(Role::Primary));
    assert!(m.step(4, Event::Tick).is_empty(), "fenced again");
    // It restarts as a master again: fenced again.
    m.step(
        5,
        Event::Service(ServiceView { reachable: true, role: Some(Role::Primary), link_up: false, run_id: "r2".into() }),
    );
    assert_eq!(m.step(6, Event::Tick), vec![Action::FenceNow]);
    m.step(7, Event::Done { action: ActionKind::Fence, ok: true });
    // Designated, it takes the lease and is promoted: no fence while held.
    assert_eq!(m.step(8, view(5, "m1", "", 0)), vec![Action::StartKeeper]);
    m.step(9, Event::Acquired { epoch: 1, valid_until_ms: 900 });
    m.step(10, Event::Done { action: ActionKind::Promote, ok: true });
    m.step(
        11,
        Event::Service(ServiceView { reachable: true, role: Some(Role::Primary), link_up: false, run_id: "r2".into() }),
    );
    assert!(m.step(12, Event::Tick).is_empty());
}

#[test]
fn stale_views_are_ignored() {
    let mut m = RoleMachine::new("m1");
    m.step(0, up(Role::Replica));
    m.step(1, view(9, "m2", "m2", 5));
    // An older view (a lagging node) designating m1: no keeper.
    assert!(m.step(2, view(8, "m1", "", 4)).is_empty());
    assert_eq!(m.election().map(|e| e.revision), Some(9));
}

#[test]
fn a_restarted_empty_service_may_not_take_the_lease() {
    let mut m = RoleMachine::new("m2");
    m.step(0, up(Role::Replica));
    m.step(1, view(5, "m1", "m1", 3));
    m.step(2, Event::Done { action: ActionKind::Follow, ok: true });
    m.step(3, up(Role::Replica));
    assert_eq!(m.synced_epoch(), Some(3));
    // Restarted: a new run id, not synced yet.
    m.step(
        4,
        Event::Service(ServiceView { reachable: true, role: Some(Role::Primary), link_up: false, run_id: "r2".into() }),
    );
    m.step(
        5,
        Event::Service(ServiceView { reachable: true, role: Some(Role::Replica), link_up: false, run_id: "r2".into() }),
    );
    assert_eq!(m.synced_epoch(), None);
    assert!(!m.step(6, view(9, "m2", "", 3)).contains(&Action::StartKeeper));
}

#[test]
fn switchover_is_tried_once_per_view() {
    let mut m = RoleMachine::new("m1");
    m.step(0, up(Role::Replica));
    m.step(1, view(5, "m1", "", 0));
    m.step(2, Event::Acquired { epoch: 1, valid_until_ms: 950 });
    m.step(3, Event::Done { action: ActionKind::Promote, ok: true });
    let so = Event::Election(ElectionView {
        revision: 7,
        designated: Some("m1".into()),
        holder: Some("m1".into()),
        epoch: 1,
        switchover_to: Some("m2".into()),
    });
    assert_eq!(m.step(10, so.clone()), vec![Action::Switchover { target: "m2".into() }]);
    assert!(m.step(20, Event::Tick).is_empty());
    assert!(m.step(30, so).is_empty());
}

/// Random inputs, including nonsense a buggy runtime or a lagging node
/// could produce.
fn arb_event() -> impl Strategy<Value = (u64, Event)> {
    let name = prop_oneof![Just(""), Just("m1"), Just("m2")];
    let ev = prop_oneof![
        3 => Just(Event::Tick),
        2 => (1u64..4, 0u64..2_000).prop_map(|(epoch, d)| Event::Acquired { epoch, valid_until_ms: d }),
        3 => (1u64..4, 0u64..2_000).prop_map(|(epoch, d)| Event::Renewed { epoch, valid_until_ms: d }),
        1 => (1u64..4).prop_map(|epoch| Event::Lost { epoch }),
        1 => (1u64..4).prop_map(|epoch| Event::Released { epoch }),
        1 => Just(Event::KeeperEnded),
        3 => (0u64..20, name.clone(), name, 0u64..4).prop_map(|(r, d, h, e)| view(r, d, h, e)),
        1 => (any::<bool>(), prop_oneof![Just(Role::Primary), Just(Role::Replica)], any::<bool>(), 0u8..2)
            .prop_map(|(reachable, role, link_up, run)| Event::Service(ServiceView {
                reachable,
                role: Some(role),
                link_up,
                run_id: if reachable { format!("r{run}") } else { String::new() },
            })),
        3 => (prop_oneof![
                Just(ActionKind::Promote),
                Just(ActionKind::Fence),
                Just(ActionKind::Follow),
                Just(ActionKind::Switchover)
            ], any::<bool>())
            .prop_map(|(action, ok)| Event::Done { action, ok }),
    ];
    (0u64..200, ev)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn role_machine_invariants(events in proptest::collection::vec(arb_event(), 1..80)) {
        let mut m = RoleMachine::new("m1");
        let mut now = 0u64;
        // What the fencer was last told: (epoch, deadline), None once it
        // fenced or was disarmed.
        let mut armed: Option<(u64, u64)> = None;
        // Deadlines the keeper reported, per epoch (the latest).
        let mut reported: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut newest_revision: Option<u64> = None;
        for (dt, ev) in events {
            now += dt;
            if let Event::Acquired { epoch, valid_until_ms } | Event::Renewed { epoch, valid_until_ms } = &ev {
                let e = reported.entry(*epoch).or_insert(*valid_until_ms);
                *e = (*e).max(*valid_until_ms);
            }
            if let Event::Election(v) = &ev {
                newest_revision = Some(newest_revision.map_or(v.revision, |r| r.max(v.revision)));
            }
            let held_before = m.held();
            let actions = m.step(now, ev.clone());
            for a in &actions {
                match a {
                    Action::ArmFence { epoch, deadline_ms } => {
                        // Never beyond what the keeper reported.
                        prop_assert!(reported.get(epoch).is_some_and(|d| deadline_ms <= d), "{a:?}");
                        armed = Some((*epoch, *deadline_ms));
                    }
                    Action::FenceNow => armed = None,
                    Action::Promote { epoch, deadline_ms } => {
                        // Only under a valid lease whose deadline the fencer
                        // already has.
                        prop_assert!(now < *deadline_ms, "promote at {now} past {deadline_ms}");
                        prop_assert_eq!(armed, Some((*epoch, *deadline_ms)));
                        prop_assert_eq!(m.held().map(|h| (h.epoch, h.valid_until_ms)), Some((*epoch, *deadline_ms)));
                    }
                    Action::Follow { holder, epoch } => {
                        // Never while holding, only the newest view's holder.
                        prop_assert!(m.held().is_none());
                        let v = m.election().expect("a view");
                        prop_assert_eq!(Some(v.revision), newest_revision);
                        prop_assert_eq!(v.holder.as_deref(), Some(holder.as_str()));
                        prop_assert_eq!(v.epoch, *epoch);
                        prop_assert!(holder != "m1");
                        armed = None;
                    }
                    Action::StartKeeper => {
                        let v = m.election().expect("a view");
                        prop_assert_eq!(Some(v.revision), newest_revision);
                        prop_assert_eq!(v.designated.as_deref(), Some("m1"));
                    }
                    Action::Switchover { target } => {
                        prop_assert!(m.held().is_some_and(|h| h.promoted));
                        prop_assert!(target != "m1");
                    }
                }
            }
            // Every lease the machine holds has its deadline armed.
            if let Some(h) = m.held() {
                prop_assert_eq!(armed, Some((h.epoch, h.valid_until_ms)), "held {:?}", h);
                // It never believes a lease past its deadline after a tick.
                if matches!(ev, Event::Tick) {
                    prop_assert!(now < h.valid_until_ms);
                }
            }
            // A lease that ended (lost, released, past its deadline) leaves
            // a fence owed or done in this very step.
            if let Some(h) = held_before
                && m.held().is_none_or(|n| n.epoch != h.epoch)
            {
                prop_assert!(actions.contains(&Action::FenceNow) || m.fence_owed() || matches!(ev, Event::Acquired { .. }),
                    "lost {h:?} on {ev:?} without a fence: {actions:?}");
            }
        }
    }

    /// A view older than the newest one seen changes nothing.
    #[test]
    fn older_views_change_nothing(events in proptest::collection::vec(arb_event(), 1..40), r in 0u64..20) {
        let mut m = RoleMachine::new("m1");
        let mut now = 0;
        for (dt, ev) in events {
            now += dt;
            m.step(now, ev);
        }
        if let Some(newest) = m.election().map(|e| e.revision).filter(|n| r < *n) {
            let before = format!("{m:?}");
            let actions = m.step(now, view(r, "m1", "m2", 99));
            prop_assert!(actions.is_empty());
            prop_assert_eq!(before, format!("{m:?}"));
            prop_assert_eq!(m.election().map(|e| e.revision), Some(newest));
        }
    }
}

//! Verdict tests: the architecture's fault table, an exhaustive check over
//! every reachability pattern of groups of 2 to 4 members with 3
//! coordinators, and property tests with stale and unknown reports.

use proptest::prelude::*;

use super::*;
use crate::group::{GroupSpec, MemberSpec, Policy};
use crate::observe::Observation;

const COORDS: [u64; 3] = [1, 2, 3];

fn group(k: usize) -> GroupState {
    let spec = GroupSpec {
        name: "g".into(),
        members: (0..k)
            .map(|i| MemberSpec {
                id: format!("m{i}"),
                heartbeat: format!("redis://h:{}", 7000 + i),
                priority: 1,
                data: None,
                announce: None,
            })
            .collect(),
        policy: Policy::default(),
        failover: None,
    };
    GroupState::new(spec, 1)
}

fn obs(state: ObsState) -> Observation {
    let reason = match state {
        ObsState::Up => Reason::Advancing,
        ObsState::Down => Reason::Missing,
        ObsState::Unknown => Reason::NoReadingYet,
    };
    Observation { state, reason, state_age_ms: 0, incarnation: None, seq: None, restarts: 0 }
}

/// Every observer of the group, members first.
fn all_observers(k: usize) -> Vec<Observer> {
    let mut v: Vec<Observer> = (0..k).map(|i| Observer::Member(format!("m{i}"))).collect();
    v.extend(COORDS.iter().map(|c| Observer::Coordinator(*c)));
    v
}

/// Fresh views for a pattern: `sees(observer_index, target_index)`.
fn views_from(g: &mut GroupState, k: usize, sees: impl Fn(usize, usize) -> bool, now: u64) {
    for (oi, o) in all_observers(k).into_iter().enumerate() {
        let cells: Vec<(String, Observation)> = (0..k)
            .filter(|t| oi >= k || oi != *t)
            .map(|t| (format!("m{t}"), obs(if sees(oi, t) { ObsState::Up } else { ObsState::Down })))
            .collect();
        g.report(o, 1, &cells, now, 2);
    }
}

fn state_of(v: &GroupVerdict, m: &str) -> Verdict {
    v.member(m).unwrap().state
}

/// The architecture's table: P = m0 (primary), R = m1, coordinators 1-3.
#[test]
fn the_fault_table_of_the_architecture() {
    let k = 2;
    let (p, r) = (0, 1);
    let (c1, c2, c3) = (2, 3, 4);
    // P crashes: everybody loses P (and P reports nothing fresh: its view is
    // simply absent in reality; here P's view says R is fine).
    let mut g = group(k);
    views_from(&mut g, k, |_, t| t != p, 0);
    let v = verdict(&g, &COORDS, 0);
    assert_eq!(state_of(&v, "m0"), Verdict::Down);
    assert_eq!(state_of(&v, "m1"), Verdict::Up);
    assert!(v.cut_links.is_empty() && v.isolated.is_empty());

    // Link P-R cut, both reach the coordinators: no down verdict, the cut
    // links are named.
    let mut g = group(k);
    views_from(&mut g, k, |o, t| !((o == r && t == p) || (o == p && t == r)), 0);
    let v = verdict(&g, &COORDS, 0);
    assert_eq!(state_of(&v, "m0"), Verdict::Partial);
    assert_eq!(state_of(&v, "m1"), Verdict::Partial);
    assert_eq!(
        v.cut_links,
        vec![
            CutLink { observer: Observer::Member("m0".into()), target: "m1".into() },
            CutLink { observer: Observer::Member("m1".into()), target: "m0".into() },
        ]
    );

    // P isolated with C1: R, C2, C3 lose P; P and C1 lose R... P's view is
    // not reaching the leader, so take the majority side's views only.
    let mut g = group(k);
    views_from(&mut g, k, |o, t| if t == p { o == c1 } else { o != c1 && o != p }, 0);
    let v = verdict(&g, &COORDS, 0);
    assert_eq!(state_of(&v, "m0"), Verdict::Down);

    // One-way: coordinators cannot reach P, R can.
    let mut g = group(k);
    views_from(&mut g, k, |o, t| !(t == p && [c1, c2, c3].contains(&o)), 0);
    let v = verdict(&g, &COORDS, 0);
    assert_eq!(state_of(&v, "m0"), Verdict::Down);
}

#[test]
fn stale_and_missing_reports_do_not_count() {
    let mut g = group(2);
    views_from(&mut g, 2, |_, _| true, 0);
    let fresh = Policy::default().freshness_ms;
    assert_eq!(state_of(&verdict(&g, &COORDS, fresh), "m0"), Verdict::Up);
    // Every view is now stale: nobody counts.
    let v = verdict(&g, &COORDS, fresh + 1);
    assert_eq!(state_of(&v, "m0"), Verdict::Unknown);
    assert_eq!(v.member("m0").unwrap().silent, 4);
    // Only two fresh down reports out of four observers: not a quorum.
    let mut g = group(2);
    g.report(Observer::Coordinator(1), 1, &[("m0".into(), obs(ObsState::Down))], 10_000, 3);
    g.report(Observer::Coordinator(2), 1, &[("m0".into(), obs(ObsState::Down))], 10_000, 4);
    let v = verdict(&g, &COORDS, 10_000);
    assert_eq!(state_of(&v, "m0"), Verdict::Unknown);
    assert_eq!(v.member("m0").unwrap().quorum_down, QuorumResult::NotEnoughInformation);
    assert!(explain(v.member("m0").unwrap()).starts_with("m0 is UNKNOWN"));
    g.report(Observer::Coordinator(3), 1, &[("m0".into(), obs(ObsState::Down))], 10_000, 5);
    let v = verdict(&g, &COORDS, 10_000);
    assert_eq!(state_of(&v, "m0"), Verdict::Down);
    assert!(explain(v.member("m0").unwrap()).starts_with("m0 is DOWN: 3 of 4 observers report it down (quorum 3)"));
}

#[test]
fn a_rebased_view_keeps_its_age() {
    let mut g = group(2);
    views_from(&mut g, 2, |_, _| true, 1_000_000);
    // New leader, clock reads 5; the old clock's last reading was 1_002_000.
    g.rebase(1_002_000, 5);
    let v = g.views.values().next().unwrap();
    assert_eq!(GroupState::view_age_ms(v, 5), 2_000);
    assert_eq!(state_of(&verdict(&g, &COORDS, 5), "m0"), Verdict::Up);
    assert_eq!(state_of(&verdict(&g, &COORDS, 1_005), "m0"), Verdict::Up);
    assert_eq!(state_of(&verdict(&g, &COORDS, 1_006), "m0"), Verdict::Unknown);
}

// ---- exhaustive check -------------------------------------------------------

/// Reference answers, computed independently of `verdict`.
struct Pattern<'a> {
    k: usize,
    sees: &'a dyn Fn(usize, usize) -> bool,
}

impl Pattern<'_> {
    fn observers_of(&self, t: usize) -> Vec<usize> {
        (0..self.k + COORDS.len()).filter(|o| *o >= self.k || *o != t).collect()
    }
    fn seen(&self, t: usize) -> usize {
        self.observers_of(t).into_iter().filter(|o| (self.sees)(*o, t)).count()
    }
    fn quorum(&self, t: usize) -> usize {
        self.observers_of(t).len() / 2 + 1
    }
    fn expected(&self, t: usize) -> Verdict {
        let n = self.observers_of(t).len();
        let seen = self.seen(t);
        if n - seen >= self.quorum(t) {
            Verdict::Down
        } else if seen == n {
            Verdict::Up
        } else if seen > 0 {
            Verdict::Partial
        } else {
            Verdict::Unknown
        }
    }
    fn quorum_sees(&self, t: usize) -> bool {
        self.seen(t) >= self.quorum(t)
    }
    fn isolated(&self, o: usize) -> bool {
        let targets: Vec<usize> = (0..self.k).filter(|t| (o >= self.k || o != *t) && self.quorum_sees(*t)).collect();
        !targets.is_empty() && targets.iter().all(|t| !(self.sees)(o, *t))
    }
}

fn check_pattern(g: &mut GroupState, p: &Pattern<'_>, lost_cells: usize, check_determinism: bool) {
    views_from(g, p.k, p.sees, 0);
    let v = verdict(g, &COORDS, 0);
    let observers = all_observers(p.k);
    for t in 0..p.k {
        let name = format!("m{t}");
        let got = state_of(&v, &name);
        assert_eq!(got, p.expected(t), "target {name}");
        if p.quorum_sees(t) {
            assert_ne!(got, Verdict::Down, "{name} is seen by a quorum but judged down");
        }
        if p.seen(t) == 0 {
            assert_eq!(got, Verdict::Down, "{name} is lost by every observer but not down");
        }
        if lost_cells == 1 {
            assert_ne!(got, Verdict::Down, "one cut link made {name} down");
        }
    }
    let want_isolated: Vec<Observer> =
        (0..observers.len()).filter(|o| p.isolated(*o)).map(|o| observers[o].clone()).collect();
    let mut got_isolated = v.isolated.clone();
    got_isolated.sort();
    let mut want_sorted = want_isolated;
    want_sorted.sort();
    assert_eq!(got_isolated, want_sorted, "isolated observers");
    let mut want_cuts: Vec<CutLink> = Vec::new();
    for t in (0..p.k).filter(|t| p.quorum_sees(*t)) {
        for o in p.observers_of(t).into_iter().filter(|o| !(p.sees)(*o, t)) {
            want_cuts.push(CutLink { observer: observers[o].clone(), target: format!("m{t}") });
        }
    }
    want_cuts.sort();
    assert_eq!(v.cut_links, want_cuts, "cut links");
    if check_determinism {
        assert_eq!(verdict(g, &COORDS, 0), v, "verdict is not deterministic");
        let copy: GroupState = serde_json::from_str(&serde_json::to_string(g).unwrap()).unwrap();
        assert_eq!(verdict(&copy, &COORDS, 0), v, "verdict changed across a serde round trip");
    }
}

/// Every reachability pattern (who sees whom) for 2 and 3 members, and for
/// 4 members every pattern up to the order of the three coordinators (which
/// play interchangeable roles): 2^12 member patterns x 816 coordinator
/// multisets. Checks the exact verdict against an independent reference and
/// the properties of the issue: seen by a quorum => never down; lost by all
/// => down; one cut link => nobody down; isolated observers and cut links
/// named exactly.
#[test]
fn exhaustive_over_reachability_patterns() {
    let mut checked = 0u64;
    for k in 2..=4usize {
        let member_cells: Vec<(usize, usize)> =
            (0..k).flat_map(|o| (0..k).filter(move |t| *t != o).map(move |t| (o, t))).collect();
        let masks = 1u32 << k;
        // Coordinator masks as non-decreasing triples.
        let mut coord_triples = Vec::new();
        for a in 0..masks {
            for b in a..masks {
                for c in b..masks {
                    coord_triples.push([a, b, c]);
                }
            }
        }
        let n_member_patterns = 1u64 << member_cells.len();
        // Split the work over two threads.
        let results: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2u64)
                .map(|part| {
                    let member_cells = &member_cells;
                    let coord_triples = &coord_triples;
                    s.spawn(move || {
                        let mut g = group(k);
                        let mut n = 0u64;
                        for mp in (part..n_member_patterns).step_by(2) {
                            for triple in coord_triples {
                                let sees = |o: usize, t: usize| -> bool {
                                    if o < k {
                                        let idx = member_cells.iter().position(|c| *c == (o, t)).unwrap();
                                        mp & (1 << idx) != 0
                                    } else {
                                        triple[o - k] & (1 << t) != 0
                                    }
                                };
                                let lost = (member_cells.len() - mp.count_ones() as usize)
                                    + triple.iter().map(|m| k - m.count_ones() as usize).sum::<usize>();
                                let p = Pattern { k, sees: &sees };
                                check_pattern(&mut g, &p, lost, n.is_multiple_of(4099));
                                n += 1;
                            }
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        checked += results.iter().sum::<u64>();
    }
    // Member patterns x coordinator multisets (C(2^k + 2, 3)) for k = 2, 3, 4.
    assert_eq!(checked, 4 * 20 + 64 * 120 + 4096 * 816);
}

// ---- property tests with stale, unknown and absent reports --------------------

#[derive(Debug, Clone)]
struct Cell {
    state: ObsState,
    age_ms: u64,
    present: bool,
}

fn cell() -> impl Strategy<Value = Cell> {
    (
        prop::sample::select(vec![ObsState::Up, ObsState::Down, ObsState::Unknown]),
        prop::sample::select(vec![0u64, 1_000, 2_999, 3_000, 3_001, 50_000]),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(state, age_ms, present)| Cell { state, age_ms, present })
}

fn build(k: usize, cells: &[Cell], now: u64) -> GroupState {
    let mut g = group(k);
    let mut i = 0;
    for (oi, o) in all_observers(k).into_iter().enumerate() {
        let mut row = Vec::new();
        let mut age = 0;
        let mut any = false;
        for t in (0..k).filter(|t| oi >= k || oi != *t) {
            let c = &cells[i % cells.len()];
            i += 1;
            age = c.age_ms;
            if c.present {
                any = true;
                row.push((format!("m{t}"), obs(c.state)));
            }
        }
        if any {
            g.report(o, 1, &row, now - age, 2);
        }
    }
    g
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn verdicts_follow_fresh_quorums(k in 2usize..=5, cells in prop::collection::vec(cell(), 1..40)) {
        let now = 100_000;
        let g = build(k, &cells, now);
        let v = verdict(&g, &COORDS, now);
        for mv in &v.members {
            prop_assert_eq!(mv.up_votes + mv.down_votes + mv.unknown_votes + mv.silent, mv.observers);
            prop_assert!(!(mv.quorum_up == QuorumResult::Yes && mv.quorum_down == QuorumResult::Yes));
            if mv.up_votes >= mv.quorum {
                prop_assert_ne!(mv.state, Verdict::Down);
            }
            if mv.state == Verdict::Down {
                prop_assert!(mv.down_votes >= mv.quorum);
            }
            if mv.state == Verdict::Up {
                prop_assert!(mv.up_votes >= mv.quorum && mv.down_votes == 0);
            }
            let counted = mv.evidence.iter().filter(|e| e.fresh).count();
            prop_assert_eq!(counted, mv.up_votes + mv.down_votes + mv.unknown_votes);
            for e in &mv.evidence {
                prop_assert_eq!(e.fresh, e.state.is_some() && e.view_age_ms.is_some_and(|a| a <= g.spec.policy.freshness_ms));
            }
        }
        // Stale views change nothing: flip every stale cell and compare.
        let mut flipped = g.clone();
        for view in flipped.views.values_mut() {
            if GroupState::view_age_ms(view, now) > g.spec.policy.freshness_ms {
                for c in view.cells.values_mut() {
                    c.state = if c.state == ObsState::Up { ObsState::Down } else { ObsState::Up };
                }
            }
        }
        let v2 = verdict(&flipped, &COORDS, now);
        prop_assert_eq!(v.states(), v2.states());
        prop_assert_eq!(&v.isolated, &v2.isolated);
        prop_assert_eq!(&v.cut_links, &v2.cut_links);
    }
}

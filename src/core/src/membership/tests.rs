use proptest::prelude::*;

use super::*;

const LAG: u64 = 100;

fn node(id: u64, voter: bool, contact: Contact, lag: Option<u64>) -> NodeProgress {
    NodeProgress { id, voter, contact, lag_entries: lag }
}

fn up(id: u64) -> NodeProgress {
    node(id, true, Contact::Recent, Some(0))
}

fn down(id: u64) -> NodeProgress {
    node(id, true, Contact::Stale, Some(5_000))
}

fn led_by(leader: u64, nodes: Vec<NodeProgress>) -> ClusterProgress {
    ClusterProgress { leader: Some(leader), nodes, max_lag_entries: LAG }
}

#[test]
fn a_dead_voter_of_three_may_be_removed_a_live_one_then_not() {
    // Node 1 is dead; 2 leads; 3 is current.
    let c = led_by(2, vec![down(1), up(2), up(3)]);
    assert_eq!(c.removal(1), Ok(()));
    assert_eq!(
        c.removal(3),
        Err(RemovalRefused::WouldLoseQuorum { id: 3, remaining: 2, current: 1, needed: 2 }),
        "2 and a dead 1 cannot commit"
    );
    let e = c.removal(3).unwrap_err().to_string();
    assert!(e.contains("fewer than the 2 a quorum needs"), "{e}");
}

#[test]
fn the_only_up_to_date_voter_is_not_removed() {
    // The leader is the only current voter: the others are far behind.
    let behind = |id| node(id, true, Contact::Recent, Some(10_000));
    let c = led_by(1, vec![up(1), behind(2), behind(3)]);
    assert_eq!(c.removal(1), Err(RemovalRefused::OnlyUpToDate { id: 1 }));
    assert!(c.removal(1).unwrap_err().to_string().contains("only voter that is up to date"));
}

#[test]
fn the_last_voter_and_strangers_are_refused_learners_always_go() {
    let c = led_by(1, vec![up(1), node(4, false, Contact::Stale, None)]);
    assert_eq!(c.removal(1), Err(RemovalRefused::LastVoter { id: 1 }));
    assert_eq!(c.removal(9), Err(RemovalRefused::NotMember { id: 9 }));
    assert_eq!(c.removal(4), Ok(()), "a learner never counts towards a quorum");
}

#[test]
fn a_followers_view_cannot_approve_a_removal() {
    let unknown = |id| node(id, true, Contact::Unknown, None);
    let c = ClusterProgress { leader: None, nodes: vec![unknown(1), unknown(2), unknown(3)], max_lag_entries: LAG };
    assert_eq!(c.removal(3), Err(RemovalRefused::Unknown { id: 3 }));
    assert_eq!(c.stop_safety(3), QuorumResult::NotEnoughInformation);
    assert_eq!(c.currency(1), Currency::Unknown);
}

#[test]
fn stopping_is_safe_only_while_the_others_are_current() {
    let c = led_by(1, vec![up(1), up(2), up(3)]);
    for id in 1..=3 {
        assert_eq!(c.stop_safety(id), QuorumResult::Yes, "node {id}");
    }
    // Node 2 restarts and is not back yet: stopping 3 now would leave 1 alone.
    let c = led_by(1, vec![up(1), down(2), up(3)]);
    assert_eq!(c.stop_safety(3), QuorumResult::No);
    assert_eq!(c.stop_safety(2), QuorumResult::Yes, "it is down already");
    // Back, but still far behind: not yet.
    let c = led_by(1, vec![up(1), node(2, true, Contact::Recent, Some(LAG + 1)), up(3)]);
    assert_eq!(c.stop_safety(3), QuorumResult::No);
    // A learner may always go.
    let c = led_by(1, vec![up(1), up(2), up(3), node(4, false, Contact::Stale, None)]);
    assert_eq!(c.stop_safety(4), QuorumResult::Yes);
}

#[test]
fn a_learner_is_promoted_once_caught_up() {
    let learner = |lag| node(4, false, Contact::Recent, lag);
    let c = |lag| led_by(1, vec![up(1), up(2), up(3), learner(lag)]);
    assert_eq!(c(Some(LAG + 1)).promotion(4), Promotion::NotYet);
    assert_eq!(c(None).promotion(4), Promotion::Unknown);
    assert_eq!(c(Some(3)).promotion(4), Promotion::Ready);
    assert_eq!(c(Some(3)).promotion(2), Promotion::AlreadyVoter);
    assert_eq!(c(Some(3)).promotion(7), Promotion::NotMember);
    let gone = led_by(1, vec![up(1), node(4, false, Contact::Stale, Some(0))]);
    assert_eq!(gone.promotion(4), Promotion::NotYet, "not heard from lately");
}

#[test]
fn adding_never_reuses_an_id_or_an_address() {
    let nodes = vec![(1, "h:1".to_owned()), (2, "h:2".to_owned())];
    let removed: BTreeSet<u64> = [3].into();
    assert_eq!(check_add(4, "h:4", &nodes, &removed), Ok(()));
    assert_eq!(check_add(2, "h:2", &nodes, &removed), Ok(()), "a retried add continues");
    assert_eq!(check_add(3, "h:3", &nodes, &removed), Err(AddRefused::Removed { id: 3 }));
    assert_eq!(check_add(4, "h:1", &nodes, &removed), Err(AddRefused::AddressTaken { addr: "h:1".into(), other: 1 }));
    assert_eq!(check_add(2, "h:9", &nodes, &removed), Err(AddRefused::OtherAddress { id: 2, current: "h:2".into() }));
    assert_eq!(check_add(0, "h:0", &nodes, &removed), Err(AddRefused::ZeroId));
    assert!(check_add(3, "h:3", &nodes, &removed).unwrap_err().to_string().contains("ids are never reused"));
}

#[test]
fn standing_and_removed_ids() {
    let before: BTreeSet<u64> = [1, 2, 3].into();
    let after: BTreeSet<u64> = [2, 3, 4].into();
    let removed = removed_by(&before, &after);
    assert_eq!(removed, [1].into());
    assert_eq!(standing(1, &after, &removed), Standing::Removed);
    assert_eq!(standing(4, &after, &removed), Standing::Member);
    assert_eq!(standing(5, &after, &removed), Standing::NotYetAdded);
}

fn arb_cluster() -> impl Strategy<Value = ClusterProgress> {
    let contact = prop_oneof![Just(Contact::Recent), Just(Contact::Stale), Just(Contact::Unknown)];
    let n = (any::<bool>(), contact, proptest::option::of(0u64..300));
    (proptest::collection::vec(n, 1..8), any::<bool>()).prop_map(|(nodes, led)| {
        let mut nodes: Vec<NodeProgress> = nodes
            .into_iter()
            .enumerate()
            .map(|(i, (voter, contact, lag))| node(i as u64 + 1, voter, contact, lag))
            .collect();
        nodes[0].voter = true;
        ClusterProgress { leader: led.then_some(1), nodes, max_lag_entries: LAG }
    })
}

proptest! {
    /// An approved removal leaves voters whose current members are a
    /// majority of them, and of today's voters; and silence never approves.
    #[test]
    fn an_approved_removal_keeps_a_current_quorum(c in arb_cluster(), target in 1u64..9) {
        if c.removal(target).is_ok() && c.voters().contains(&target) {
            let voters = c.voters();
            let remaining: Vec<u64> = voters.iter().copied().filter(|v| *v != target).collect();
            let current = |ids: &[u64]| ids.iter().filter(|v| c.currency(**v) == Currency::Current).count();
            prop_assert!(current(&remaining) >= majority_of(remaining.len()));
            let all: Vec<u64> = voters.into_iter().collect();
            prop_assert!(current(&all) >= majority_of(all.len()));
        }
    }

    /// Safe to stop means the other voters that are current are a majority
    /// of all voters, so the cluster still commits without it.
    #[test]
    fn safe_to_stop_keeps_a_current_majority(c in arb_cluster(), target in 1u64..9) {
        if c.stop_safety(target) == QuorumResult::Yes && c.voters().contains(&target) {
            let voters = c.voters();
            let others = voters.iter().filter(|v| **v != target && c.currency(**v) == Currency::Current).count();
            prop_assert!(others >= majority_of(voters.len()));
        }
    }

    /// Without the leader's measurements nothing is approved.
    #[test]
    fn a_view_without_measurements_approves_nothing(c in arb_cluster(), target in 1u64..9) {
        let blind = ClusterProgress {
            leader: None,
            nodes: c.nodes.iter().map(|n| NodeProgress { contact: Contact::Unknown, ..n.clone() }).collect(),
            ..c
        };
        if blind.voters().contains(&target) {
            prop_assert!(blind.removal(target).is_err());
            prop_assert_ne!(blind.stop_safety(target), QuorumResult::Yes);
        }
    }
}

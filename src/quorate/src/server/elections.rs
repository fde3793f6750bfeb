//! The leader's election duty: for every managed group, decide (with the
//! pure [`decide`]) whether to move the designated primary, and commit the
//! decision with its evidence.
//!
//! Runs on every node but acts only on the leader, and only once the state
//! machine runs on this leader's clock; the verdict it acts on counts only
//! views reported since this leader's first entry.

use std::collections::BTreeMap;
use std::time::Duration;

use quorate_core::Op;
use quorate_core::election::{Decision, decide_for};
use quorate_core::group::Policy;
use quorate_core::machine::Outcome;
use quorate_core::verdict::verdict_since;
use tracing::{info, warn};

use super::Node;

/// The shortest election tick of any managed group
/// ([`Policy::election_tick_ms`] of the tightest of their policies; the
/// default policy's when there is none).
fn tick_of(node: &Node) -> Duration {
    let policy = node
        .reader
        .with_machine(|m, _| Policy::tightest(m.groups().filter(|g| g.spec.is_managed()).map(|g| &g.spec.policy)));
    Duration::from_millis(policy.election_tick_ms())
}

/// Every managed group's decision now; empty unless the machine runs on
/// this node's clock.
fn decisions(node: &Node) -> Vec<(String, Decision)> {
    let voters = node.reader.voters();
    node.reader.with_machine(|m, _| {
        let Some(now) = node.reader.own_clock_now(m) else { return Vec::new() };
        let started = m.clock_started_ms();
        m.groups()
            .filter(|g| g.spec.is_managed())
            .map(|g| {
                let v = verdict_since(g, &voters, now, Some(started));
                (g.spec.name.clone(), decide_for(g, &v, now, now.saturating_sub(started)))
            })
            .collect()
    })
}

/// Runs until the node stops.
pub async fn run_elections(node: Node) {
    let mut stopping = node.stopping.clone();
    let mut blocked: BTreeMap<String, String> = BTreeMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick_of(&node)) => {}
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
        if !node.raft.is_leader() {
            blocked.clear();
            continue;
        }
        for (group, decision) in decisions(&node) {
            match decision {
                Decision::Keep => {
                    blocked.remove(&group);
                }
                Decision::Blocked { reason, .. } => {
                    if blocked.get(&group) != Some(&reason) {
                        warn!(%group, "{reason}");
                        blocked.insert(group, reason);
                    }
                }
                Decision::Designate { kind, from, to, reason, evidence } => {
                    blocked.remove(&group);
                    info!(%group, kind = kind.as_str(), from = from.as_deref().unwrap_or("-"), %to, %reason, "designating a new primary");
                    let op = Op::Designate { group: group.clone(), kind, from, to, reason, evidence };
                    match node.propose(op).await {
                        Ok(Outcome::ElectionChanged { .. }) => {}
                        Ok(Outcome::Rejected(r)) => warn!(%group, "designation refused: {r}"),
                        Ok(other) => warn!(%group, "designation: unexpected outcome {other:?}"),
                        Err(e) => warn!(%group, "designation not committed: {e}"),
                    }
                }
            }
        }
    }
}

//! A node's standing in its cluster: a node that was removed refuses to
//! run, and says so.
//!
//! A removed node may come back with its old data (its log never saw the
//! entry that removed it, so it still believes it is a voter) or with an
//! empty directory under its old id. Either way it must not take part:
//! its stale log could vote, and an empty one would wait for ever for a
//! leader that no longer replicates to it. The cluster records every
//! removed id (derived from the membership entries, see the state
//! machine), and every node's Status answer carries the list; this task
//! asks the other nodes, and reads its own state, and stops the server
//! with an error naming the remedy (a new id) when this id is on it.
//!
//! The decision is the core's (`quorate_core::membership::standing`).

use std::time::Duration;

use quorate_core::membership::{Standing, standing};
use tokio::sync::oneshot;
use tracing::{debug, error};

use super::Node;
use super::catchup::ask_membership;

/// How often the other nodes are asked. One Status call per peer: cheap,
/// and a removal while this node runs is noticed within a few seconds.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The message a removed node stops with.
fn refusal(id: u64, told_by: &str) -> String {
    format!(
        "this node (id {id}) was removed from the cluster ({told_by}); it must not run again under this id. \
         To bring this machine back, empty its data directory and add it as a new node with a new id \
         (quorate cluster add-node --id NEW --addr HOST:PORT)"
    )
}

/// Runs until the node stops, or sends why this node may not run.
pub async fn watch(node: Node, removed: oneshot::Sender<String>) {
    let mut stopping = node.stopping.clone();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
        if let Some(why) = check(&node).await {
            error!("{why}");
            let _ = removed.send(why);
            return;
        }
    }
}

/// Why this node may not run, if a member of the cluster says it was
/// removed (its own state, or any other node's answer).
async fn check(node: &Node) -> Option<String> {
    let id = node.id;
    let own = node.reader.node_ids();
    if standing(id, &own, &node.reader.removed_nodes()) == Standing::Removed {
        return Some(refusal(id, "its own copy of the log says so"));
    }
    let peers: Vec<(u64, String)> = node.known_addrs().into_iter().filter(|(p, _)| *p != id).collect();
    let answers = futures::future::join_all(
        peers.iter().map(|(p, a)| async move { (*p, ask_membership(a, &node.transport).await) }),
    )
    .await;
    for (peer, answer) in answers {
        let Some(a) = answer.filter(|a| a.initialized) else { continue };
        let s = standing(id, &a.members, &a.removed);
        debug!(peer, standing = %s, "standing as node {peer} sees it");
        if s == Standing::Removed {
            return Some(refusal(id, &format!("node {peer} says so")));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_names_the_node_and_the_remedy() {
        let m = refusal(1, "node 2 says so");
        assert!(m.contains("(id 1) was removed from the cluster"), "{m}");
        assert!(m.contains("node 2 says so"), "{m}");
        assert!(m.contains("add-node --id NEW"), "{m}");
    }
}

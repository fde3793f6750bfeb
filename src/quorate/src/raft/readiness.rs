//! Whether this node has caught up with the cluster since it started, and
//! what it knows about its own past: shared by the service layer (reads),
//! the Raft service (votes) and the catch-up tasks that update it. The
//! rules are explained in `server::catchup`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// What an empty node knows about its past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Past {
    /// The store holds data: nothing was lost.
    Intact,
    /// The store is empty; whether the cluster has history is not known yet.
    Unknown,
    /// The store is empty but the node had data (identity file) or a peer
    /// reports history: it lost its data, or joins a running cluster.
    Lost,
    /// The store is empty and the peers that answered have no history:
    /// the cluster is being formed.
    Forming,
}

/// This node's progress, shared by the API (reads), the Raft service
/// (votes) and the tasks that update it.
#[derive(Debug)]
pub struct Readiness {
    caught_up: AtomicBool,
    past: Mutex<Past>,
    started: Instant,
}

impl Readiness {
    pub fn new(past: Past) -> Self {
        Self { caught_up: AtomicBool::new(false), past: Mutex::new(past), started: Instant::now() }
    }

    /// Whether reads from the local state may be served.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Records that this node has caught up: reads (and votes) open.
    pub fn mark_caught_up(&self) {
        self.caught_up.store(true, Ordering::Release);
    }

    /// When this node started.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn past(&self) -> Past {
        *self.past.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_past(&self, past: Past) {
        *self.past.lock().unwrap_or_else(|p| p.into_inner()) = past;
    }

    /// Why this node refuses votes now, if it does.
    pub fn vote_refusal(&self, node_id: u64) -> Option<String> {
        if self.caught_up() {
            return None;
        }
        match self.past() {
            Past::Intact | Past::Forming => None,
            Past::Unknown => Some(format!(
                "node {node_id} has no Raft data and has not yet learned whether the cluster has history; it does not vote until it knows"
            )),
            Past::Lost => Some(format!(
                "node {node_id} has no Raft data but the cluster has history; it does not vote until it is caught up"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_are_refused_only_while_an_empty_node_does_not_know_it_may() {
        for (past, refuses) in
            [(Past::Intact, false), (Past::Forming, false), (Past::Unknown, true), (Past::Lost, true)]
        {
            let r = Readiness::new(past);
            assert_eq!(r.vote_refusal(3).is_some(), refuses, "{past:?}");
            r.mark_caught_up();
            assert_eq!(r.vote_refusal(3), None, "{past:?} once caught up");
        }
    }
}

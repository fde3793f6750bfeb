//! Cluster membership: who the coordinators are, adding one (a learner
//! first, a voter once it has caught up) and removing one for good.
//!
//! The decisions (may it be removed, is it caught up, is it safe to stop a
//! node now, may this id join) are the core's (`quorate_core::membership`)
//! over what the leader measured; Raft's joint consensus does the change.
//! What lives here is the order of the steps, their bounds, and one change
//! at a time on this node (openraft interleaves concurrent changes into a
//! joint configuration neither caller asked for).
//!
//! Contact is measured twice before a removal or a "safe to stop" is
//! judged: the leader's last heartbeat acknowledgement (within a window
//! of a few heartbeats), and a direct Status call answered now by a node
//! that has caught up since it started. The acknowledgement alone still
//! looks fresh for a moment after a node dies, and says nothing about a
//! node that restarted and is still catching up: a rolling restart that
//! trusted it could stop the next node while the last one is not back.
//!
//! The membership in the log is the truth: `peers` in the configuration
//! only seeds a new cluster and helps a starting node find this one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use quorate_core::access::Action;
use quorate_core::membership::{Contact, Currency, Promotion, check_add};
use quorate_core::quorum::QuorumResult;

use super::{Node, ServiceError};
use crate::raft::MembershipView;
use crate::tls::caller::Caller;

/// How many log entries behind the leader a node may be and still count as
/// up to date: a learner this close is promoted, a voter this close counts
/// towards a quorum when a removal or a stop is judged. Replication keeps a
/// reachable node within a few entries; a node restarting or catching up
/// from a snapshot is thousands behind.
pub const MAX_LAG_ENTRIES: u64 = 100;

/// The longest one Raft membership change may take to commit.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The default and the longest wait for a new learner to catch up.
pub const DEFAULT_CATCH_UP_WAIT: Duration = Duration::from_secs(60);
pub const MAX_CATCH_UP_WAIT: Duration = Duration::from_secs(600);

/// How often a waiting add looks at the learner's progress.
const CATCH_UP_POLL: Duration = Duration::from_millis(50);

/// How long a node may take to answer the direct Status call.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The membership as the serving node (the leader) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    pub leader: Option<u64>,
    pub view: MembershipView,
    /// Every id ever removed: never to be used again.
    pub removed: BTreeSet<u64>,
}

impl Members {
    /// Leader, follower or learner.
    pub fn role(&self, id: u64) -> &'static str {
        if self.leader == Some(id) {
            "leader"
        } else if self.view.voters.contains(&id) {
            "follower"
        } else {
            "learner"
        }
    }

    pub fn currency(&self, id: u64) -> Currency {
        self.view.progress.currency(id)
    }

    /// Whether node `id` may be stopped now (a restart, an upgrade).
    pub fn safe_to_stop(&self, id: u64) -> QuorumResult {
        if self.view.joint {
            // Mid-change, the quorum arithmetic spans two configurations:
            // wait for it to settle.
            return QuorumResult::NotEnoughInformation;
        }
        self.view.progress.stop_safety(id)
    }
}

/// What an add did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    pub id: u64,
    /// It was a learner already (a retried add), or a voter already.
    pub was_member: bool,
    /// From the call to the learner being caught up.
    pub caught_up_ms: u64,
    /// From the call to it being a voter.
    pub took_ms: u64,
}

/// What a removal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub id: u64,
    /// It was a voter; false for a learner, or an id removed already.
    pub was_voter: bool,
    pub took_ms: u64,
}

impl Node {
    /// Node `id`'s address: from the membership, else from `peers` (a
    /// node that has not learned the membership yet).
    pub fn node_addr(&self, id: u64) -> Option<String> {
        self.raft.node_addr(id).or_else(|| self.peers.get(&id).cloned())
    }

    /// Every address this node knows a coordinator at: the membership's,
    /// and the `peers` seeds not removed since (a node starting up learns
    /// the membership from them).
    pub fn known_addrs(&self) -> BTreeMap<u64, String> {
        let removed = self.reader.removed_nodes();
        let mut out: BTreeMap<u64, String> =
            self.peers.iter().filter(|(id, _)| !removed.contains(id)).map(|(id, a)| (*id, a.clone())).collect();
        out.extend(self.reader.node_addrs());
        out.extend(self.raft.membership(MAX_LAG_ENTRIES).nodes);
        out
    }

    /// The membership with the leader's measurements. Only the leader
    /// measures contact and lag, so a follower answers NotLeader (the
    /// client follows the hint).
    pub async fn cluster_members(&self, caller: &Caller) -> Result<Members, ServiceError> {
        caller.check(Action::Read)?;
        let view = self.probed_membership().await?;
        Ok(Members { leader: Some(self.id), view, removed: self.reader.removed_nodes() })
    }

    /// Adds node `id` at `addr`: as a learner, then, once it has caught up
    /// (within `wait`), as a voter. A node that does not catch up in time
    /// stays a learner and the call says so; calling again continues.
    pub async fn add_node(
        &self,
        caller: &Caller,
        id: u64,
        addr: &str,
        wait: Option<Duration>,
    ) -> Result<Added, ServiceError> {
        caller.check(Action::ChangeMembership)?;
        crate::config::check_host_port("addr", addr).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let wait = wait.unwrap_or(DEFAULT_CATCH_UP_WAIT);
        if wait > MAX_CATCH_UP_WAIT {
            return Err(ServiceError::InvalidArgument(format!(
                "wait_timeout_ms: at most {} ms",
                MAX_CATCH_UP_WAIT.as_millis()
            )));
        }
        let _one_change = self.membership_lock.lock().await;
        let started = Instant::now();
        let view = self.leader_membership()?;
        let nodes: Vec<(u64, String)> = view.nodes.iter().map(|(i, a)| (*i, a.clone())).collect();
        check_add(id, addr, &nodes, &self.reader.removed_nodes())
            .map_err(|e| ServiceError::Precondition(e.to_string()))?;
        let was_member = view.nodes.contains_key(&id);
        if view.voters.contains(&id) {
            return Ok(Added { id, was_member, caught_up_ms: 0, took_ms: 0 });
        }
        if !was_member {
            self.bounded_change(self.raft.add_learner(id, addr)).await?;
            tracing::info!(node = id, addr, "added as a learner; waiting for it to catch up");
        }
        let caught_up_ms = self.wait_caught_up(id, started, wait).await?;
        self.bounded_change(self.raft.promote(id)).await?;
        let took_ms = started.elapsed().as_millis() as u64;
        tracing::info!(node = id, addr, caught_up_ms, took_ms, "promoted to voter");
        Ok(Added { id, was_member, caught_up_ms, took_ms })
    }

    /// Removes node `id` for good, unless the core refuses (it would leave
    /// too few voters for a quorum, or it is the only one up to date).
    pub async fn remove_node(&self, caller: &Caller, id: u64) -> Result<Removed, ServiceError> {
        caller.check(Action::ChangeMembership)?;
        let _one_change = self.membership_lock.lock().await;
        let started = Instant::now();
        let view = self.probed_membership().await?;
        if !view.nodes.contains_key(&id) && self.reader.removed_nodes().contains(&id) {
            // Removed already (a retry after an answer was lost): done.
            return Ok(Removed { id, was_voter: false, took_ms: 0 });
        }
        if view.joint {
            return Err(ServiceError::Precondition(
                "a membership change is under way (joint configuration); retry once it has settled".into(),
            ));
        }
        view.progress.removal(id).map_err(|e| ServiceError::Precondition(e.to_string()))?;
        let was_voter = view.voters.contains(&id);
        self.bounded_change(self.raft.remove(id, was_voter)).await?;
        let took_ms = started.elapsed().as_millis() as u64;
        tracing::warn!(node = id, was_voter, took_ms, "removed from the cluster; its id is never to be used again");
        Ok(Removed { id, was_voter, took_ms })
    }

    /// The membership with measurements, on the leader only.
    fn leader_membership(&self) -> Result<MembershipView, ServiceError> {
        if !self.raft.is_leader() {
            return Err(self.not_leader());
        }
        Ok(self.raft.membership(MAX_LAG_ENTRIES))
    }

    /// [`Self::leader_membership`], with every other node asked directly
    /// (see the module header): one that does not answer in time, or has
    /// not caught up since it started, counts as out of contact.
    async fn probed_membership(&self) -> Result<MembershipView, ServiceError> {
        let mut view = self.leader_membership()?;
        let others: Vec<(u64, String)> =
            view.nodes.iter().filter(|(id, _)| **id != self.id).map(|(id, a)| (*id, a.clone())).collect();
        let answers = futures::future::join_all(
            others.iter().map(|(id, addr)| async move { (*id, self.answers_caught_up(*id, addr).await) }),
        )
        .await;
        for (id, ok) in answers {
            if !ok && let Some(n) = view.progress.nodes.iter_mut().find(|n| n.id == id) {
                n.contact = Contact::Stale;
            }
        }
        Ok(view)
    }

    /// Whether node `id` at `addr` answers a Status call now, as itself,
    /// caught up since it started.
    async fn answers_caught_up(&self, id: u64, addr: &str) -> bool {
        let Ok(channel) = crate::wire::lazy_channel_with(addr, &self.transport) else { return false };
        let mut client = crate::pb::v1::coordinator_client::CoordinatorClient::new(channel);
        let mut req = tonic::Request::new(crate::pb::v1::StatusRequest {});
        req.set_timeout(PROBE_TIMEOUT);
        match tokio::time::timeout(PROBE_TIMEOUT, client.status(req)).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                r.node_id == id && r.caught_up
            }
            _ => false,
        }
    }

    async fn bounded_change(
        &self,
        change: impl std::future::Future<Output = Result<(), crate::raft::RaftFailure>>,
    ) -> Result<(), ServiceError> {
        match tokio::time::timeout(CHANGE_TIMEOUT, change).await {
            Ok(res) => res.map_err(|e| self.raft_error(e, true)),
            Err(_) => Err(ServiceError::OutcomeUnknown { waited_ms: CHANGE_TIMEOUT.as_millis() as u64 }),
        }
    }

    /// Waits until learner `id` may be promoted; how long since `started`.
    async fn wait_caught_up(&self, id: u64, started: Instant, wait: Duration) -> Result<u64, ServiceError> {
        let mut stopping = self.stopping.clone();
        loop {
            let view = self.leader_membership()?;
            match view.progress.promotion(id) {
                Promotion::Ready | Promotion::AlreadyVoter => return Ok(started.elapsed().as_millis() as u64),
                Promotion::NotMember => {
                    return Err(ServiceError::Precondition(format!(
                        "node {id} left the membership while it was catching up"
                    )));
                }
                Promotion::NotYet | Promotion::Unknown => {}
            }
            if started.elapsed() >= wait {
                let lag = view.progress.nodes.iter().find(|n| n.id == id).and_then(|n| n.lag_entries);
                let contact = view.last_contact.get(&id).map(|d| format!("{} ms ago", d.as_millis()));
                return Err(ServiceError::Precondition(format!(
                    "node {id} was added as a learner but has not caught up within {} ms (behind by {}, last heard {}): \
                     it stays a learner. Check that it runs at its address, then run add-node again to promote it, \
                     or remove-node to take it out",
                    wait.as_millis(),
                    lag.map_or_else(|| "an unknown number of entries".to_owned(), |l| format!("{l} entries")),
                    contact.unwrap_or_else(|| "never".into()),
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(CATCH_UP_POLL) => {}
                () = crate::shutdown::stopped(&mut stopping) => {
                    return Err(ServiceError::Stopped { node_id: self.id, detail: "shutting down".into() });
                }
            }
        }
    }
}

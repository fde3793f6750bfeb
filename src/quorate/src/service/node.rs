//! A running coordinator node as the service layer sees it: propose a command,
//! confirm a read, say who leads.
//!
//! This is where Raft's failures are translated into [`ServiceError`]s, and
//! where every write is bounded: a leader that has lost its quorum refuses
//! within one election timeout instead of letting the caller hang.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quorate_core::machine::Outcome;
use quorate_core::{Command, Op};
use tokio::sync::watch;

use super::error::{LeaderHint, ServiceError};
use super::watch::WatchSlots;
use crate::config::ServerConfig;
use crate::raft::state_machine::SmReader;
use crate::raft::{MAX_ENTRY_BYTES, NodeClock, RaftFailure, RaftNode, ReadConfirm, Readiness, encoded_len};
use crate::tls::transport::Transport;

/// The longest a write may stay pending while the leader still has its
/// quorum; past it the outcome is reported as unknown.
const WRITE_HARD_CAP: Duration = Duration::from_secs(10);

/// How a read must be confirmed before it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Confirmed by the leader lease while a quorum acknowledged recently
    /// enough, else by a quorum round.
    Linearizable,
    /// Always a quorum round after the read arrives, whatever the clocks.
    ReadIndex,
    /// The leader lease or nothing: refused while it does not cover now.
    LeaseRead,
    Stale,
}

/// One coordinator node: Raft handle, state machine reader, clock, config.
#[derive(Clone)]
pub struct Node {
    pub id: u64,
    pub raft: RaftNode,
    pub reader: Arc<SmReader>,
    pub clock: NodeClock,
    pub config: Arc<ServerConfig>,
    pub peers: BTreeMap<u64, String>,
    /// Flips to true when the node shuts down; long calls (watch, waiting
    /// acquire) end when it does.
    pub stopping: watch::Receiver<bool>,
    /// Whether this node has caught up since it started (reads, votes).
    pub readiness: Arc<Readiness>,
    /// How this node dials its peers (plain text or mutual TLS).
    pub transport: Transport,
    /// The watch streams it serves, bounded in total and per connection.
    pub watches: WatchSlots,
    /// Held by a membership change for its whole run: one at a time.
    pub membership_lock: Arc<tokio::sync::Mutex<()>>,
    /// The renewals this node confirmed as leader and has not logged yet
    /// (`quorate_core::renewals`). Locked only for pure decisions, never
    /// across an await.
    pub renewals: Arc<std::sync::Mutex<quorate_core::renewals::RenewalLedger>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Node {
    /// The leader as this node knows it, with its address.
    pub fn leader_hint(&self) -> Option<LeaderHint> {
        let leader = self.raft.leader()?;
        self.node_addr(leader).map(|addr| LeaderHint { id: leader, addr })
    }

    pub(super) fn not_leader(&self) -> ServiceError {
        let leader = self.leader_hint().filter(|l| l.id != self.id);
        ServiceError::NotLeader { node_id: self.id, leader }
    }

    /// Proposes `op`, stamped with this node's clock, and waits for the state
    /// machine's decision.
    ///
    /// Bounded: if the leader loses its quorum while the write is pending,
    /// the call fails with UNAVAILABLE (outcome unknown) within one election
    /// timeout; a write that stays pending with a quorum fails after
    /// [`WRITE_HARD_CAP`].
    pub async fn propose(&self, op: Op) -> Result<Outcome, ServiceError> {
        if *self.stopping.borrow() {
            return Err(ServiceError::Stopped { node_id: self.id, detail: "shutting down".into() });
        }
        let cmd = Command { stamp: self.clock.stamp(self.config.lease_timing()), op };
        let bytes = encoded_len(&cmd);
        if bytes > MAX_ENTRY_BYTES {
            return Err(ServiceError::TooLarge { what: op_name(&cmd.op), bytes, limit: MAX_ENTRY_BYTES });
        }
        let started = Instant::now();
        let check_every = Duration::from_millis(self.config.election_timeout_max_ms);
        let write = self.raft.write(cmd);
        tokio::pin!(write);
        loop {
            tokio::select! {
                res = &mut write => return res.map_err(|e| self.raft_error(e, true)),
                _ = tokio::time::sleep(check_every) => {
                    if !self.raft.leads_with_quorum() {
                        return Err(ServiceError::NoQuorum {
                            node_id: self.id,
                            detail: format!("no quorum acknowledgement within {} ms", self.config.election_timeout_max_ms),
                            outcome_unknown: true,
                        });
                    }
                    if started.elapsed() > WRITE_HARD_CAP {
                        return Err(ServiceError::OutcomeUnknown { waited_ms: WRITE_HARD_CAP.as_millis() as u64 });
                    }
                }
            }
        }
    }

    /// Proposes `ops` as one entry (one op as itself, more as a batch) and
    /// returns their outcomes in order.
    pub async fn propose_all(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, ServiceError> {
        let n = ops.len();
        if n == 1 {
            return self.propose(ops.into_iter().next().expect("one op")).await.map(|o| vec![o]);
        }
        match self.propose(Op::Batch(ops)).await? {
            Outcome::Batch(outcomes) if outcomes.len() == n => Ok(outcomes),
            other => Err(ServiceError::Internal(format!("a batch of {n} commands applied as {other:?}"))),
        }
    }

    /// A Raft failure as an API error; `write`: whether a write may have
    /// taken effect anyway.
    pub(super) fn raft_error(&self, e: RaftFailure, write: bool) -> ServiceError {
        match e {
            RaftFailure::NotLeader => self.not_leader(),
            RaftFailure::LeaderChanged => {
                ServiceError::NoQuorum { node_id: self.id, detail: e.to_string(), outcome_unknown: write }
            }
            RaftFailure::QuorumNotEnough(detail) => {
                ServiceError::NoQuorum { node_id: self.id, detail, outcome_unknown: write }
            }
            RaftFailure::MembershipRefused(detail) => ServiceError::Precondition(detail),
            RaftFailure::Fatal(detail) => ServiceError::Stopped { node_id: self.id, detail },
            RaftFailure::Other(detail) => ServiceError::Internal(detail),
        }
    }

    /// Refuses while this node has not caught up since it started: its
    /// state may be older than one it served before (or empty, if it lost
    /// its data). See `server::catchup`.
    pub fn ensure_caught_up(&self) -> Result<(), ServiceError> {
        if self.readiness.caught_up() {
            return Ok(());
        }
        let v = self.raft.view();
        Err(ServiceError::CatchingUp { node_id: self.id, applied: v.applied.unwrap_or(0), target: v.cluster_committed })
    }

    /// Makes a read safe to serve at `consistency` from the local state
    /// machine. Linearizable and lease reads must be served by the leader;
    /// stale reads by a node that has caught up since it started.
    ///
    /// The leader lease is openraft's (`election_timeout_max_ms`: a follower
    /// refuses votes that long after a heartbeat), used only up to
    /// `lease_timing().leader_lease_usable_us`, shortened for two clocks'
    /// drift and the lease margin; the same clock assumption every lease
    /// already rests on.
    pub async fn confirm_read(&self, consistency: ReadConsistency) -> Result<(), ServiceError> {
        let usable = Duration::from_micros(
            self.config.lease_timing().leader_lease_usable_us(self.config.election_timeout_max_ms),
        );
        if matches!(consistency, ReadConsistency::Linearizable | ReadConsistency::LeaseRead)
            && self.lease_covers_applied(usable)
        {
            return Ok(());
        }
        let how = match consistency {
            ReadConsistency::Stale => return self.ensure_caught_up(),
            ReadConsistency::Linearizable => ReadConfirm::LeaseOrRound { usable },
            ReadConsistency::ReadIndex => ReadConfirm::ReadIndex,
            ReadConsistency::LeaseRead => ReadConfirm::LeaseOnly { usable },
        };
        let bound = Duration::from_millis(self.config.election_timeout_max_ms * 2);
        match tokio::time::timeout(bound, self.raft.confirm_leadership(how)).await {
            Err(_) => Err(ServiceError::NoQuorum {
                node_id: self.id,
                detail: format!("leadership not confirmed within {} ms", bound.as_millis()),
                outcome_unknown: false,
            }),
            Ok(res) => res.map_err(|e| self.raft_error(e, false)),
        }
    }
}

impl Node {
    /// The leader lease's fast path, without a message to Raft's core (one
    /// cross-task round trip, most of a lease read's cost at one client):
    /// this node's metrics show it leads in term `T` with a quorum
    /// acknowledgement younger than `usable`, and its state machine has
    /// applied its own first entry of `T` (the machine's clock is this
    /// process's, in `T`). Then the local state holds every write
    /// acknowledged before now: one from an earlier term is below that
    /// first entry; one of `T` is this node's, applied before it was
    /// acknowledged; one of a later term needs a leader elected by a
    /// majority that shares a voter with the acknowledging quorum, which
    /// refuses votes for `election_timeout_max_ms` after acknowledging,
    /// so not before now (`usable` absorbs drift and margin; openraft's
    /// leadership transfer, whose votes skip that refusal, must stay
    /// unused while this path exists). The caller
    /// reads the state after this returns, so never an older one.
    /// `false`: confirm through openraft's core instead.
    fn lease_covers_applied(&self, usable: Duration) -> bool {
        let Some(term) = self.raft.lease_term(usable) else { return false };
        self.reader.with_machine(|m, _| {
            m.clock().is_some_and(|(base, _)| base.term == term) && self.reader.own_clock_now(m).is_some()
        })
    }
}

/// What a refused command was, for the error message.
fn op_name(op: &Op) -> String {
    match op {
        Op::Report { observer, views, .. } => {
            format!("a report by {} with {} views", short(&observer.to_string()), views.len())
        }
        Op::Refresh { observer, views, .. } => {
            format!("a refresh by {} of {} views", short(&observer.to_string()), views.len())
        }
        Op::ApplyGroup { spec } => format!("the spec of group {}", short(&spec.name)),
        Op::Batch(ops) => format!("a batch of {} commands", ops.len()),
        other => short(&format!("{other:?}")),
    }
}

/// At most 64 characters of `s`: error messages must not echo large input.
fn short(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

//! One watch: lease events from the log, expiries and verdict changes as
//! the serving node sees them, as domain events on a bounded channel (the
//! front door encodes them).
//!
//! The stream starts with the lease's current state, the election state
//! (for a managed group) and the current verdict of every member (if the
//! name is a failover group), then follows the state machine's changes; an
//! election event follows every change of designation or holder, so agents
//! learn of them within one round trip of the commit. Verdicts also change
//! with the passage of time (views go stale), so they are recomputed on
//! every change of the group and on a short timer.
//!
//! A delete of the group ends the watch, after a `Deleted` event.
//!
//! Watches are bounded: at most `max_watch_streams` on a node and
//! `max_watch_streams_per_connection` on one client connection
//! ([`WatchSlots`]). A watch's slot is held by its event stream, so it is
//! free again the moment the stream ends or the client goes away.

use crate::tls::caller::Caller;
use quorate_core::access::Action;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quorate_core::LeaseView;
use quorate_core::machine::{ChangeKind, LeaseState};
use quorate_core::names::NameKind;
use quorate_core::verdict::{GroupVerdict, MemberVerdict, Verdict, verdict};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tracing::debug;

use super::leases::check_name;
use super::limits::{Slots, SlotsFull};
use super::{Node, ServiceError};
use crate::raft::state_machine::ChangeEvent;
use crate::shutdown::stopped;

/// How often verdicts are recomputed without a change in the log.
const VERDICT_RECHECK: Duration = Duration::from_millis(200);
/// Events buffered per watch before the watcher counts as slow (the
/// watch waits for room: it never drops an event).
pub const WATCH_BUFFER: usize = 256;

/// What happened to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// The first event of every watch: the lease as it is now.
    Current,
    Acquired,
    Renewed,
    Released,
    /// The holder's TTL ran out without renewal, by the serving node's clock.
    Expired,
    /// The watcher fell behind; this is the lease as it is now.
    Resync,
    /// The group was deleted; the watch ends after this event.
    Deleted,
}

/// The election state of a managed group after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionChange {
    pub designated: Option<String>,
    pub switchover_to: Option<String>,
    /// The log index of the change (or, for the first event, the index the
    /// serving node had applied).
    pub revision: u64,
}

/// One event of a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Lease {
        kind: LeaseEvent,
        lease: LeaseView,
    },
    Election {
        change: ElectionChange,
        lease: LeaseView,
    },
    /// A member's verdict changed (`from` is None for the first one).
    Verdict {
        member: String,
        from: Option<Verdict>,
        to: MemberVerdict,
    },
}

/// The client connection a watch arrives on (its peer address), if known.
pub type Connection = Option<SocketAddr>;

/// A node's watch streams in use, in total and per connection.
#[derive(Debug, Clone)]
pub struct WatchSlots {
    slots: Arc<Mutex<Slots<SocketAddr>>>,
}

impl WatchSlots {
    /// At most `max_total` streams, `max_per_connection` on one connection.
    pub fn new(max_total: u64, max_per_connection: u64) -> Self {
        let (total, per) = (usize::try_from(max_total).unwrap_or(usize::MAX), usize::try_from(max_per_connection));
        Self { slots: Arc::new(Mutex::new(Slots::new(total, per.unwrap_or(usize::MAX)))) }
    }

    /// A slot for one more stream on `conn`, or RESOURCE_EXHAUSTED naming
    /// the limit reached.
    pub fn take(&self, conn: Connection) -> Result<WatchSlot, ServiceError> {
        let taken = self.lock().try_take(conn.as_ref());
        match taken {
            Ok(()) => Ok(WatchSlot { slots: self.clone(), conn }),
            Err(SlotsFull::PerKey { max }) => Err(ServiceError::ResourceExhausted(format!(
                "watch streams: {max} per connection in use (max_watch_streams_per_connection); close one or open another connection"
            ))),
            Err(SlotsFull::Total { max }) => Err(ServiceError::ResourceExhausted(format!(
                "watch streams: {max} in use on this node (max_watch_streams); retry later or watch through another node"
            ))),
        }
    }

    /// Streams in use.
    pub fn in_use(&self) -> usize {
        self.lock().in_use()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots<SocketAddr>> {
        // The counts stay consistent whatever panicked while holding them.
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One watch stream's slot, given back when dropped.
#[derive(Debug)]
pub struct WatchSlot {
    slots: WatchSlots,
    conn: Connection,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.slots.lock().give_back(self.conn.as_ref());
    }
}

/// A watch's events, holding its slot: dropping the stream (the client went
/// away) frees the slot and ends the watch.
#[derive(Debug)]
pub struct WatchEvents {
    rx: mpsc::Receiver<WatchEvent>,
    _slot: WatchSlot,
}

impl futures::Stream for WatchEvents {
    type Item = WatchEvent;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl Node {
    /// Starts watching `group` from this node's state (not before it has
    /// caught up), for a client on connection `conn`. The watch ends when
    /// the stream is dropped or the node stops; the caller owns nothing else.
    pub fn watch(&self, caller: &Caller, conn: Connection, group: &str) -> Result<WatchEvents, ServiceError> {
        caller.check(Action::Read)?;
        check_name(NameKind::Group, group)?;
        self.ensure_caught_up()?;
        let slot = self.watches.take(conn)?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let watch = Watch::new(self.clone(), group.to_owned(), tx);
        tokio::spawn(tracing::Instrument::in_current_span(watch.run()));
        Ok(WatchEvents { rx, _slot: slot })
    }
}

/// The state of one watch.
struct Watch {
    node: Node,
    group: String,
    tx: mpsc::Sender<WatchEvent>,
    /// The lease as last sent.
    last: LeaseView,
    /// When `last` would expire without a renewal; None once reported.
    expiry: Option<Instant>,
    /// Each member's verdict as last sent.
    verdicts: BTreeMap<String, Verdict>,
}

/// When a lease's TTL would run out without a renewal.
fn expiry_of(l: &LeaseView) -> Option<Instant> {
    (l.state == LeaseState::Held).then(|| Instant::now() + Duration::from_millis(l.remaining_ms.max(1)))
}

/// The lease event a change of the log is, if it is one.
fn lease_event_of(kind: ChangeKind) -> Option<LeaseEvent> {
    match kind {
        ChangeKind::Acquired => Some(LeaseEvent::Acquired),
        ChangeKind::Renewed => Some(LeaseEvent::Renewed),
        ChangeKind::Released => Some(LeaseEvent::Released),
        ChangeKind::GroupDeleted => Some(LeaseEvent::Deleted),
        ChangeKind::GroupApplied | ChangeKind::ViewReported | ChangeKind::ElectionChanged => None,
    }
}

impl Watch {
    fn new(node: Node, group: String, tx: mpsc::Sender<WatchEvent>) -> Self {
        let last = node.reader.lease(&group);
        Self { expiry: expiry_of(&last), node, group, tx, last, verdicts: BTreeMap::new() }
    }

    /// Runs until the watcher leaves or the node stops.
    async fn run(mut self) {
        let mut changes = self.node.reader.subscribe();
        let mut stopping = self.node.stopping.clone();
        if !self.send_start(LeaseEvent::Current).await {
            return;
        }
        // Its own handle on the channel, to notice the watcher leaving.
        let tx = self.tx.clone();
        let mut recheck = tokio::time::interval(VERDICT_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let expiry = self.expiry;
            let expire = async move {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let alive = tokio::select! {
                ev = changes.recv() => self.on_change(ev).await,
                () = expire => self.on_expiry().await,
                _ = recheck.tick() => self.send_verdict_changes().await,
                () = tx.closed() => false,
                () = stopped(&mut stopping) => false,
            };
            if !alive {
                return;
            }
        }
    }

    /// Sends an event; false once the watcher has gone.
    async fn send(&self, ev: WatchEvent) -> bool {
        self.tx.send(ev).await.is_ok()
    }

    /// The lease as it is now (as `kind`), the election and every verdict.
    async fn send_start(&mut self, kind: LeaseEvent) -> bool {
        self.last = self.node.reader.lease(&self.group);
        self.expiry = expiry_of(&self.last);
        self.send(WatchEvent::Lease { kind, lease: self.last.clone() }).await
            && self.send_election(None).await
            && self.send_verdict_changes().await
    }

    /// One change of the state machine (or the subscription's failure).
    async fn on_change(&mut self, ev: Result<ChangeEvent, broadcast::error::RecvError>) -> bool {
        match ev {
            Ok(ev) if ev.change.group == self.group => {
                // A new designation or a new holder: tell agents at once.
                let election_moved =
                    matches!(ev.change.kind, ChangeKind::ElectionChanged | ChangeKind::Acquired | ChangeKind::Released);
                let sent = match (lease_event_of(ev.change.kind), ev.change.lease) {
                    (Some(kind), Some(lease)) => {
                        self.last = lease;
                        self.expiry = expiry_of(&self.last);
                        self.send(WatchEvent::Lease { kind, lease: self.last.clone() }).await
                    }
                    _ => self.send_verdict_changes().await,
                };
                // A deleted group is not served on: the watcher is told, and
                // the stream ends (a name created again is a new group).
                let deleted = ev.change.kind == ChangeKind::GroupDeleted;
                sent && !deleted && (!election_moved || self.send_election(Some(ev.index)).await)
            }
            Ok(_) => true,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                debug!(group = self.group, skipped = n, "watcher lagged; resynchronizing");
                self.send_start(LeaseEvent::Resync).await
            }
            Err(broadcast::error::RecvError::Closed) => false,
        }
    }

    /// The lease's TTL ran out: report the expiry unless it was renewed
    /// (or changed) meanwhile.
    async fn on_expiry(&mut self) -> bool {
        let now = self.node.reader.lease(&self.group);
        let expired = now.revision == self.last.revision && now.state != LeaseState::Held;
        self.last = now;
        if expired {
            self.expiry = None;
            self.send(WatchEvent::Lease { kind: LeaseEvent::Expired, lease: self.last.clone() }).await
        } else {
            self.expiry = expiry_of(&self.last);
            true
        }
    }

    /// The election state of a managed group as of `revision` (nothing for a
    /// group that is not managed or does not exist).
    async fn send_election(&self, revision: Option<u64>) -> bool {
        let ev = self.node.reader.with_machine_at(|m, clock, applied| {
            let g = m.group(&self.group).filter(|g| g.spec.is_managed())?;
            let change = ElectionChange {
                designated: g.election.designated.clone(),
                switchover_to: g.election.switchover.as_ref().map(|s| s.to.clone()),
                revision: revision.unwrap_or(applied),
            };
            Some(WatchEvent::Election { change, lease: m.lease(&self.group, clock) })
        });
        match ev {
            Some(ev) => self.send(ev).await,
            None => true,
        }
    }

    /// The group's verdict now, if it is a failover group.
    fn current_verdict(&self) -> Option<GroupVerdict> {
        let voters = self.node.reader.voters();
        self.node.reader.with_machine(|m, _| {
            let g = m.group(&self.group)?;
            Some(verdict(g, &voters, self.node.reader.machine_now(m)))
        })
    }

    /// Sends a verdict event per member whose verdict differs from the
    /// last one sent.
    async fn send_verdict_changes(&mut self) -> bool {
        let Some(v) = self.current_verdict() else { return true };
        for mv in &v.members {
            let before = self.verdicts.get(&mv.member).copied();
            if before == Some(mv.state) {
                continue;
            }
            self.verdicts.insert(mv.member.clone(), mv.state);
            if !self.send(WatchEvent::Verdict { member: mv.member.clone(), from: before, to: mv.clone() }).await {
                return false;
            }
        }
        self.verdicts.retain(|m, _| v.member(m).is_some());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_held_until_dropped_and_refusals_name_the_limit() {
        let slots = WatchSlots::new(3, 2);
        let (a, b): (SocketAddr, SocketAddr) = ("10.0.0.1:5000".parse().unwrap(), "10.0.0.1:5001".parse().unwrap());
        let first = slots.take(Some(a)).unwrap();
        let _second = slots.take(Some(a)).unwrap();
        let e = slots.take(Some(a)).unwrap_err().to_string();
        assert!(e.starts_with("watch streams: 2 per connection in use (max_watch_streams_per_connection)"), "{e}");
        let _third = slots.take(Some(b)).unwrap();
        let e = slots.take(None).unwrap_err().to_string();
        assert!(e.starts_with("watch streams: 3 in use on this node (max_watch_streams)"), "{e}");
        drop(first);
        assert_eq!(slots.in_use(), 2);
        let _again = slots.take(Some(a)).expect("the dropped stream's slot");
    }
}

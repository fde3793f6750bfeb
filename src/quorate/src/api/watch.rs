//! One `Watch` stream: lease events from the log, expiries and verdict
//! changes as the serving node sees them.
//!
//! The stream starts with the lease's current state, the election state
//! (for a managed group) and the current verdict of every member (if the
//! name is a failover group), then follows the state machine's changes; an
//! ELECTION event follows every change of designation or holder, so agents
//! learn of them within one round trip of the commit. Verdicts also change with the passage of time
//! (views go stale), so they are recomputed on every change of the group and
//! on a short timer.

use std::collections::BTreeMap;
use std::time::Duration;

use quorate_core::LeaseView;
use quorate_core::machine::{ChangeKind, LeaseState as CoreLeaseState};
use quorate_core::verdict::{GroupVerdict, Verdict, verdict};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tonic::Status;
use tracing::debug;

use crate::pb::v1 as pb;
use crate::service::Node;
use crate::shutdown::stopped;
use crate::wire::convert::{lease_pb, member_verdict_pb, verdict_state_pb};

/// How often verdicts are recomputed without a change in the log.
const VERDICT_RECHECK: Duration = Duration::from_millis(200);

type Tx = mpsc::Sender<Result<pb::WatchEvent, Status>>;

async fn send(tx: &Tx, ev: pb::WatchEvent) -> bool {
    tx.send(Ok(ev)).await.is_ok()
}

fn lease_event(kind: pb::EventKind, lease: &LeaseView) -> pb::WatchEvent {
    pb::WatchEvent { kind: kind as i32, lease: Some(lease_pb(lease)), verdict: None, election: None }
}

/// The ELECTION event of a managed group as of `revision` (None for a
/// group that is not managed or does not exist).
fn election_event(node: &Node, group: &str, revision: Option<u64>) -> Option<pb::WatchEvent> {
    node.reader.with_machine_at(|m, clock, applied| {
        let g = m.group(group).filter(|g| g.spec.is_managed())?;
        let change = pb::ElectionChange {
            designated: g.election.designated.clone().unwrap_or_default(),
            switchover_to: g.election.switchover.as_ref().map(|s| s.to.clone()).unwrap_or_default(),
            revision: revision.unwrap_or(applied),
        };
        Some(pb::WatchEvent {
            kind: pb::EventKind::Election as i32,
            lease: Some(lease_pb(&m.lease(group, clock))),
            verdict: None,
            election: Some(change),
        })
    })
}

async fn send_election(tx: &Tx, node: &Node, group: &str, revision: Option<u64>) -> bool {
    match election_event(node, group, revision) {
        Some(ev) => send(tx, ev).await,
        None => true,
    }
}

/// The group's verdict now, if `group` is a failover group.
fn current_verdict(node: &Node, group: &str) -> Option<GroupVerdict> {
    let voters = node.reader.voters();
    node.reader.with_machine(|m, _| {
        let g = m.group(group)?;
        Some(verdict(g, &voters, node.reader.machine_now(m)))
    })
}

/// Sends a VERDICT event per member whose verdict differs from `last`.
async fn send_verdict_changes(tx: &Tx, last: &mut BTreeMap<String, Verdict>, now: Option<GroupVerdict>) -> bool {
    let Some(v) = now else { return true };
    for mv in &v.members {
        let before = last.get(&mv.member).copied();
        if before == Some(mv.state) {
            continue;
        }
        last.insert(mv.member.clone(), mv.state);
        let change = pb::VerdictChange {
            member: mv.member.clone(),
            from: before.map_or(pb::VerdictState::Unspecified, verdict_state_pb) as i32,
            to: Some(member_verdict_pb(mv)),
        };
        let ev =
            pb::WatchEvent { kind: pb::EventKind::Verdict as i32, lease: None, verdict: Some(change), election: None };
        if !send(tx, ev).await {
            return false;
        }
    }
    last.retain(|m, _| v.member(m).is_some());
    true
}

/// Runs one watch stream until the client leaves or the node stops.
#[expect(clippy::cognitive_complexity, reason = "not yet split by what it does (issue 10)")]
pub(super) async fn watch_loop(node: Node, group: String, tx: Tx) {
    let mut changes = node.reader.subscribe();
    let mut stopping = node.stopping.clone();
    let reader = node.reader.clone();
    let mut last = reader.lease(&group);
    if !send(&tx, lease_event(pb::EventKind::Current, &last)).await || !send_election(&tx, &node, &group, None).await {
        return;
    }
    let mut verdicts = BTreeMap::new();
    if !send_verdict_changes(&tx, &mut verdicts, current_verdict(&node, &group)).await {
        return;
    }
    let mut recheck = tokio::time::interval(VERDICT_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // When the lease's TTL would run out without a renewal; set whenever
    // `last` changes, cleared once the expiry is reported.
    let expiry_of = |l: &LeaseView| {
        (l.state == CoreLeaseState::Held).then(|| Instant::now() + Duration::from_millis(l.remaining_ms.max(1)))
    };
    let mut expiry = expiry_of(&last);
    loop {
        let expire = async {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let alive = tokio::select! {
            ev = changes.recv() => match ev {
                Ok(ev) if ev.change.group == group => {
                    let kind = match ev.change.kind {
                        ChangeKind::Acquired => Some(pb::EventKind::Acquired),
                        ChangeKind::Renewed => Some(pb::EventKind::Renewed),
                        ChangeKind::Released => Some(pb::EventKind::Released),
                        ChangeKind::GroupApplied | ChangeKind::ViewReported | ChangeKind::ElectionChanged => None,
                    };
                    // A new designation or a new holder: tell agents at once.
                    let election_moved = matches!(
                        ev.change.kind,
                        ChangeKind::ElectionChanged | ChangeKind::Acquired | ChangeKind::Released
                    );
                    let sent = match (kind, ev.change.lease) {
                        (Some(kind), Some(lease)) => {
                            last = lease;
                            expiry = expiry_of(&last);
                            send(&tx, lease_event(kind, &last)).await
                        }
                        _ => send_verdict_changes(&tx, &mut verdicts, current_verdict(&node, &group)).await,
                    };
                    sent && (!election_moved || send_election(&tx, &node, &group, Some(ev.index)).await)
                }
                Ok(_) => true,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    debug!(group, skipped = n, "watcher lagged; resynchronizing");
                    last = reader.lease(&group);
                    expiry = expiry_of(&last);
                    send(&tx, lease_event(pb::EventKind::Resync, &last)).await
                        && send_election(&tx, &node, &group, None).await
                        && send_verdict_changes(&tx, &mut verdicts, current_verdict(&node, &group)).await
                }
                Err(broadcast::error::RecvError::Closed) => false,
            },
            () = expire => {
                let now = reader.lease(&group);
                let expired = now.revision == last.revision && now.state != CoreLeaseState::Held;
                last = now;
                if expired {
                    expiry = None;
                    send(&tx, lease_event(pb::EventKind::Expired, &last)).await
                } else {
                    expiry = expiry_of(&last);
                    true
                }
            }
            _ = recheck.tick() => send_verdict_changes(&tx, &mut verdicts, current_verdict(&node, &group)).await,
            () = tx.closed() => false,
            () = stopped(&mut stopping) => false,
        };
        if !alive {
            return;
        }
    }
}

//! Coordinator nodes observe every member of every group, like agents do:
//! the same observation loop, over all groups at once (one read per store
//! per tick, one report per tick with changes), reporting as
//! `coordinator-N` through a client that follows the Raft leader (this node
//! may be a follower). The set of groups follows the replicated state.

use std::sync::Arc;
use std::time::Duration;

use quorate_core::group::GroupSpec;
use quorate_core::machine::ChangeKind;
use quorate_core::matrix::Observer;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, info_span, warn};

use super::Node;
use crate::agent::observer::observe;
use crate::agent::store::RedisStores;
use crate::client::Client;

/// How often the set of groups is re-read without a change event.
const RESYNC_EVERY: Duration = Duration::from_secs(1);
/// After a group change, how long more changes are gathered before the set
/// is re-read: re-reading (and re-planning the observation loop) costs
/// O(groups), so doing it per change made creating N groups cost O(N²).
const COALESCE: Duration = Duration::from_millis(200);

fn specs_of(node: &Node) -> Vec<GroupSpec> {
    node.reader.with_machine(|m, _| m.groups().map(|g| g.spec.clone()).collect())
}

/// Runs until the node stops.
pub async fn observe_groups(node: Node) {
    let endpoints: Vec<String> = node.peers.values().cloned().collect();
    let client = match Client::new(&endpoints) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            warn!("cannot observe groups: {e}");
            return;
        }
    };
    let observer = Observer::Coordinator(node.id);
    let (specs_tx, specs_rx) = watch::channel(specs_of(&node));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Dropping the set (when this task ends or is aborted) aborts the loop.
    let mut task = JoinSet::new();
    task.spawn(
        observe(observer.clone(), node.clock.boot_id(), specs_rx, None, Arc::new(RedisStores::new()), client, stop_rx)
            .instrument(info_span!("observe", observer = %observer)),
    );
    let mut changes = node.reader.subscribe();
    let mut stopping = node.stopping.clone();
    loop {
        let resync = tokio::time::sleep(RESYNC_EVERY);
        tokio::pin!(resync);
        // Wait for a spec change (or the periodic resync).
        let stop = loop {
            tokio::select! {
                ev = changes.recv() => match ev {
                    Ok(ev) if ev.change.kind != ChangeKind::GroupApplied => {}
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break false,
                    Err(broadcast::error::RecvError::Closed) => break true,
                },
                () = &mut resync => break false,
                () = crate::shutdown::stopped(&mut stopping) => break true,
            }
        };
        if stop {
            break;
        }
        // Gather the rest of a burst of changes (bounded by COALESCE).
        let gather = tokio::time::sleep(COALESCE);
        tokio::pin!(gather);
        let stop = loop {
            tokio::select! {
                ev = changes.recv() => if matches!(ev, Err(broadcast::error::RecvError::Closed)) { break true },
                () = &mut gather => break false,
                () = crate::shutdown::stopped(&mut stopping) => break true,
            }
        };
        if stop {
            break;
        }
        let specs = specs_of(&node);
        specs_tx.send_if_modified(|s| {
            let changed = *s != specs;
            if changed {
                *s = specs;
            }
            changed
        });
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), task.join_next()).await;
}

//! Coordinator nodes observe every member of every group, like agents do.
//!
//! One observation loop per group (the same loop agents run), started and
//! stopped as groups appear and disappear in the replicated state, fed spec
//! changes, reporting as `coordinator-N` through a client that follows the
//! Raft leader (this node may be a follower).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use quorate_core::group::GroupSpec;
use quorate_core::machine::ChangeKind;
use quorate_core::matrix::Observer;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span, warn};

use super::Node;
use crate::agent::observer::observe;
use crate::agent::store::RedisStores;
use crate::client::Client;

/// How often the set of groups is re-read without a change event.
const RESYNC_EVERY: Duration = Duration::from_secs(1);

struct Running {
    spec: watch::Sender<GroupSpec>,
    stop: watch::Sender<bool>,
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
    let stores = Arc::new(RedisStores::new());
    let observer = Observer::Coordinator(node.id);
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    // Dropping the set (when this task ends or is aborted) aborts every loop.
    let mut tasks = JoinSet::new();
    let mut changes = node.reader.subscribe();
    let mut stopping = node.stopping.clone();
    loop {
        let specs: BTreeMap<String, GroupSpec> =
            node.reader.with_machine(|m, _| m.groups().map(|g| (g.spec.name.clone(), g.spec.clone())).collect());
        running.retain(|name, r| {
            let keep = specs.contains_key(name);
            if !keep {
                let _ = r.stop.send(true);
            }
            keep
        });
        for (name, spec) in specs {
            match running.get(&name) {
                Some(r) => {
                    r.spec.send_if_modified(|s| {
                        let changed = *s != spec;
                        *s = spec.clone();
                        changed
                    });
                }
                None => {
                    info!(group = %name, "observing group");
                    let (spec_tx, spec_rx) = watch::channel(spec);
                    let (stop_tx, stop_rx) = watch::channel(false);
                    let span = info_span!("observe", group = %name, observer = %observer);
                    tasks.spawn(
                        observe(
                            observer.clone(),
                            node.clock.boot_id(),
                            spec_rx,
                            stores.clone(),
                            client.clone(),
                            stop_rx,
                        )
                        .instrument(span),
                    );
                    running.insert(name, Running { spec: spec_tx, stop: stop_tx });
                }
            }
        }
        // Reap finished loops without blocking.
        while tasks.try_join_next().is_some() {}
        // Wait for a spec change (or the periodic resync).
        let resync = tokio::time::sleep(RESYNC_EVERY);
        tokio::pin!(resync);
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
    }
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while tasks.join_next().await.is_some() {} }).await;
}

//! What a coordinator tells systemd ([`crate::notify`]): `READY=1` once it
//! is of use to the cluster, `WATCHDOG=1` while its Raft core runs.
//! `STOPPING=1` is sent by `run` when shutdown begins.

use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::notify::Notifier;

/// How often [`notify_ready`] looks again besides on Raft changes: the
/// catch-up task marks the node caught up just after the change that
/// shows it, so a change alone can come a moment early.
const RECHECK: Duration = Duration::from_millis(100);

/// Sends `READY=1` once this node knows a Raft leader and has caught up
/// since it started (what `/readyz` requires before its read, and what
/// stale reads wait for), so that `systemctl start` and units ordered
/// after this one wait for a node that has joined the cluster. Ends then,
/// or at stop.
pub async fn notify_ready(node: Node, notifier: Arc<Notifier>) {
    if !notifier.enabled() {
        return;
    }
    let mut watch = node.raft.watch();
    let mut stopping = node.stopping.clone();
    loop {
        let view = watch.view();
        if view.stopped.is_none()
            && node.readiness.caught_up()
            && let Some(leader) = view.leader
        {
            notifier.ready(&format!("node {} caught up; Raft leader {leader}, term {}", node.id, view.term));
            return;
        }
        tokio::select! {
            changed = watch.changed() => if !changed { return },
            () = tokio::time::sleep(RECHECK) => {}
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
    }
}

/// Sends `WATCHDOG=1` while this node's Raft core has not stopped, until
/// stop. (A stopped core makes `run` exit non-zero anyway; the watchdog
/// also catches a runtime too stuck to get that far.)
pub async fn watchdog(node: Node, notifier: Arc<Notifier>) {
    let raft = node.raft.clone();
    let healthy = move || match raft.view().stopped {
        None => Ok(()),
        Some(reason) => Err(format!("Raft stopped: {reason}")),
    };
    notifier.watchdog(healthy, node.stopping.clone()).await;
}

//! What an agent tells systemd ([`crate::notify`]): `READY=1` once it has
//! reached the cluster and, in a managed group, its role loop runs on the
//! group's election; `WATCHDOG=1` while the role loop keeps running.
//! `STOPPING=1` is sent by `run` when shutdown begins.

use std::sync::Arc;

use tokio::sync::watch;

use super::health::RoleSnapshot;
use crate::notify::Notifier;

/// Sends `READY=1`: at once for an unmanaged group (the agent read its
/// group's spec from the coordinators before it started its tasks); in a
/// managed group once the role loop has stepped with the group's election
/// as the coordinators told it (it knows who holds the lease, so it has
/// promoted, followed or fenced accordingly). Ends then, or at stop.
pub async fn notify_ready(
    member: String,
    managed: bool,
    mut snapshot: watch::Receiver<Option<RoleSnapshot>>,
    notifier: Arc<Notifier>,
    mut stop: watch::Receiver<bool>,
) {
    if !notifier.enabled() {
        return;
    }
    if !managed {
        notifier.ready(&format!("member {member}: publishing heartbeats and observing its peers"));
        return;
    }
    loop {
        let status = snapshot.borrow_and_update().as_ref().and_then(|s| {
            let e = s.machine.election()?;
            let holder = e.holder.as_deref().unwrap_or("nobody");
            Some(format!("member {member}: role loop running; lease holder {holder}, epoch {}", e.epoch))
        });
        if let Some(status) = status {
            notifier.ready(&status);
            return;
        }
        tokio::select! {
            changed = snapshot.changed() => if changed.is_err() { return },
            () = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

/// Sends `WATCHDOG=1` while the agent is alive as `/liveness` judges it:
/// in a managed group, its role loop ran within twice the lease TTL (a
/// stuck loop cannot fence or renew; systemd restarts the agent, and the
/// fencer thread's deadline fence has long applied by then). Unmanaged:
/// while its runtime runs this task.
pub async fn watchdog(
    managed: bool,
    snapshot: watch::Receiver<Option<RoleSnapshot>>,
    notifier: Arc<Notifier>,
    stop: watch::Receiver<bool>,
) {
    let healthy = move || {
        if !managed {
            return Ok(());
        }
        match snapshot.borrow().as_ref() {
            Some(s) if s.loop_alive() => Ok(()),
            Some(_) => Err("the role loop has not run within twice the lease TTL".to_owned()),
            None => Err("the role loop has not run yet".to_owned()),
        }
    };
    notifier.watchdog(healthy, stop).await;
}

//! The role loop of an agent in a managed group.
//!
//! Every heartbeat interval it reads the group's election (designated
//! member, lease holder and epoch, pending switchover) and its own data
//! service's state, and acts:
//!
//! - designated and not holding: run a lease keeper (acquire, waiting for the
//!   old lease to expire); on `Acquired`, promote;
//! - holding: keep the service's lease key fresh on every renewal; on `Lost`
//!   (renewal refused or deadline near), fence first (`CLIENT PAUSE WRITE`);
//! - not holding and someone else holds: follow them as a replica (this is
//!   also how a former primary rejoins);
//! - holding and a switchover is pending: pause writes, wait until the
//!   target has caught up, release the lease, then follow the target.
//!
//! It reports role, replication offset, link state and the epoch it last
//! synced under through `status`, and stops heartbeats (`healthy = false`)
//! while its data service is unreachable, so the member is judged down.

use std::sync::Arc;
use std::time::Duration;

use quorate_core::election::Role;
use quorate_core::group::GroupSpec;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::driver::{DriverError, RoleDriver};
use crate::client::Client;
use crate::client::keeper::{self, KeeperEvent, KeeperSpec};
use crate::pb::v1 as pb;

/// How long a switchover waits for the target to catch up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

struct Holding {
    epoch: u64,
    /// The holder's deadline, as the keeper last computed it.
    valid_until: Instant,
}

struct Keeper {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Everything the role loop needs.
#[allow(missing_debug_implementations)]
pub struct RoleLoop<D: RoleDriver> {
    pub group: String,
    pub member: String,
    pub spec: watch::Receiver<GroupSpec>,
    pub client: Arc<Client>,
    pub driver: Arc<D>,
    pub status: watch::Sender<pb::MemberStatus>,
    pub healthy: watch::Sender<bool>,
}

impl<D: RoleDriver> RoleLoop<D> {
    fn lease_ttl_ms(&self) -> u64 {
        self.spec.borrow().failover.as_ref().map_or(1_000, |f| f.lease_ttl_ms)
    }

    fn data_url(&self, member: &str) -> Option<String> {
        self.spec.borrow().member(member).and_then(|m| m.data.clone())
    }

    fn start_keeper(&self, tx: mpsc::Sender<KeeperEvent>) -> Keeper {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let client = self.client.clone();
        let spec = KeeperSpec {
            group: self.group.clone(),
            holder: self.member.clone(),
            ttl_ms: self.lease_ttl_ms(),
            wait: true,
        };
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            if let Err(e) = keeper::keep(client.as_ref(), &spec, &tx, stop).await {
                warn!("lease keeper ended: {e}");
            }
        });
        Keeper { stop: Some(stop_tx), task }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let (events_tx, mut events) = mpsc::channel::<KeeperEvent>(64);
        let mut keeper: Option<Keeper> = None;
        let mut holding: Option<Holding> = None;
        // Driver actions still owed: a promotion under the held epoch, a
        // fence after losing the lease. Failed actions are retried every
        // cycle (and reported) until they succeed or are superseded.
        let mut promote_pending = false;
        let mut fence_pending = false;
        let mut synced_epoch: Option<u64> = None;
        let mut last_run_id = String::new();
        let interval_ms = self.spec.borrow().policy.heartbeat_interval_ms;
        let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let event = tokio::select! {
                ev = events.recv() => ev,
                _ = tick.tick() => None,
                () = crate::shutdown::stopped(&mut stop) => break,
            };
            let mut result: Result<(), DriverError> = Ok(());
            if let Some(ev) = event {
                match ev {
                    KeeperEvent::Acquired { epoch, valid_until } => {
                        info!(epoch, "acquired the lease: promoting");
                        holding = Some(Holding { epoch, valid_until });
                        fence_pending = false;
                        promote_pending = true;
                    }
                    KeeperEvent::Renewed { epoch, valid_until } => {
                        if let Some(h) = holding.as_mut() {
                            h.valid_until = valid_until;
                        }
                        if !promote_pending {
                            result =
                                self.driver.renewed(epoch, valid_until.saturating_duration_since(Instant::now())).await;
                        }
                    }
                    KeeperEvent::Lost { epoch, reason } => {
                        warn!(epoch, %reason, "lease lost: fencing");
                        holding = None;
                        promote_pending = false;
                        fence_pending = true;
                    }
                    KeeperEvent::Released { epoch } => {
                        info!(epoch, "lease released");
                        holding = None;
                    }
                    KeeperEvent::Busy { .. } => {}
                }
            }
            if keeper.as_ref().is_some_and(|k| k.task.is_finished()) {
                keeper = None;
                if holding.take().is_some() {
                    promote_pending = false;
                    fence_pending = true;
                }
            }
            // Owed actions first: fencing is the most urgent.
            if fence_pending {
                result = self.driver.fence().await;
                fence_pending = result.is_err();
            }
            if let Some(h) = &holding
                && promote_pending
            {
                result = self.driver.promote(h.epoch, h.valid_until.saturating_duration_since(Instant::now())).await;
                promote_pending = result.is_err();
            }

            let svc = self.driver.state().await;
            if !svc.run_id.is_empty() {
                if !last_run_id.is_empty() && svc.run_id != last_run_id {
                    warn!("the data service restarted: it must resync before it may be primary");
                    synced_epoch = None;
                }
                last_run_id = svc.run_id.clone();
            }
            let _ = self.healthy.send(svc.reachable);

            let election = self.client.get_election(&self.group, pb::Consistency::Stale).await.ok();
            if let Some(el) = &election {
                let lease = el.lease.clone().unwrap_or_default();
                let me = self.member.as_str();
                if el.designated == me && keeper.is_none() && svc.reachable && may_take(synced_epoch, &lease, &svc) {
                    info!("designated primary: acquiring the lease");
                    keeper = Some(self.start_keeper(events_tx.clone()));
                }
                match &holding {
                    Some(h) => {
                        synced_epoch = Some(h.epoch);
                        if !el.switchover_to.is_empty() && el.switchover_to != me && !promote_pending {
                            result = self.switchover(&el.switchover_to, &mut keeper).await;
                        }
                    }
                    // Somebody else is primary: follow them (this also ends
                    // a fence: a replica refuses writes by itself).
                    None if !lease.holder.is_empty() && lease.holder != me => {
                        // Drivers that need the primary's address refuse an
                        // empty one; exec and none do not use it.
                        let url = self.data_url(&lease.holder).unwrap_or_default();
                        let followed = self.driver.follow(&url, lease.epoch).await;
                        if followed.is_ok() {
                            fence_pending = false;
                        }
                        result = result.and(followed);
                        let state = self.driver.state().await;
                        if state.role == Some(Role::Replica) && state.link_up {
                            synced_epoch = Some(lease.epoch);
                        }
                    }
                    // Nobody holds the lease: stay as we are (fenced if we
                    // lost it).
                    None => {}
                }
            }
            if let Err(e) = &result {
                warn!("role driver: {e}");
            }
            let last_error = result.err().map(|e| e.0);
            let status = pb::MemberStatus {
                role: svc.role.map_or("unknown", Role::as_str).to_owned(),
                offset: svc.offset,
                link_up: svc.link_up,
                synced_epoch,
                healthy: last_error.is_none() && svc.reachable,
                error: last_error.clone().unwrap_or_default(),
            };
            self.status.send_if_modified(|s| {
                let changed = *s != status;
                *s = status;
                changed
            });
        }
        if let Some(mut k) = keeper.take() {
            if let Some(s) = k.stop.take() {
                let _ = s.send(());
            }
            let _ = tokio::time::timeout(Duration::from_secs(3), k.task).await;
        }
    }

    /// Hands the primary role to `target`: pause writes, wait until it has
    /// everything, release the lease (the state machine designates the
    /// target in the same step). Gives up (and resumes writes) when the
    /// target does not catch up in time.
    async fn switchover(&self, target: &str, keeper: &mut Option<Keeper>) -> Result<(), DriverError> {
        // Without data URLs (exec, none) there is no offset to wait for.
        let url = self.data_url(target).unwrap_or_default();
        info!(%target, "switchover: pausing writes");
        let offset = self.driver.pause_writes().await?;
        let started = Instant::now();
        loop {
            match self.driver.offset_of(&url).await {
                Ok(o) if o >= offset => break,
                Ok(_) | Err(_) if started.elapsed() < CATCH_UP_TIMEOUT => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => {
                    let _ = self.driver.unpause().await;
                    let _ = self.client.cancel_switchover(&self.group, "target did not catch up").await;
                    return Err(DriverError(format!(
                        "switchover to {target} abandoned: it did not reach offset {offset} within {CATCH_UP_TIMEOUT:?} ({other:?})"
                    )));
                }
            }
        }
        info!(%target, offset, took_ms = started.elapsed().as_millis() as u64, "switchover: target caught up; releasing");
        if let Some(mut k) = keeper.take() {
            if let Some(s) = k.stop.take() {
                let _ = s.send(());
            }
            // The keeper releases the lease as it stops.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut k.task).await;
        }
        self.driver.follow(&url, 0).await
    }
}

/// Whether this designated member may take the lease: it synced from a
/// primary (or served as one) since its data service started, or no member
/// ever held the lease (a new group), or its service is a primary already
/// (this agent restarted beside it).
fn may_take(synced_epoch: Option<u64>, lease: &pb::Lease, svc: &super::driver::ServiceState) -> bool {
    lease.epoch == 0 || synced_epoch.is_some() || svc.role == Some(Role::Primary)
}

//! The role runtime of an agent in a managed group: executes the decisions
//! of the pure [`RoleMachine`] (in `quorate-core`).
//!
//! Four parts, each owned by [`RoleLoop::run`]:
//!
//! - the **fencer** ([`super::fence`]), on a thread of its own: stops writes
//!   at the lease deadline unless a newer deadline arrived;
//! - the **lease keeper** (started when the machine says so), which arms the
//!   fencer with every new deadline itself, before the role loop hears of
//!   it, so no work of the role loop can delay a deadline;
//! - the **election feed**: a `Watch` stream whose ELECTION events push a new
//!   designation or holder within one round trip of the commit, plus a
//!   bounded `GetElection` poll (a stream served by a lagging or isolated
//!   node would otherwise go quiet); views are ordered by revision;
//! - the **role loop** itself: feeds keeper events, election views, the data
//!   service's state and a tick into the machine, performs the actions it
//!   returns, and reports role, offset, link state and synced epoch through
//!   `status`. It stops heartbeats (`healthy = false`) while its data
//!   service is unreachable, so the member is judged down.
//!
//! Every coordinator call here is bounded below the lease's renewal
//! interval (the agent's client is built with such a call timeout).

use std::sync::Arc;
use std::time::Duration;

use quorate_core::election::{MemberStatus, Role};
use quorate_core::group::GroupSpec;
use quorate_core::role::{Action, ActionKind, ElectionView, Event, RoleMachine, ServiceView};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use super::driver::{DriverError, RoleDriver, ServiceState};
use super::fence::{FenceMode, Fencer};
use super::health::{ActionLabel, AgentMetrics, RoleSnapshot};
use crate::client::Client;
use crate::client::keeper::{self, KeeperEvent, KeeperSpec};
use crate::pb::v1 as pb;
use crate::wire::convert::status_pb;

/// How long a switchover waits for the target to catch up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the election feed also polls (a watch stream served by a
/// lagging node would go quiet).
const ELECTION_POLL: Duration = Duration::from_secs(1);

/// Pause before reopening a watch stream that failed.
const WATCH_RETRY: Duration = Duration::from_millis(200);

/// What a keeper task sends the role loop: its events, in order, then its
/// end, naming the keeper (a stopped keeper's end must not be taken for
/// that of one started after it).
enum KeeperMsg {
    Event(KeeperEvent),
    Ended(u64),
}

struct Keeper {
    id: u64,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Keeper {
    /// Stops the keeper (it releases the lease) and waits up to `bound`.
    async fn stop(mut self, bound: Duration) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(bound, &mut self.task).await;
    }
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
    pub fence_mode: FenceMode,
    /// The health endpoints' view of this loop ([`super::health`]).
    pub health: watch::Sender<Option<RoleSnapshot>>,
    /// The offset the lease holder last reported (for `/replica?lag=`).
    pub primary_offset: watch::Sender<Option<u64>>,
    pub metrics: Arc<AgentMetrics>,
}

/// The agent's monotonic clock in milliseconds, as the machine takes it.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn ms(&self, at: Instant) -> u64 {
        // Rounded down: a deadline handed on is never later than the keeper's.
        at.saturating_duration_since(self.0).as_millis() as u64
    }
    fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }
    fn instant(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

fn service_view(s: &ServiceState) -> ServiceView {
    ServiceView { reachable: s.reachable, role: s.role, link_up: s.link_up, run_id: s.run_id.clone() }
}

fn view_from(revision: u64, designated: &str, switchover_to: &str, lease: Option<&pb::Lease>) -> ElectionView {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    ElectionView {
        revision,
        designated: some(designated),
        holder: lease.and_then(|l| some(&l.holder)),
        epoch: lease.map_or(0, |l| l.epoch),
        switchover_to: some(switchover_to),
    }
}

impl<D: RoleDriver> RoleLoop<D> {
    fn lease_ttl_ms(&self) -> u64 {
        self.spec.borrow().failover.as_ref().map_or(1_000, |f| f.lease_ttl_ms)
    }

    fn data_url(&self, member: &str) -> Option<String> {
        self.spec.borrow().member(member).and_then(|m| m.data.clone())
    }

    /// A keeper task that arms the fencer with each deadline before it
    /// passes the event on.
    fn start_keeper(&self, id: u64, tx: mpsc::Sender<KeeperMsg>, fencer: Arc<Fencer>) -> Keeper {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let client = self.client.clone();
        let spec = KeeperSpec {
            group: self.group.clone(),
            holder: self.member.clone(),
            ttl_ms: self.lease_ttl_ms(),
            wait: true,
        };
        let task = tokio::spawn(
            async move {
                let (inner_tx, mut inner_rx) = mpsc::channel::<KeeperEvent>(16);
                let keep = async move {
                    let stop = async {
                        let _ = stop_rx.await;
                    };
                    if let Err(e) = keeper::keep(client.as_ref(), &spec, &inner_tx, stop).await {
                        warn!("lease keeper ended: {e}");
                    }
                };
                let forward = async {
                    while let Some(ev) = inner_rx.recv().await {
                        if let KeeperEvent::Acquired { epoch, valid_until }
                        | KeeperEvent::Renewed { epoch, valid_until } = &ev
                        {
                            fencer.arm(*epoch, *valid_until).await;
                        }
                        let _ = tx.send(KeeperMsg::Event(ev)).await;
                    }
                };
                // `keep` drops its sender when it returns, which ends `forward`.
                tokio::join!(keep, forward);
                let _ = tx.send(KeeperMsg::Ended(id)).await;
            }
            .in_current_span(),
        );
        Keeper { id, stop: Some(stop_tx), task }
    }

    /// Starts the fencer thread; `None` (after logging why) if it cannot.
    fn start_fencer(&self) -> Option<Arc<Fencer>> {
        let delay = Some(self.metrics.fence_delay.clone());
        match Fencer::spawn(self.driver.fence_ops(), self.fence_mode, tracing::Span::current(), delay) {
            Ok(f) => {
                if self.fence_mode == FenceMode::TestOnlyNever {
                    warn!("UNSAFE test-only mode: this agent never fences its data service");
                }
                Some(Arc::new(f))
            }
            Err(e) => {
                // Without a fencer the agent must never take the lease.
                warn!("cannot start the fencer thread, not taking part in elections: {e}");
                None
            }
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let Some(fencer) = self.start_fencer() else { return };
        let clock = Clock(Instant::now());
        let (events_tx, mut events) = mpsc::channel::<KeeperMsg>(64);
        let (views_tx, mut views) = watch::channel::<Option<ElectionView>>(None);
        let feed = tokio::spawn(
            feed_elections(
                self.client.clone(),
                self.group.clone(),
                views_tx,
                self.primary_offset.clone(),
                stop.clone(),
            )
            .in_current_span(),
        );
        let mut machine = RoleMachine::new(&self.member);
        let mut keeper: Option<Keeper> = None;
        let mut keepers_started = 0u64;
        let mut views_open = true;
        let mut last_error: Option<String> = None;
        let mut svc = ServiceState::default();
        let interval_ms = self.spec.borrow().policy.heartbeat_interval_ms;
        let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let event = tokio::select! {
                msg = events.recv() => match msg {
                    Some(KeeperMsg::Event(ev)) => keeper_event(&clock, ev),
                    // Ours, or one stopped on purpose (a switchover) with
                    // no other started since.
                    Some(KeeperMsg::Ended(id)) if keeper.as_ref().is_none_or(|k| k.id == id) => {
                        keeper = None;
                        Event::KeeperEnded
                    }
                    // The end of an older keeper than the running one.
                    Some(KeeperMsg::Ended(_)) | None => continue,
                },
                changed = views.changed(), if views_open => match changed {
                    Ok(()) => match views.borrow_and_update().clone() {
                        Some(v) => Event::Election(v),
                        None => continue,
                    },
                    Err(_) => {
                        // The feed ended (it only does at shutdown).
                        views_open = false;
                        continue;
                    }
                },
                _ = tick.tick() => {
                    svc = self.driver.state().await;
                    let _ = self.healthy.send(svc.reachable);
                    let actions = machine.step(clock.now_ms(), Event::Service(service_view(&svc)));
                    self.perform(&mut machine, &clock, actions, &fencer, &events_tx, &mut keeper, &mut keepers_started, &mut last_error).await;
                    Event::Tick
                }
                () = crate::shutdown::stopped(&mut stop) => break,
            };
            let actions = machine.step(clock.now_ms(), event);
            self.perform(
                &mut machine,
                &clock,
                actions,
                &fencer,
                &events_tx,
                &mut keeper,
                &mut keepers_started,
                &mut last_error,
            )
            .await;
            self.report(&machine, &svc, &last_error, clock);
        }
        if let Some(k) = keeper.take() {
            k.stop(Duration::from_secs(3)).await;
        }
        let _ = feed.await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn perform(
        &self,
        machine: &mut RoleMachine,
        clock: &Clock,
        actions: Vec<Action>,
        fencer: &Arc<Fencer>,
        events_tx: &mpsc::Sender<KeeperMsg>,
        keeper: &mut Option<Keeper>,
        keepers_started: &mut u64,
        last_error: &mut Option<String>,
    ) {
        for action in actions {
            debug!(?action, "role action");
            let (kind, result) = match action {
                Action::StartKeeper => {
                    info!("designated primary: acquiring the lease");
                    *keepers_started += 1;
                    *keeper = Some(self.start_keeper(*keepers_started, events_tx.clone(), fencer.clone()));
                    continue;
                }
                Action::ArmFence { epoch, deadline_ms } => {
                    fencer.arm(epoch, clock.instant(deadline_ms)).await;
                    continue;
                }
                Action::FenceNow => (ActionKind::Fence, fencer.fence_now().await),
                Action::Promote { epoch, .. } => {
                    info!(epoch, "holding the lease: promoting");
                    let res = match self.driver.promote(epoch).await {
                        Ok(()) => fencer.open(epoch).await,
                        Err(e) => Err(e),
                    };
                    (ActionKind::Promote, res)
                }
                Action::Follow { holder, epoch } => {
                    fencer.disarm().await;
                    // Drivers that need the primary's address refuse an
                    // empty one; exec and none do not use it.
                    let url = self.data_url(&holder).unwrap_or_default();
                    (ActionKind::Follow, self.driver.follow(&url, epoch).await)
                }
                Action::Switchover { target } => {
                    let epoch = machine.held().map_or(0, |h| h.epoch);
                    (ActionKind::Switchover, self.switchover(&target, epoch, keeper, fencer).await)
                }
            };
            if let Err(e) = &result {
                warn!("role driver: {e}");
                self.metrics.hook_failures.get_or_create(&ActionLabel { action: action_name(kind) }).inc();
            }
            *last_error = result.as_ref().err().map(|e| e.0.clone());
            let more = machine.step(clock.now_ms(), Event::Done { action: kind, ok: result.is_ok() });
            debug_assert!(more.is_empty(), "results of actions lead to no actions of their own");
        }
    }

    fn report(&self, machine: &RoleMachine, svc: &ServiceState, last_error: &Option<String>, clock: Clock) {
        let _ = self.health.send(Some(RoleSnapshot {
            machine: machine.clone(),
            origin: clock.0,
            at: Instant::now(),
            offset: svc.offset,
            last_error: last_error.clone(),
            lease_ttl_ms: self.lease_ttl_ms(),
        }));
        let status = status_pb(&MemberStatus {
            role: svc.role.unwrap_or(Role::Unknown),
            offset: svc.offset,
            link_up: svc.link_up,
            synced_epoch: machine.synced_epoch(),
            healthy: last_error.is_none() && svc.reachable,
            error: last_error.clone(),
        });
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    /// Hands the primary role to `target`: pause writes, wait until it has
    /// everything, release the lease (the state machine designates the
    /// target in the same step), follow it. Gives up (and reopens writes
    /// under the still valid lease) when the target does not catch up.
    async fn switchover(
        &self,
        target: &str,
        epoch: u64,
        keeper: &mut Option<Keeper>,
        fencer: &Fencer,
    ) -> Result<(), DriverError> {
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
                    let _ = fencer.open(epoch).await;
                    let _ = self.client.cancel_switchover(&self.group, "target did not catch up").await;
                    return Err(DriverError(format!(
                        "switchover to {target} abandoned: it did not reach offset {offset} within {CATCH_UP_TIMEOUT:?} ({other:?})"
                    )));
                }
            }
        }
        info!(%target, offset, took_ms = started.elapsed().as_millis() as u64, "switchover: target caught up; releasing");
        if let Some(k) = keeper.take() {
            // The keeper releases the lease as it stops.
            k.stop(Duration::from_secs(5)).await;
        }
        fencer.disarm().await;
        self.driver.follow(&url, 0).await
    }
}

/// An action's name, as the `action` label of hook failures.
fn action_name(kind: ActionKind) -> &'static str {
    match kind {
        ActionKind::Promote => "promote",
        ActionKind::Fence => "fence",
        ActionKind::Follow => "follow",
        ActionKind::Switchover => "switchover",
    }
}

fn keeper_event(clock: &Clock, ev: KeeperEvent) -> Event {
    match ev {
        KeeperEvent::Acquired { epoch, valid_until } => {
            info!(epoch, "acquired the lease");
            Event::Acquired { epoch, valid_until_ms: clock.ms(valid_until) }
        }
        KeeperEvent::Renewed { epoch, valid_until } => Event::Renewed { epoch, valid_until_ms: clock.ms(valid_until) },
        KeeperEvent::Lost { epoch, reason } => {
            warn!(epoch, %reason, "lease lost: fencing");
            Event::Lost { epoch }
        }
        KeeperEvent::Released { epoch } => {
            info!(epoch, "lease released");
            Event::Released { epoch }
        }
        // Only keepers that do not wait report a busy lease; ours waits.
        KeeperEvent::Busy { .. } => Event::Tick,
    }
}

/// Pushes the newest election view of `group` into `views`: from ELECTION
/// events of a watch stream, and from a bounded poll every
/// [`ELECTION_POLL`]. Only views newer than the last one pass, so a late
/// poll answer never hides a newer event.
async fn feed_elections(
    client: Arc<Client>,
    group: String,
    views: watch::Sender<Option<ElectionView>>,
    primary_offset: watch::Sender<Option<u64>>,
    mut stop: watch::Receiver<bool>,
) {
    let offer = |v: ElectionView| {
        views.send_if_modified(|cur| {
            let newer = cur.as_ref().is_none_or(|c| v.revision > c.revision || (v.revision == c.revision && v != *c));
            if newer {
                *cur = Some(v);
            }
            newer
        });
    };
    let poll = || async {
        match client.get_election(&group, pb::Consistency::Stale).await {
            Ok(el) => {
                let holder = el.lease.as_ref().map(|l| l.holder.as_str()).unwrap_or_default();
                let offset = el.members.iter().find(|m| m.member == holder).and_then(|m| m.status.as_ref());
                primary_offset.send_replace(offset.map(|s| s.offset));
                Some(view_from(el.revision, &el.designated, &el.switchover_to, el.lease.as_ref()))
            }
            Err(e) => {
                debug!("election poll failed: {e}");
                None
            }
        }
    };
    let mut polls = tokio::time::interval(ELECTION_POLL);
    polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let stream = tokio::select! {
            s = client.watch(&group) => s.map_err(|e| debug!("cannot open the election watch: {e}")).ok(),
            () = crate::shutdown::stopped(&mut stop) => return,
        };
        let Some(mut stream) = stream else {
            if let Some(v) = poll().await {
                offer(v);
            }
            tokio::select! {
                () = tokio::time::sleep(WATCH_RETRY) => continue,
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        };
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(ev)) => {
                        if let Some(e) = ev.election.as_ref().filter(|_| ev.kind == pb::EventKind::Election as i32) {
                            offer(view_from(e.revision, &e.designated, &e.switchover_to, ev.lease.as_ref()));
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
                _ = polls.tick() => {
                    if let Some(v) = poll().await {
                        offer(v);
                    }
                }
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    }
}

//! The holder side of a lease: acquire, renew, and announce loss in time.
//!
//! The rule (see `quorate_core::lease`): before each renewal the keeper takes
//! `t_send` on its own monotonic clock; after a successful renewal the lease is
//! valid until `t_send + ttl * (1 - drift) - margin`. The keeper renews every
//! quarter of the TTL, retries failed renewals until that deadline, and emits
//! [`KeeperEvent::Lost`] a little *before* the deadline (by
//! `LeaseTiming::loss_signal_lead_ms`), never after it. Every event carries
//! the deadline, so a user can also check it right before acting.
//!
//! Renewals are hedged: one that has not been answered within a third of
//! the renew interval is sent again on another connection (see
//! [`renew_hedged`]), so a lossy link does not cost the lease.

use std::future::Future;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use quorate_core::LeaseTiming;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Code;
use tracing::{debug, warn};

use super::{Client, ClientError};
use crate::pb::v1 as pb;

/// The longest a blocking Acquire waits server-side before it is re-issued
/// (a client with a short call timeout waits less: see
/// [`LeaseService::acquire_slice`]).
const ACQUIRE_WAIT_SLICE: Duration = Duration::from_secs(30);

/// The shortest server-side wait of a blocking Acquire. Short, because the
/// holder's deadline counts from the Acquire's send time: a grant that comes
/// late in a long wait leaves the new holder little slack for its first
/// renewal (on a lossy link, too little).
const ACQUIRE_WAIT_SLICE_MIN: Duration = Duration::from_millis(250);

/// How long releasing on stop may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Attempts of one renewal in flight at most, each on its own connection.
pub const RENEW_LANES: usize = 3;

/// What to hold.
#[derive(Debug, Clone)]
pub struct KeeperSpec {
    pub group: String,
    pub holder: String,
    pub ttl_ms: u64,
    /// Wait for the lease when somebody else holds it (else give up at once).
    pub wait: bool,
}

/// What happened to the lease. `valid_until` is the holder's deadline on
/// this process's monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeeperEvent {
    Acquired {
        epoch: u64,
        valid_until: Instant,
    },
    Renewed {
        epoch: u64,
        valid_until: Instant,
    },
    /// Not acquired (without `wait`): somebody else holds it.
    Busy {
        holder: Option<String>,
        epoch: u64,
        retry_after_ms: u64,
    },
    /// The lease is lost or about to lapse: stop acting as holder now.
    Lost {
        epoch: u64,
        reason: String,
    },
    /// Released on request.
    Released {
        epoch: u64,
    },
}

fn timing_of(t: Option<pb::LeaseTiming>) -> LeaseTiming {
    t.map_or_else(LeaseTiming::default, |t| LeaseTiming {
        max_clock_drift_ppm: t.max_clock_drift_ppm,
        lease_margin_ms: t.lease_margin_ms,
        test_only_skip_wait: false,
    })
}

/// The three calls a keeper makes. [`Client`] implements it against a
/// cluster; tests implement it in memory over the core state machine.
pub trait LeaseService {
    fn acquire(
        &self,
        group: &str,
        holder: &str,
        ttl_ms: u64,
        wait: Option<Duration>,
    ) -> impl Future<Output = Result<pb::AcquireResponse, ClientError>> + Send;
    /// One renewal attempt bounded by `budget`, over the connections of
    /// `lane` (`0..RENEW_LANES`; attempts on different lanes must not share
    /// a connection).
    fn renew_within(
        &self,
        group: &str,
        holder: &str,
        epoch: u64,
        budget: Duration,
        lane: usize,
    ) -> impl Future<Output = Result<pb::RenewResponse, ClientError>> + Send;
    fn release(
        &self,
        group: &str,
        holder: &str,
        epoch: u64,
    ) -> impl Future<Output = Result<pb::ReleaseResponse, ClientError>> + Send;
    /// How long one blocking Acquire may wait server-side. The whole call
    /// is bounded by this plus the client's call timeout: a waiting call
    /// sent to a node that has just been cut off costs no more than that.
    fn acquire_slice(&self) -> Duration {
        ACQUIRE_WAIT_SLICE
    }
}

impl LeaseService for Client {
    fn acquire(
        &self,
        group: &str,
        holder: &str,
        ttl_ms: u64,
        wait: Option<Duration>,
    ) -> impl Future<Output = Result<pb::AcquireResponse, ClientError>> + Send {
        Client::acquire(self, group, holder, ttl_ms, wait)
    }
    fn renew_within(
        &self,
        group: &str,
        holder: &str,
        epoch: u64,
        budget: Duration,
        lane: usize,
    ) -> impl Future<Output = Result<pb::RenewResponse, ClientError>> + Send {
        Client::renew_within(self, group, holder, epoch, budget, lane)
    }
    fn release(
        &self,
        group: &str,
        holder: &str,
        epoch: u64,
    ) -> impl Future<Output = Result<pb::ReleaseResponse, ClientError>> + Send {
        Client::release(self, group, holder, epoch)
    }
    fn acquire_slice(&self) -> Duration {
        (self.call_timeout() / 3).clamp(ACQUIRE_WAIT_SLICE_MIN, ACQUIRE_WAIT_SLICE)
    }
}

/// The holder's deadline arithmetic for one lease, on this process's clock.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    timing: LeaseTiming,
    ttl_ms: u64,
}

impl Deadline {
    fn valid_until(&self, t_send: Instant) -> Instant {
        t_send + Duration::from_millis(self.timing.holder_valid_for_ms(self.ttl_ms))
    }
    fn loss_at(&self, valid_until: Instant) -> Instant {
        valid_until - Duration::from_millis(self.timing.loss_signal_lead_ms(self.ttl_ms))
    }
    fn renew_interval(&self) -> Duration {
        Duration::from_millis(self.timing.renew_interval_ms(self.ttl_ms))
    }
    fn retry_delay(&self) -> Duration {
        (self.renew_interval() / 4).clamp(Duration::from_millis(10), Duration::from_millis(100))
    }
    /// How long a renewal may go unanswered before it is also sent on
    /// another connection: below TCP's 200 ms minimum retransmission
    /// timeout, far above a healthy cluster's few milliseconds.
    fn hedge_after(&self) -> Duration {
        (self.renew_interval() / 3).clamp(Duration::from_millis(20), Duration::from_millis(150))
    }
}

/// One renewal, hedged over connections; returns the send time of the
/// attempt that succeeded.
///
/// A lost TCP segment holds up its whole connection until it is
/// retransmitted (200 ms or more, doubling on repeats), which on a lossy link
/// can eat most of a one-second lease. So when no attempt has answered within
/// `hedge_after`, the same renewal also goes out on the next lane (its own
/// connection), up to [`RENEW_LANES`] at once. Any success will do, and the
/// lease counts from *that* attempt's send time, exactly as for a single
/// attempt: every renewal extends the lease from its own commit, which comes
/// after its send. Extra attempts are dropped once one succeeds; one that
/// still lands only extends the same epoch again, which the holder can only
/// under-use. A refusal (FAILED_PRECONDITION) ends the round at once; other
/// errors only when no attempt is left in flight. Every attempt is bounded by
/// `until`.
async fn renew_hedged<S: LeaseService>(
    client: &S,
    spec: &KeeperSpec,
    epoch: u64,
    hedge_after: Duration,
    until: Instant,
) -> Result<Instant, ClientError> {
    let mut in_flight = FuturesUnordered::new();
    let mut lane = 0;
    let mut next_hedge = Instant::now();
    let mut last_err = None;
    loop {
        let now = Instant::now();
        if lane < RENEW_LANES && now >= next_hedge && now < until {
            if lane > 0 {
                debug!(group = %spec.group, epoch, lane, "renewal unanswered; sending it on another connection too");
            }
            let attempt = client.renew_within(&spec.group, &spec.holder, epoch, until - now, lane);
            in_flight.push(async move { (now, attempt.await) });
            lane += 1;
            next_hedge = now + hedge_after;
            continue;
        }
        let hedge_pending = lane < RENEW_LANES && next_hedge < until;
        tokio::select! {
            done = in_flight.next() => match done {
                Some((t_send, Ok(_))) => return Ok(t_send),
                Some((_, Err(e @ ClientError::Status { code: Code::FailedPrecondition, .. }))) => return Err(e),
                Some((_, Err(e))) => last_err = Some(e),
                None => {
                    // Nothing in flight: every attempt so far failed.
                    let budget = until.saturating_duration_since(now);
                    return Err(last_err.unwrap_or(ClientError::Timeout { budget, last: None }));
                }
            },
            () = tokio::time::sleep_until(next_hedge), if hedge_pending => {}
        }
    }
}

/// Holds `spec`'s lease until `stop` completes (then releases it) or the
/// lease is lost. Events go to `events`; a closed receiver stops nothing.
///
/// Returns an error only when the lease could not be acquired at all.
pub async fn keep<S: LeaseService>(
    client: &S,
    spec: &KeeperSpec,
    events: &mpsc::Sender<KeeperEvent>,
    stop: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    tokio::pin!(stop);
    let keeper = Keeper { client, spec, events };
    let Some(held) = keeper.acquire(&mut stop).await? else { return Ok(()) };
    let Some(held) = keeper.confirm(held, &mut stop).await else { return Ok(()) };
    keeper.emit(KeeperEvent::Acquired { epoch: held.epoch, valid_until: held.valid_until }).await;
    keeper.hold(held, &mut stop).await;
    Ok(())
}

/// One keeper's fixed inputs: the service it calls, the lease it holds and
/// where its events go. Its steps are [`Keeper::acquire`],
/// [`Keeper::confirm`] and [`Keeper::hold`], in that order; each that ends
/// the keeper has sent its last event already.
struct Keeper<'a, S> {
    client: &'a S,
    spec: &'a KeeperSpec,
    events: &'a mpsc::Sender<KeeperEvent>,
}

/// A lease the keeper holds, with its deadline and next renewal on this
/// process's clock.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    deadline: Deadline,
    valid_until: Instant,
    next_renew: Instant,
}

impl Held {
    /// A lease granted by an Acquire sent at `t_send`.
    fn granted(epoch: u64, deadline: Deadline, t_send: Instant) -> Self {
        Self {
            epoch,
            deadline,
            valid_until: deadline.valid_until(t_send),
            next_renew: t_send + deadline.renew_interval(),
        }
    }
    /// The lease counts from `t_send` again: the send time of a successful
    /// renewal.
    fn counted_from(&mut self, t_send: Instant) {
        *self = Self::granted(self.epoch, self.deadline, t_send);
    }
}

impl<S: LeaseService> Keeper<'_, S> {
    async fn emit(&self, ev: KeeperEvent) {
        debug!(?ev, "lease keeper");
        let _ = self.events.send(ev).await;
    }

    /// Acquires the lease, in server-side wait slices while `spec.wait`.
    /// `None` when stopped first, or when somebody else holds it and we do
    /// not wait (then [`KeeperEvent::Busy`] is sent).
    async fn acquire(&self, stop: &mut (impl Future<Output = ()> + Unpin)) -> Result<Option<Held>, ClientError> {
        let spec = self.spec;
        loop {
            let t_send = Instant::now();
            let wait = spec.wait.then(|| self.client.acquire_slice());
            let resp = tokio::select! {
                r = self.client.acquire(&spec.group, &spec.holder, spec.ttl_ms, wait) => r?,
                () = &mut *stop => return Ok(None),
            };
            let lease = resp.lease.unwrap_or_default();
            if resp.acquired {
                let deadline = Deadline { timing: timing_of(resp.timing), ttl_ms: spec.ttl_ms };
                return Ok(Some(Held::granted(lease.epoch, deadline, t_send)));
            }
            if !spec.wait {
                let holder = (!lease.holder.is_empty()).then_some(lease.holder);
                self.emit(KeeperEvent::Busy { holder, epoch: lease.epoch, retry_after_ms: resp.retry_after_ms }).await;
                return Ok(None);
            }
        }
    }

    /// After a long server-side wait the deadline computed from the
    /// Acquire's send time is (nearly) gone, though the grant itself is
    /// recent: confirm with a renewal sent now before acting as holder.
    /// `None` when the confirmation failed (then [`KeeperEvent::Lost`] is
    /// sent) or `stop` came first (then the lease is released).
    async fn confirm(&self, mut held: Held, stop: &mut (impl Future<Output = ()> + Unpin)) -> Option<Held> {
        let deadline = held.deadline;
        if deadline.loss_at(held.valid_until) > Instant::now() + deadline.renew_interval() {
            return Some(held);
        }
        let until = Instant::now() + Duration::from_millis(deadline.timing.holder_valid_for_ms(self.spec.ttl_ms)) / 2;
        let res = tokio::select! {
            r = renew_hedged(self.client, self.spec, held.epoch, deadline.hedge_after(), until) => r,
            () = &mut *stop => {
                self.release(held.epoch).await;
                return None;
            }
        };
        match res {
            Ok(t_send) => {
                held.counted_from(t_send);
                Some(held)
            }
            Err(e) => {
                let reason = format!("acquired after a long wait, but the confirming renewal failed: {e}");
                self.emit(KeeperEvent::Lost { epoch: held.epoch, reason }).await;
                None
            }
        }
    }

    /// Renews every renew interval, retrying failures until the loss
    /// signal is due; returns once the lease is lost (announced) or, on
    /// `stop`, released.
    async fn hold(&self, mut held: Held, stop: &mut (impl Future<Output = ()> + Unpin)) {
        let (epoch, deadline) = (held.epoch, held.deadline);
        loop {
            let loss_at = deadline.loss_at(held.valid_until);
            if Instant::now() >= loss_at {
                let reason = "the lease could not be renewed before its deadline".into();
                self.emit(KeeperEvent::Lost { epoch, reason }).await;
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(held.next_renew.min(loss_at)) => {}
                () = &mut *stop => return self.release(epoch).await,
            }
            let now = Instant::now();
            if now >= loss_at || now < held.next_renew {
                continue;
            }
            let res = tokio::select! {
                r = renew_hedged(self.client, self.spec, epoch, deadline.hedge_after(), loss_at) => r,
                () = &mut *stop => return self.release(epoch).await,
            };
            match res {
                Ok(t_send) => {
                    held.counted_from(t_send);
                    self.emit(KeeperEvent::Renewed { epoch, valid_until: held.valid_until }).await;
                }
                Err(ClientError::Status { code: Code::FailedPrecondition, message, .. }) => {
                    self.emit(KeeperEvent::Lost { epoch, reason: message }).await;
                    return;
                }
                Err(e) => {
                    warn!(group = %self.spec.group, epoch, "renewal failed, retrying until the deadline: {e}");
                    held.next_renew = Instant::now() + deadline.retry_delay();
                }
            }
        }
    }

    async fn release(&self, epoch: u64) {
        let spec = self.spec;
        match tokio::time::timeout(RELEASE_TIMEOUT, self.client.release(&spec.group, &spec.holder, epoch)).await {
            Ok(Ok(_)) => self.emit(KeeperEvent::Released { epoch }).await,
            Ok(Err(e)) => {
                let reason = format!("release failed ({e}); the lease will expire");
                self.emit(KeeperEvent::Lost { epoch, reason }).await;
            }
            Err(_) => {
                self.emit(KeeperEvent::Lost { epoch, reason: "release timed out; the lease will expire".into() }).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The keeper against an in-memory lease service built on the real core
    //! state machine, under tokio's paused clock: timing is exact and
    //! repeatable, and the service's grants follow the same rules as the
    //! cluster's.

    use std::sync::Mutex;

    use quorate_core::machine::{LogPosition, Outcome};
    use quorate_core::{Command, LeaderStamp, Machine, Op};

    use super::*;
    use crate::wire::lease_pb;

    /// The core machine behind the keeper's three calls, with a switch that
    /// makes renewals fail as if the cluster were unreachable, and one that
    /// stalls the connections of some lanes as a lost segment would.
    struct MemService {
        machine: Mutex<(Machine, u64)>,
        start: Instant,
        latency: Duration,
        unreachable_from: Mutex<Option<Instant>>,
        stalled_lanes: Mutex<Vec<usize>>,
        /// Renewal attempts per lane.
        attempts: Mutex<[usize; RENEW_LANES]>,
    }

    impl MemService {
        fn new() -> Self {
            Self {
                machine: Mutex::new((Machine::new(), 0)),
                start: Instant::now(),
                latency: Duration::from_millis(2),
                unreachable_from: Mutex::new(None),
                stalled_lanes: Mutex::new(Vec::new()),
                attempts: Mutex::new([0; RENEW_LANES]),
            }
        }

        fn apply(&self, op: Op) -> Outcome {
            let mut guard = self.machine.lock().unwrap();
            let (m, index) = &mut *guard;
            *index += 1;
            let now_ms = self.start.elapsed().as_millis() as u64;
            let stamp = LeaderStamp { node_id: 1, boot_id: 1, now_ms, timing: LeaseTiming::default(), wall_ms: 0 };
            m.apply(LogPosition { index: *index, term: 1, leader_node_id: 1 }, &Command { stamp, op }).outcome
        }

        fn unreachable(&self) -> bool {
            self.unreachable_from.lock().unwrap().is_some_and(|t| Instant::now() >= t)
        }
    }

    fn unavailable() -> ClientError {
        ClientError::Unavailable { attempts: 1, last: "unreachable".into() }
    }

    fn rejected(o: Outcome) -> ClientError {
        ClientError::Status { code: Code::FailedPrecondition, message: format!("{o:?}"), current_epoch: None }
    }

    impl LeaseService for MemService {
        async fn acquire(
            &self,
            group: &str,
            holder: &str,
            ttl_ms: u64,
            wait: Option<Duration>,
        ) -> Result<pb::AcquireResponse, ClientError> {
            let deadline = Instant::now() + wait.unwrap_or_default();
            loop {
                tokio::time::sleep(self.latency).await;
                let op = Op::Acquire { group: group.into(), holder: holder.into(), ttl_ms };
                match self.apply(op) {
                    Outcome::Granted(v) => {
                        return Ok(pb::AcquireResponse {
                            acquired: true,
                            lease: Some(lease_pb(&v)),
                            ..Default::default()
                        });
                    }
                    Outcome::Held { current, .. } if Instant::now() >= deadline => {
                        return Ok(pb::AcquireResponse { lease: Some(lease_pb(&current)), ..Default::default() });
                    }
                    Outcome::Held { .. } => tokio::time::sleep(Duration::from_millis(10)).await,
                    other => return Err(rejected(other)),
                }
            }
        }

        async fn renew_within(
            &self,
            group: &str,
            holder: &str,
            epoch: u64,
            budget: Duration,
            lane: usize,
        ) -> Result<pb::RenewResponse, ClientError> {
            self.attempts.lock().unwrap()[lane] += 1;
            if self.stalled_lanes.lock().unwrap().contains(&lane) {
                tokio::time::sleep(budget).await;
                return Err(ClientError::Timeout { budget, last: None });
            }
            if self.unreachable() {
                tokio::time::sleep(budget.min(Duration::from_millis(50))).await;
                return Err(unavailable());
            }
            tokio::time::sleep(self.latency).await;
            match self.apply(Op::Renew { group: group.into(), holder: holder.into(), epoch }) {
                Outcome::Renewed(v) => Ok(pb::RenewResponse { lease: Some(lease_pb(&v)), timing: None }),
                other => Err(rejected(other)),
            }
        }

        async fn release(&self, group: &str, holder: &str, epoch: u64) -> Result<pb::ReleaseResponse, ClientError> {
            match self.apply(Op::Release { group: group.into(), holder: holder.into(), epoch }) {
                Outcome::Released(v) => Ok(pb::ReleaseResponse { lease: Some(lease_pb(&v)) }),
                other => Err(rejected(other)),
            }
        }
    }

    fn spec(holder: &str, wait: bool) -> KeeperSpec {
        KeeperSpec { group: "g".into(), holder: holder.into(), ttl_ms: 1000, wait }
    }

    /// Runs a keeper for `run_for` (or until it ends) and returns its events
    /// with the instant each was received.
    async fn run_keeper(svc: &MemService, spec: KeeperSpec, run_for: Duration) -> Vec<(Instant, KeeperEvent)> {
        let (tx, mut rx) = mpsc::channel(1024);
        let keeper = keep(svc, &spec, &tx, tokio::time::sleep(run_for));
        tokio::pin!(keeper);
        let mut events = Vec::new();
        loop {
            tokio::select! {
                res = &mut keeper => { res.unwrap(); break; }
                Some(ev) = rx.recv() => events.push((Instant::now(), ev)),
            }
        }
        while let Ok(ev) = rx.try_recv() {
            events.push((Instant::now(), ev));
        }
        events
    }

    #[tokio::test(start_paused = true)]
    async fn renews_every_quarter_of_the_ttl_and_releases_on_stop() {
        let svc = MemService::new();
        let events = run_keeper(&svc, spec("a", false), Duration::from_secs(3)).await;
        assert!(matches!(events[0].1, KeeperEvent::Acquired { epoch: 1, .. }), "{events:?}");
        let renewals: Vec<Instant> =
            events.iter().filter(|(_, e)| matches!(e, KeeperEvent::Renewed { .. })).map(|(t, _)| *t).collect();
        assert!(renewals.len() >= 10, "expected a renewal every ~250 ms, got {}", renewals.len());
        for w in renewals.windows(2) {
            let gap = w[1] - w[0];
            assert!(gap >= Duration::from_millis(248) && gap <= Duration::from_millis(258), "gap {gap:?}");
        }
        assert!(matches!(events.last().unwrap().1, KeeperEvent::Released { epoch: 1 }), "{events:?}");
        assert_eq!(svc.apply(Op::LeaderStart), Outcome::LeaderStarted);
        let m = svc.machine.lock().unwrap();
        assert_eq!(m.0.lease("g", quorate_core::machine::ReaderClock::Unknown).holder, None);
    }

    /// The cluster becomes unreachable: the keeper announces the loss before
    /// its deadline, and a waiting acquirer only gets the lease after that.
    #[tokio::test(start_paused = true)]
    async fn loss_is_signalled_before_the_deadline_and_before_anyone_else_holds() {
        let svc = MemService::new();
        *svc.unreachable_from.lock().unwrap() = Some(Instant::now() + Duration::from_millis(1_200));
        let events = run_keeper(&svc, spec("a", false), Duration::from_secs(10)).await;
        let last_valid = events
            .iter()
            .filter_map(|(_, e)| match e {
                KeeperEvent::Acquired { valid_until, .. } | KeeperEvent::Renewed { valid_until, .. } => {
                    Some(*valid_until)
                }
                _ => None,
            })
            .max()
            .expect("the lease was held");
        let (lost_at, lost) = events.last().unwrap().clone();
        assert!(matches!(lost, KeeperEvent::Lost { epoch: 1, .. }), "{events:?}");
        assert!(lost_at < last_valid, "loss announced at {lost_at:?}, after the deadline {last_valid:?}");
        let lead = LeaseTiming::default().loss_signal_lead_ms(1000);
        assert_eq!(last_valid - lost_at, Duration::from_millis(lead));

        // Another holder, waiting, gets the lease only once the first could
        // no longer act.
        *svc.unreachable_from.lock().unwrap() = None;
        let events_b = run_keeper(&svc, spec("b", true), Duration::from_secs(3)).await;
        let (acquired_at, ev) = &events_b[0];
        assert!(matches!(ev, KeeperEvent::Acquired { epoch: 2, .. }), "{events_b:?}");
        assert!(*acquired_at > last_valid, "b acquired at {acquired_at:?} while a was valid until {last_valid:?}");
    }

    /// A connection that stops answering (a lost segment waiting for its
    /// retransmission) does not cost the lease: the renewal goes out on
    /// another lane and the lease counts from that attempt's send time.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_connection_is_hedged_on_another() {
        let svc = MemService::new();
        *svc.stalled_lanes.lock().unwrap() = vec![0];
        let events = run_keeper(&svc, spec("a", false), Duration::from_secs(5)).await;
        assert!(matches!(events[0].1, KeeperEvent::Acquired { epoch: 1, .. }), "{events:?}");
        assert!(matches!(events.last().unwrap().1, KeeperEvent::Released { epoch: 1 }), "{events:?}");
        assert!(!events.iter().any(|(_, e)| matches!(e, KeeperEvent::Lost { .. })), "{events:?}");
        let renewals: Vec<(Instant, Instant)> = events
            .iter()
            .filter_map(|(t, e)| match e {
                KeeperEvent::Renewed { valid_until, .. } => Some((*t, *valid_until)),
                _ => None,
            })
            .collect();
        assert!(renewals.len() >= 10, "{events:?}");
        // Each renewal counts from the hedge's send time (one hedge delay
        // after the stalled attempt went out), not from the stalled send.
        let d = Deadline { timing: LeaseTiming::default(), ttl_ms: 1000 };
        let valid_for = Duration::from_millis(d.timing.holder_valid_for_ms(1000));
        for (received, valid_until) in &renewals {
            let sent = *valid_until - valid_for;
            assert!(sent <= *received && *received - sent <= svc.latency, "sent {sent:?}, answered {received:?}");
        }
        let attempts = *svc.attempts.lock().unwrap();
        assert!(attempts[0] >= renewals.len() && attempts[1] >= renewals.len(), "{attempts:?}");
        assert_eq!(attempts[2], 0, "a third lane is only for when two stall: {attempts:?}");

        // With every lane stalled the keeper still announces the loss in
        // time, having tried each lane once per round.
        let svc = MemService::new();
        let events = {
            let stall_all = async {
                tokio::time::sleep(Duration::from_millis(1_200)).await;
                *svc.stalled_lanes.lock().unwrap() = (0..RENEW_LANES).collect();
            };
            let (events, ()) = tokio::join!(run_keeper(&svc, spec("a", false), Duration::from_secs(10)), stall_all);
            events
        };
        let last_valid = events
            .iter()
            .filter_map(|(_, e)| match e {
                KeeperEvent::Renewed { valid_until, .. } => Some(*valid_until),
                _ => None,
            })
            .max()
            .expect("renewed before the stall");
        let (lost_at, lost) = events.last().unwrap();
        assert!(matches!(lost, KeeperEvent::Lost { epoch: 1, .. }), "{events:?}");
        assert!(*lost_at < last_valid, "{events:?}");
        assert!(svc.attempts.lock().unwrap().iter().all(|&n| n >= 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_renewal_is_a_loss_at_once() {
        let svc = MemService::new();
        let keeper_a = run_keeper(&svc, spec("a", false), Duration::from_secs(5));
        // Somebody with the same holder name takes a fresh epoch: a's epoch
        // is stale and its next renewal is refused.
        let thief = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            svc.apply(Op::Acquire { group: "g".into(), holder: "a".into(), ttl_ms: 1000 })
        };
        let (events, stolen) = tokio::join!(keeper_a, thief);
        assert!(matches!(stolen, Outcome::Granted(_)));
        let (_, last) = events.last().unwrap();
        assert!(matches!(last, KeeperEvent::Lost { epoch: 1, reason } if reason.contains("NotHolder")), "{events:?}");
        assert!(events.len() <= 4, "{events:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_wait_a_held_lease_is_reported_busy() {
        let svc = MemService::new();
        svc.apply(Op::Acquire { group: "g".into(), holder: "other".into(), ttl_ms: 1000 });
        let events = run_keeper(&svc, spec("a", false), Duration::from_secs(1)).await;
        assert!(
            matches!(&events[..], [(_, KeeperEvent::Busy { holder: Some(h), epoch: 1, .. })] if h == "other"),
            "{events:?}"
        );
    }

    /// After a long server-side wait the keeper confirms with a fresh
    /// renewal, so its deadline counts from after the grant, not from when
    /// it started waiting.
    #[tokio::test(start_paused = true)]
    async fn a_long_wait_is_confirmed_by_a_renewal_before_acting() {
        let svc = MemService::new();
        let holder_a = run_keeper(&svc, spec("a", false), Duration::from_secs(2));
        let waiter_b = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            run_keeper(&svc, spec("b", true), Duration::from_secs(3)).await
        };
        let (events_a, events_b) = tokio::join!(holder_a, waiter_b);
        let (released_at, _) = events_a.last().unwrap();
        assert!(matches!(events_a.last().unwrap().1, KeeperEvent::Released { epoch: 1 }), "{events_a:?}");
        let (acquired_at, ev) = &events_b[0];
        let KeeperEvent::Acquired { epoch: 2, valid_until } = ev else { panic!("{events_b:?}") };
        assert!(acquired_at >= released_at);
        let valid_for = LeaseTiming::default().holder_valid_for_ms(1000);
        assert!(*valid_until >= *released_at + Duration::from_millis(valid_for), "{valid_until:?}");
        assert!(events_b.iter().any(|(_, e)| matches!(e, KeeperEvent::Renewed { epoch: 2, .. })));
    }
}

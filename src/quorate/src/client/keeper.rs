//! The holder side of a lease: acquire, renew, and announce loss in time.
//!
//! The rule (see `quorate_core::lease`): before each renewal the keeper takes
//! `t_send` on its own monotonic clock; after a successful renewal the lease is
//! valid until `t_send + ttl * (1 - drift) - margin`. The keeper renews every
//! third of the TTL, retries failed renewals until that deadline, and emits
//! [`KeeperEvent::Lost`] a little *before* the deadline (by
//! `LeaseTiming::loss_signal_lead_ms`), never after it. Every event carries
//! the deadline, so a user can also check it right before acting.

use std::future::Future;
use std::time::{Duration, Instant};

use quorate_core::LeaseTiming;
use tokio::sync::mpsc;
use tonic::Code;
use tracing::{debug, warn};

use super::{Client, ClientError};
use crate::pb::v1 as pb;

/// How long one blocking Acquire waits server-side before it is re-issued.
const ACQUIRE_WAIT_SLICE: Duration = Duration::from_secs(30);

/// How long releasing on stop may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

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
    Acquired { epoch: u64, valid_until: Instant },
    Renewed { epoch: u64, valid_until: Instant },
    /// Not acquired (without `wait`): somebody else holds it.
    Busy { holder: Option<String>, epoch: u64, retry_after_ms: u64 },
    /// The lease is lost or about to lapse: stop acting as holder now.
    Lost { epoch: u64, reason: String },
    /// Released on request.
    Released { epoch: u64 },
}

fn timing_of(t: Option<pb::LeaseTiming>) -> LeaseTiming {
    t.map_or_else(LeaseTiming::default, |t| LeaseTiming {
        max_clock_drift_ppm: t.max_clock_drift_ppm,
        lease_margin_ms: t.lease_margin_ms,
    })
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
}

/// Holds `spec`'s lease until `stop` completes (then releases it) or the
/// lease is lost. Events go to `events`; a closed receiver stops nothing.
///
/// Returns an error only when the lease could not be acquired at all.
pub async fn keep(
    client: &Client,
    spec: &KeeperSpec,
    events: &mpsc::Sender<KeeperEvent>,
    stop: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    tokio::pin!(stop);
    let emit = |ev: KeeperEvent| async move {
        debug!(?ev, "lease keeper");
        let _ = events.send(ev).await;
    };

    // Acquire.
    let (epoch, deadline, t_acquire) = loop {
        let t_send = Instant::now();
        let wait = spec.wait.then_some(ACQUIRE_WAIT_SLICE);
        let resp = tokio::select! {
            r = client.acquire(&spec.group, &spec.holder, spec.ttl_ms, wait) => r?,
            () = &mut stop => return Ok(()),
        };
        let lease = resp.lease.unwrap_or_default();
        if resp.acquired {
            let deadline = Deadline { timing: timing_of(resp.timing), ttl_ms: spec.ttl_ms };
            break (lease.epoch, deadline, t_send);
        }
        if !spec.wait {
            let holder = (!lease.holder.is_empty()).then_some(lease.holder);
            emit(KeeperEvent::Busy { holder, epoch: lease.epoch, retry_after_ms: resp.retry_after_ms }).await;
            return Ok(());
        }
    };
    let mut valid_until = deadline.valid_until(t_acquire);
    let mut next_renew = t_acquire + deadline.renew_interval();
    // A long server-side wait leaves little of the deadline computed from
    // the send time: then renew at once, and announce after that renewal.
    let mut announced = deadline.loss_at(valid_until) > Instant::now() + deadline.renew_interval();
    if announced {
        emit(KeeperEvent::Acquired { epoch, valid_until }).await;
    } else {
        next_renew = Instant::now();
    }

    loop {
        let loss_at = deadline.loss_at(valid_until);
        if Instant::now() >= loss_at {
            emit(KeeperEvent::Lost { epoch, reason: "the lease could not be renewed before its deadline".into() })
                .await;
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep_until(next_renew.min(loss_at).into()) => {}
            () = &mut stop => return release(client, spec, epoch, &emit).await,
        }
        let t_send = Instant::now();
        if t_send >= loss_at || t_send < next_renew {
            continue;
        }
        let budget = loss_at - t_send;
        let res = tokio::select! {
            r = client.renew_within(&spec.group, &spec.holder, epoch, budget) => r,
            () = &mut stop => return release(client, spec, epoch, &emit).await,
        };
        match res {
            Ok(_) => {
                valid_until = deadline.valid_until(t_send);
                next_renew = t_send + deadline.renew_interval();
                if announced {
                    emit(KeeperEvent::Renewed { epoch, valid_until }).await;
                } else {
                    announced = true;
                    emit(KeeperEvent::Acquired { epoch, valid_until }).await;
                }
            }
            Err(ClientError::Status { code: Code::FailedPrecondition, message, .. }) => {
                emit(KeeperEvent::Lost { epoch, reason: message }).await;
                return Ok(());
            }
            Err(e) => {
                warn!(group = %spec.group, epoch, "renewal failed, retrying until the deadline: {e}");
                next_renew = Instant::now() + deadline.retry_delay();
            }
        }
    }
}

async fn release<F, Fut>(client: &Client, spec: &KeeperSpec, epoch: u64, emit: &F) -> Result<(), ClientError>
where
    F: Fn(KeeperEvent) -> Fut,
    Fut: Future<Output = ()>,
{
    match tokio::time::timeout(RELEASE_TIMEOUT, client.release(&spec.group, &spec.holder, epoch)).await {
        Ok(Ok(_)) => emit(KeeperEvent::Released { epoch }).await,
        Ok(Err(e)) => {
            emit(KeeperEvent::Lost { epoch, reason: format!("release failed ({e}); the lease will expire") }).await
        }
        Err(_) => emit(KeeperEvent::Lost { epoch, reason: "release timed out; the lease will expire".into() }).await,
    }
    Ok(())
}

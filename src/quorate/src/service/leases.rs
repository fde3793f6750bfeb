//! Lease operations: acquire (optionally waiting), renew, release, read.
//!
//! The state machine decides every grant (`Machine::acquire`). Renewals
//! are confirmed by the leader without a log entry each when it can
//! (`quorate_core::renewals` decides, [`Node::renew`] does the I/O; the
//! server's renewal flusher logs them in batches). What also lives here is
//! the waiting protocol of a blocking Acquire: while somebody else
//! holds the lease, the leader sleeps until the lease could be granted (the
//! machine's `grantable_at_ms`, read from the replicated state on the
//! machine's own clock) or until a change to the group could free it
//! sooner, instead of writing a refused Acquire to the log every time.

use crate::tls::caller::Caller;
use quorate_core::access::Action;
use std::time::{Duration, Instant};

use quorate_core::machine::{ChangeKind, Outcome, Rejection};
use quorate_core::names::{self, NameKind};
use quorate_core::renewals::RenewDecision;
use quorate_core::{LeaseView, Op};
use tokio::sync::broadcast;

use super::{Node, ReadConsistency, ServiceError};

/// The default and the largest wait of a blocking Acquire.
pub const DEFAULT_ACQUIRE_WAIT: Duration = Duration::from_secs(30);
pub const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(300);

/// What a caller asks of Acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireRequest {
    pub group: String,
    pub holder: String,
    pub ttl_ms: u64,
    /// Wait for the lease while somebody else holds it.
    pub wait: bool,
    /// How long to wait at most; 0: [`DEFAULT_ACQUIRE_WAIT`], capped at
    /// [`MAX_ACQUIRE_WAIT`].
    pub wait_timeout_ms: u64,
}

/// What Acquire answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub acquired: bool,
    pub lease: LeaseView,
    /// When not acquired: how long until the lease could be granted.
    pub retry_after_ms: u64,
}

/// A name checked as the API and the state machine check it.
pub fn check_name(kind: NameKind, name: &str) -> Result<(), ServiceError> {
    names::validate(kind, name).map_err(|e| ServiceError::InvalidArgument(e.to_string()))
}

/// A state-machine rejection as a service error.
pub fn rejection(r: Rejection) -> ServiceError {
    let message = r.to_string();
    match r {
        Rejection::NotHolder { current, .. } => ServiceError::NotHolder { message, current_epoch: current.epoch },
        Rejection::Expired { epoch, .. } => ServiceError::Expired { message, current_epoch: epoch },
        Rejection::InvalidName(_)
        | Rejection::ZeroTtl
        | Rejection::TtlTooShort { .. }
        | Rejection::InvalidSpec(_)
        | Rejection::UnknownObserver { .. } => ServiceError::InvalidArgument(message),
        Rejection::UnknownGroup { .. } => ServiceError::NotFound(message),
        Rejection::InvalidTarget(_) => ServiceError::InvalidArgument(message),
        // A holder that is not (or no longer) designated must stop acting:
        // FAILED_PRECONDITION, like a stale epoch.
        Rejection::NotDesignated { .. } => ServiceError::NotHolder { message, current_epoch: 0 },
        Rejection::NotManaged { .. }
        | Rejection::StaleDecision { .. }
        | Rejection::FailoverBlocked { .. }
        | Rejection::InMaintenance { .. }
        | Rejection::LivePrimary { .. } => ServiceError::Precondition(message),
        Rejection::EpochExhausted { .. } | Rejection::ForeignStamp { .. } | Rejection::NestedBatch => {
            ServiceError::Internal(message)
        }
    }
}

/// An outcome the operation cannot have produced.
pub(super) fn unexpected(what: &str, other: &Outcome) -> ServiceError {
    ServiceError::Internal(format!("unexpected outcome of {what}: {other:?}"))
}

impl Node {
    /// Refuses a lease TTL outside this server's bounds, naming the bound.
    pub fn check_ttl(&self, ttl_ms: u64) -> Result<(), ServiceError> {
        let (min, max) = (self.config.min_lease_ttl_ms, self.config.max_lease_ttl_ms);
        if ttl_ms == 0 {
            return Err(ServiceError::InvalidArgument("ttl_ms must be positive".into()));
        }
        if ttl_ms > max {
            return Err(ServiceError::InvalidArgument(format!(
                "ttl_ms {ttl_ms} is above the maximum lease TTL of {max} ms (max_lease_ttl_ms)"
            )));
        }
        if ttl_ms < min {
            return Err(ServiceError::InvalidArgument(format!(
                "ttl_ms {ttl_ms} is below the minimum lease TTL of {min} ms (min_lease_ttl_ms)"
            )));
        }
        Ok(())
    }

    /// When this node leads on its own clock and somebody other than
    /// `holder` holds the lease: how long until it could be granted. Lets a
    /// waiting Acquire sleep without writing to the log.
    fn local_wait_ms(&self, group: &str, holder: &str) -> Option<u64> {
        if !self.raft.is_leader() {
            return None;
        }
        let timing = self.config.lease_timing();
        self.reader.with_machine(|m, _| {
            let now = self.reader.own_clock_now(m)?;
            // Counting the renewals this leader confirmed and has not
            // logged: the machine alone would grant too early.
            self.renewals.lock().unwrap_or_else(|p| p.into_inner()).grant_wait_ms(m, now, group, holder, timing)
        })
    }

    /// Acquires `r.group`'s lease for `r.holder`, waiting while somebody
    /// else holds it if asked to.
    pub async fn acquire(&self, caller: &Caller, r: AcquireRequest) -> Result<Acquired, ServiceError> {
        check_name(NameKind::Group, &r.group)?;
        check_name(NameKind::Holder, &r.holder)?;
        caller.check(Action::Lease { group: &r.group, holder: &r.holder })?;
        self.check_ttl(r.ttl_ms)?;
        let wait_for = match r.wait_timeout_ms {
            0 => DEFAULT_ACQUIRE_WAIT,
            ms => Duration::from_millis(ms).min(MAX_ACQUIRE_WAIT),
        };
        let deadline = Instant::now() + wait_for;
        let not_acquired = |lease: LeaseView, retry_after_ms: u64| Acquired { acquired: false, lease, retry_after_ms };
        // Subscribe before the first attempt so a release in between is seen.
        let mut changes = self.reader.subscribe();
        loop {
            let wait_ms = match self.local_wait_ms(&r.group, &r.holder) {
                Some(ms) if !r.wait => return Ok(not_acquired(self.reader.lease(&r.group), ms)),
                Some(ms) => ms,
                None => {
                    let op = Op::Acquire { group: r.group.clone(), holder: r.holder.clone(), ttl_ms: r.ttl_ms };
                    match self.propose(op).await? {
                        Outcome::Granted(lease) => return Ok(Acquired { acquired: true, lease, retry_after_ms: 0 }),
                        Outcome::Held { current, grantable_at_ms } => {
                            let now = self.reader.with_machine(|m, _| self.reader.own_clock_now(m));
                            let ms = now.map_or(0, |now| grantable_at_ms.saturating_sub(now));
                            if !r.wait {
                                return Ok(not_acquired(current, ms));
                            }
                            ms.max(1)
                        }
                        Outcome::Rejected(rej) => return Err(rejection(rej)),
                        other => return Err(unexpected("Acquire", &other)),
                    }
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(not_acquired(self.reader.lease(&r.group), wait_ms));
            }
            let sleep = Duration::from_millis(wait_ms).min(deadline - now);
            self.wait_for_grantable(&r.group, sleep, &mut changes).await?;
        }
    }

    /// Waits until `sleep` has passed or a change to `group` could make
    /// its lease grantable sooner (a release frees it at once).
    async fn wait_for_grantable(
        &self,
        group: &str,
        sleep: Duration,
        changes: &mut broadcast::Receiver<crate::raft::state_machine::ChangeEvent>,
    ) -> Result<(), ServiceError> {
        let sleep = tokio::time::sleep(sleep);
        tokio::pin!(sleep);
        let mut stopping = self.stopping.clone();
        loop {
            tokio::select! {
                () = &mut sleep => return Ok(()),
                ev = changes.recv() => match ev {
                    // Only a change that can make the lease grantable
                    // sooner is worth another proposal: reports and the
                    // holder's renewals are not (each proposal is a Raft
                    // write, slow on a lossy link).
                    Ok(ev) if ev.change.group != group
                        || matches!(ev.change.kind, ChangeKind::ViewReported | ChangeKind::Renewed) => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(ServiceError::Stopped { node_id: self.id, detail: "state machine closed".into() });
                    }
                },
                () = crate::shutdown::stopped(&mut stopping) => {
                    return Err(ServiceError::Stopped { node_id: self.id, detail: "shutting down".into() });
                }
            }
        }
    }

    /// Renews `holder`'s lease of `group` at `epoch`.
    pub async fn renew(
        &self,
        caller: &Caller,
        group: String,
        holder: String,
        epoch: u64,
    ) -> Result<LeaseView, ServiceError> {
        check_name(NameKind::Group, &group)?;
        check_name(NameKind::Holder, &holder)?;
        caller.check(Action::Lease { group: &group, holder: &holder })?;
        if let Some(decision) = self.renew_unlogged(&group, &holder, epoch).await? {
            match decision {
                RenewDecision::Confirmed(lease) => return Ok(lease),
                RenewDecision::Rejected(rej) => return Err(rejection(rej)),
                RenewDecision::Durable => {}
            }
        }
        match self.propose(Op::Renew { group, holder, epoch }).await? {
            Outcome::Renewed(lease) => Ok(lease),
            Outcome::Rejected(rej) => Err(rejection(rej)),
            other => Err(unexpected("Renew", &other)),
        }
    }

    /// A renewal confirmed without a log entry, as `quorate_core::renewals`
    /// lays out: the receipt time on this leader's clock, then leadership
    /// confirmed after it (the leader lease, or a quorum round shared with
    /// concurrent renewals and reads when the lease does not cover it),
    /// then the check against the machine as applied then.
    /// `None` when this node cannot (not the leader, its first entry of the
    /// term not applied, or `durable_renewals`): the renewal is logged.
    async fn renew_unlogged(
        &self,
        group: &str,
        holder: &str,
        epoch: u64,
    ) -> Result<Option<RenewDecision>, ServiceError> {
        if self.config.durable_renewals || !self.raft.is_leader() {
            return Ok(None);
        }
        let received = self.reader.with_machine(|m, _| Some((m.clock()?.0, self.reader.own_clock_now(m)?)));
        let Some((base, t_recv)) = received else { return Ok(None) };
        self.confirm_read(ReadConsistency::Linearizable).await?;
        Ok(Some(self.reader.with_machine(|m, _| {
            self.renewals.lock().unwrap_or_else(|p| p.into_inner()).renew(m, base, t_recv, group, holder, epoch)
        })))
    }

    /// Releases `holder`'s lease of `group` at `epoch`.
    pub async fn release(
        &self,
        caller: &Caller,
        group: String,
        holder: String,
        epoch: u64,
    ) -> Result<LeaseView, ServiceError> {
        check_name(NameKind::Group, &group)?;
        check_name(NameKind::Holder, &holder)?;
        caller.check(Action::Lease { group: &group, holder: &holder })?;
        match self.propose(Op::Release { group, holder, epoch }).await? {
            Outcome::Released(lease) => Ok(lease),
            Outcome::Rejected(rej) => Err(rejection(rej)),
            other => Err(unexpected("Release", &other)),
        }
    }

    /// `group`'s lease, read at `consistency`.
    pub async fn read_lease(
        &self,
        caller: &Caller,
        group: &str,
        consistency: ReadConsistency,
    ) -> Result<LeaseView, ServiceError> {
        caller.check(Action::Read)?;
        check_name(NameKind::Group, group)?;
        self.confirm_read(consistency).await?;
        Ok(self.reader.lease(group))
    }
}

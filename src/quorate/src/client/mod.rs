//! The Rust client: a list of endpoints, leader following, typed calls.
//!
//! A call goes to the node that answered last (usually the leader). When a
//! node answers UNAVAILABLE with a leader hint, the client retries on the
//! hinted leader; when a node cannot be reached, it tries the next endpoint.
//! Attempts are bounded (a few rounds over the endpoints), and so is each
//! attempt (a per-call timeout; renewals bound each attempt more tightly).
//!
//! A node that leaves an attempt unanswered (an isolated or paused leader:
//! its packets are dropped, so nothing is refused) becomes a *suspect* for
//! a while: later calls try the other nodes first, so one dead leader does
//! not cost every call its whole timeout. Renewal lanes start at different
//! nodes, and the third looks past suspects and slow nodes, so the keeper's
//! hedged renewals also probe for a new leader.

pub mod cluster;
pub mod keeper;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::pb::v1 as pb;
use crate::pb::v1::coordinator_client::CoordinatorClient;
use crate::tls::transport::Transport;
use crate::wire::{CURRENT_EPOCH_HEADER, LEADER_ADDR_HEADER, lazy_channel_with};

/// The default bound on one attempt of a call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a full round over the endpoints without success.
const ROUND_BACKOFF: Duration = Duration::from_millis(50);

/// Upper bound on attempts of one call, whatever its time budget.
const MAX_ATTEMPTS: usize = 1_000;

/// How long a node that left an attempt unanswered is tried last.
const SUSPECT_FOR: Duration = Duration::from_secs(2);

/// Bounds on one attempt of a renewal: well above TCP's 200 ms minimum
/// retransmission timeout, so that on a lossy link an attempt is not given
/// up just before its retransmitted segment arrives. A silent leader is
/// looked past by the probing lane meanwhile.
const RENEW_ATTEMPT_MIN: Duration = Duration::from_millis(400);

/// What an Acquire may take beyond its server-side wait.
const ACQUIRE_COMMIT_ALLOWANCE: Duration = Duration::from_secs(1);

/// A renewal unanswered for an eighth of its budget, at most this long,
/// marks its node slow (the attempt goes on): before the keeper's hedges,
/// so the prober (the third attempt) already looks elsewhere.
const RENEW_SLOW_AFTER_MAX: Duration = Duration::from_millis(90);

/// How a call's attempts go.
#[derive(Debug, Clone, Copy)]
struct Attempts {
    /// The bound on one attempt; an unanswered attempt moves on to the next
    /// node, and may still take effect, so only idempotent calls may bound
    /// attempts below their budget.
    bound: Duration,
    /// Mark a node suspect when an attempt is unanswered this long.
    slow_after: Option<Duration>,
    /// Look for a new leader: skip suspects and hints to them.
    probe: bool,
}

impl Attempts {
    fn whole(budget: Duration) -> Self {
        Self { bound: budget, slow_after: None, probe: false }
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given: pass --endpoints HOST:PORT,... or set QUORATE_ENDPOINTS")]
    NoEndpoints,
    #[error("invalid endpoint {addr:?}: {message}")]
    BadEndpoint { addr: String, message: String },
    /// The server answered with an error status.
    #[error("{message}")]
    Status {
        code: Code,
        message: String,
        /// The lease's current epoch, on FAILED_PRECONDITION.
        current_epoch: Option<u64>,
    },
    /// No endpoint could serve the call within the bounded attempts.
    #[error("no node could serve the call ({attempts} attempts); last error: {last}")]
    Unavailable { attempts: usize, last: String },
    /// The call's budget ran out; `last` is the last failure seen before,
    /// if any (a refused TLS handshake, an unreachable node), so that the
    /// cause is not lost behind the timeout.
    #[error("the call did not complete within {budget:?}{}; a write may still take effect", last_text(.last))]
    Timeout { budget: Duration, last: Option<String> },
    /// A streamed transfer (a snapshot) broke off or did not add up.
    #[error("snapshot transfer failed: {0}")]
    Transfer(String),
}

fn last_text(last: &Option<String>) -> String {
    last.as_ref().map(|l| format!(" (last error: {l})")).unwrap_or_default()
}

impl ClientError {
    /// The gRPC code, for scripts (`UNAVAILABLE`, `INVALID_ARGUMENT`, ...).
    pub fn code(&self) -> Code {
        match self {
            ClientError::Status { code, .. } => *code,
            ClientError::Unavailable { .. } => Code::Unavailable,
            ClientError::Timeout { .. } => Code::DeadlineExceeded,
            ClientError::NoEndpoints | ClientError::BadEndpoint { .. } => Code::InvalidArgument,
            ClientError::Transfer(_) => Code::DataLoss,
        }
    }

    fn from_status(s: &Status) -> Self {
        let current_epoch = s.metadata().get(CURRENT_EPOCH_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
        ClientError::Status { code: s.code(), message: s.message().to_owned(), current_epoch }
    }
}

/// A client of a quorate cluster.
#[derive(Debug)]
pub struct Client {
    endpoints: Vec<String>,
    /// One connection per (address, lane). Lane 0 carries every call; the
    /// lease keeper hedges renewals on further lanes, since a second TCP
    /// connection is not held up by the first one's lost segment.
    channels: Mutex<HashMap<(String, usize), Channel>>,
    /// The address that answered last; tried first.
    preferred: Mutex<Option<String>>,
    /// Addresses that left an attempt unanswered, and when: tried last.
    suspects: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Addresses with an attempt slow to answer, and when: the probing lane
    /// looks past them (a lossy link makes the leader slow, not silent, so
    /// the other lanes keep going to it first).
    slow: Mutex<HashMap<String, tokio::time::Instant>>,
    call_timeout: Duration,
    /// Plain text or mutual TLS, for every connection this client opens.
    transport: Transport,
}

impl Client {
    /// A client for `endpoints` (HOST:PORT each) over plain text. Connects
    /// lazily.
    pub fn new(endpoints: &[String]) -> Result<Self, ClientError> {
        Self::new_with(endpoints, Transport::Insecure)
    }

    /// A client for `endpoints` (HOST:PORT each) over `transport`. Connects
    /// lazily.
    pub fn new_with(endpoints: &[String], transport: Transport) -> Result<Self, ClientError> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()).collect();
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let client = Self {
            endpoints,
            channels: Mutex::new(HashMap::new()),
            preferred: Mutex::new(None),
            suspects: Mutex::new(HashMap::new()),
            slow: Mutex::new(HashMap::new()),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            transport,
        };
        for e in client.endpoints.clone() {
            client.channel(&e, 0)?;
        }
        Ok(client)
    }

    /// Parses a comma-separated endpoint list.
    pub fn from_list(list: &str) -> Result<Self, ClientError> {
        let endpoints: Vec<String> = list.split(',').map(str::to_owned).collect();
        Self::new(&endpoints)
    }

    /// Sets the bound on each attempt.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The bound on each call (renewals and waiting acquires excepted).
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A holder name this client may take leases as, unique to `instance`:
    /// `NAME@instance` under a client certificate named NAME (the names it
    /// may hold as; `quorate_core::access`), `instance` otherwise.
    pub fn holder_for(&self, instance: &str) -> String {
        match &self.transport {
            Transport::Tls(tls) => match tls.own_identity() {
                Ok(quorate_core::access::Identity::Client { name, .. }) => {
                    format!("{name}{}{instance}", quorate_core::access::INSTANCE_SEPARATOR)
                }
                _ => instance.to_owned(),
            },
            Transport::Insecure => instance.to_owned(),
        }
    }

    /// The error of a status that ends a call, with a hint when it says
    /// the two ends speak different protocols.
    fn status_error(&self, status: &Status) -> ClientError {
        let mut e = ClientError::from_status(status);
        if let (ClientError::Status { message, .. }, Some(hint)) = (&mut e, self.protocol_hint(status.message())) {
            message.push_str(hint);
        }
        e
    }

    /// What to say when a call failed because the two ends speak different
    /// protocols: plain text reaching a TLS port fails in HTTP/2 (or, when
    /// the server's refusal closes the connection first, as a canceled
    /// operation: CI saw both), TLS reaching a plain-text port fails in the
    /// handshake.
    fn protocol_hint(&self, message: &str) -> Option<&'static str> {
        match &self.transport {
            Transport::Insecure
                if message.contains("h2 protocol error") || message.contains("operation was canceled") =>
            {
                Some(
                    " (this client speaks plain text (--insecure), and the cluster probably serves mutual TLS: \
                 give --ca, --cert and --key instead)",
                )
            }
            Transport::Tls(_) if message.contains("InvalidContentType") || message.contains("corrupt message") => {
                Some(" (this client speaks TLS, and the cluster probably serves plain text (started --insecure))")
            }
            _ => None,
        }
    }

    /// Another client of the same endpoints over the same transport, with
    /// connections of its own (the benchmarks' concurrent clients).
    pub fn another(&self) -> Result<Self, ClientError> {
        Ok(Self::new_with(&self.endpoints, self.transport.clone())?.with_call_timeout(self.call_timeout))
    }

    fn channel(&self, addr: &str, lane: usize) -> Result<Channel, ClientError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr.to_owned(), lane);
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let c = lazy_channel_with(addr, &self.transport)
            .map_err(|e| ClientError::BadEndpoint { addr: addr.into(), message: e.to_string() })?;
        channels.insert(key, c.clone());
        Ok(c)
    }

    /// A raw gRPC client for one address (status queries of each node).
    pub fn raw(&self, addr: &str) -> Result<CoordinatorClient<Channel>, ClientError> {
        Ok(CoordinatorClient::new(self.channel(addr, 0)?))
    }

    /// The order to try addresses in: the preferred one first, suspects
    /// last; lane `k` starts `k` places further along, so attempts on
    /// different lanes ask different nodes first.
    fn candidates(&self, lane: usize) -> Vec<String> {
        let preferred = self.preferred.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out: Vec<String> = preferred.into_iter().collect();
        for e in &self.endpoints {
            if !out.contains(e) {
                out.push(e.clone());
            }
        }
        let now = tokio::time::Instant::now();
        let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        suspects.retain(|_, since| now.duration_since(*since) < SUSPECT_FOR);
        // Stable: the order among trusted (and among suspect) nodes is kept.
        out.sort_by_key(|a| suspects.contains_key(a));
        drop(suspects);
        let trusted = out.len();
        out.rotate_left(lane % trusted.max(1));
        out
    }

    /// Whether a prober should look past `addr`: it left an attempt
    /// unanswered or slow to answer lately.
    fn is_suspect(&self, addr: &str) -> bool {
        let recent = |m: &Mutex<HashMap<String, tokio::time::Instant>>| {
            let m = m.lock().unwrap_or_else(|p| p.into_inner());
            m.get(addr).is_some_and(|since| since.elapsed() < SUSPECT_FOR)
        };
        recent(&self.suspects) || recent(&self.slow)
    }

    fn slow(&self, addr: &str) {
        self.slow.lock().unwrap_or_else(|p| p.into_inner()).insert(addr.to_owned(), tokio::time::Instant::now());
    }

    /// `queue` without suspects, unless that leaves nobody.
    fn trusted(&self, queue: Vec<String>) -> Vec<String> {
        let trusted: Vec<String> = queue.iter().filter(|a| !self.is_suspect(a)).cloned().collect();
        if trusted.is_empty() { queue } else { trusted }
    }

    fn suspect(&self, addr: &str) {
        let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        suspects.insert(addr.to_owned(), tokio::time::Instant::now());
        let mut preferred = self.preferred.lock().unwrap_or_else(|p| p.into_inner());
        if preferred.as_deref() == Some(addr) {
            *preferred = None;
        }
    }

    fn answered(&self, addr: String) {
        self.suspects.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
        self.slow.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
        *self.preferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
    }

    /// Runs `f` against the cluster, following leader hints, until it
    /// succeeds, fails for good, or `budget` runs out.
    ///
    /// UNAVAILABLE (not the leader, no quorum, connection refused) is
    /// retried: on the hinted leader first, unless that address just failed
    /// to answer, else on the next endpoint, pausing after each full round
    /// without success (an election may be running). Any other status is
    /// final. Bounded by `budget` and by [`MAX_ATTEMPTS`].
    async fn call<T, F, Fut>(&self, budget: Duration, f: F) -> Result<T, ClientError>
    where
        F: FnMut(CoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_on(0, budget, Attempts::whole(budget), f).await
    }

    /// [`Client::call`] over the connections of `lane`, attempts as `how`
    /// says.
    async fn call_on<T, F, Fut>(&self, lane: usize, budget: Duration, how: Attempts, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(CoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + budget;
        let attempt = how.bound;
        let mut queue = self.candidates(lane);
        if how.probe {
            queue = self.trusted(queue);
        }
        let mut next_in_queue = 0;
        let mut hinted: Option<String> = None;
        let mut unanswered: Vec<String> = Vec::new();
        let mut last = String::from("no attempt made");
        let mut attempts = 0;
        while attempts < MAX_ATTEMPTS {
            attempts += 1;
            let addr = hinted.take().unwrap_or_else(|| {
                next_in_queue += 1;
                queue[(next_in_queue - 1) % queue.len()].clone()
            });
            let client = CoordinatorClient::new(self.channel(&addr, lane)?);
            let attempt_until = deadline.min(tokio::time::Instant::now() + attempt);
            let fut = f(client);
            tokio::pin!(fut);
            let answer = match how.slow_after {
                Some(slow) => tokio::select! {
                    r = tokio::time::timeout_at(attempt_until, &mut fut) => r,
                    () = tokio::time::sleep(slow) => {
                        // Still unanswered: the prober should look elsewhere.
                        self.slow(&addr);
                        tokio::time::timeout_at(attempt_until, &mut fut).await
                    }
                },
                None => tokio::time::timeout_at(attempt_until, &mut fut).await,
            };
            let status = match answer {
                Err(_) => {
                    self.suspect(&addr);
                    if attempt_until >= deadline {
                        let last = (attempts > 1).then(|| last.clone());
                        return Err(ClientError::Timeout { budget, last });
                    }
                    last = format!("{addr}: no answer within {attempt:?}");
                    if !unanswered.contains(&addr) {
                        unanswered.push(addr);
                    }
                    continue;
                }
                Ok(Ok(resp)) => {
                    self.answered(addr);
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => status,
            };
            // A connection that broke mid-call (the node died) surfaces as
            // Unknown with a transport source: as retryable as Unavailable.
            let broken = status.code() == Code::Unknown && std::error::Error::source(&status).is_some();
            if status.code() != Code::Unavailable && !broken {
                return Err(self.status_error(&status));
            }
            last = format!("{addr}: {}{}", status.message(), self.protocol_hint(status.message()).unwrap_or_default());
            let hint = status.metadata().get(LEADER_ADDR_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            if hint.is_none() && !unanswered.contains(&addr) {
                // Either unreachable or no leader known there; do not chase
                // hints to it until a full round has passed.
                unanswered.push(addr.clone());
            }
            // A prober does not follow hints to a node that leaves calls
            // unanswered: the followers name their old leader until their
            // election timeout, and the point of probing is to find the new one.
            let hint = hint.filter(|h| !(how.probe && self.is_suspect(h)));
            match hint {
                Some(leader) if leader != addr && !unanswered.contains(&leader) => hinted = Some(leader),
                _ if next_in_queue % queue.len() == 0 => {
                    // A full round without success: an election is probably
                    // running. Pause, then start over with a clean slate.
                    unanswered.clear();
                    if how.probe {
                        queue = self.trusted(self.candidates(lane));
                        next_in_queue = 0;
                    }
                    let pause = tokio::time::Instant::now() + ROUND_BACKOFF;
                    if pause >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(pause).await;
                }
                _ => {}
            }
        }
        Err(ClientError::Unavailable { attempts, last })
    }

    /// Acquires `group`'s lease. With `wait`, blocks server-side for up to
    /// `wait_timeout` until granted.
    pub async fn acquire(
        &self,
        group: &str,
        holder: &str,
        ttl_ms: u64,
        wait: Option<Duration>,
    ) -> Result<pb::AcquireResponse, ClientError> {
        let req = pb::AcquireRequest {
            group: group.into(),
            holder: holder.into(),
            ttl_ms,
            wait: wait.is_some(),
            wait_timeout_ms: wait.map_or(0, |w| w.as_millis().max(1) as u64),
        };
        // The commit at the end of a wait may cross a lossy link: allow it
        // a second even when the client's calls are bounded tighter.
        let timeout = self.call_timeout.max(ACQUIRE_COMMIT_ALLOWANCE) + wait.unwrap_or_default();
        self.call(timeout, |mut c| {
            let req = req.clone();
            async move { c.acquire(req).await }
        })
        .await
    }

    pub async fn renew(&self, group: &str, holder: &str, epoch: u64) -> Result<pb::RenewResponse, ClientError> {
        self.renew_within(group, holder, epoch, self.call_timeout, 0).await
    }

    /// Renews with an explicit bound (the lease keeper passes the time left
    /// before its deadline) over the connections of `lane` (0 is the one
    /// every other call uses).
    pub async fn renew_within(
        &self,
        group: &str,
        holder: &str,
        epoch: u64,
        timeout: Duration,
        lane: usize,
    ) -> Result<pb::RenewResponse, ClientError> {
        let req = pb::RenewRequest { group: group.into(), holder: holder.into(), epoch };
        // Lanes beyond the keeper's share connections: the cache stays bounded.
        let lane = lane % keeper::RENEW_LANES;
        // A renewal is idempotent: an unanswered attempt may move on. Lanes
        // 0 and 1 go where hints point (lane 1 over a connection of its own,
        // for a lossy link); lane 2 probes for a new leader.
        let how = Attempts {
            bound: (timeout / 3).max(RENEW_ATTEMPT_MIN),
            slow_after: Some((timeout / 8).min(RENEW_SLOW_AFTER_MAX)),
            probe: lane == 2,
        };
        self.call_on(lane, timeout, how, |mut c| {
            let req = req.clone();
            async move { c.renew(req).await }
        })
        .await
    }

    pub async fn release(&self, group: &str, holder: &str, epoch: u64) -> Result<pb::ReleaseResponse, ClientError> {
        let req = pb::ReleaseRequest { group: group.into(), holder: holder.into(), epoch };
        self.unary(req, |mut c, r| async move { c.release(r).await }).await
    }

    pub async fn get_lease(
        &self,
        group: &str,
        consistency: pb::Consistency,
    ) -> Result<pb::GetLeaseResponse, ClientError> {
        let req = pb::GetLeaseRequest { group: group.into(), consistency: consistency as i32 };
        self.unary(req, |mut c, r| async move { c.get_lease(r).await }).await
    }

    /// Opens a watch stream on whichever node answers first.
    pub async fn watch(&self, group: &str) -> Result<tonic::Streaming<pb::WatchEvent>, ClientError> {
        let req = pb::WatchRequest { group: group.into() };
        self.unary(req, |mut c, r| async move { c.watch(r).await }).await
    }

    /// Creates or changes a failover group.
    pub async fn apply_group(&self, spec: pb::GroupSpec) -> Result<pb::ApplyGroupResponse, ClientError> {
        let req = pb::ApplyGroupRequest { spec: Some(spec) };
        self.unary(req, |mut c, r| async move { c.apply_group(r).await }).await
    }

    pub async fn get_group(
        &self,
        name: &str,
        consistency: pb::Consistency,
    ) -> Result<pb::GetGroupResponse, ClientError> {
        let req = pb::GetGroupRequest { name: name.into(), consistency: consistency as i32 };
        self.unary(req, |mut c, r| async move { c.get_group(r).await }).await
    }

    pub async fn list_groups(&self) -> Result<pb::ListGroupsResponse, ClientError> {
        self.call(self.call_timeout, |mut c| async move { c.list_groups(pb::ListGroupsRequest {}).await }).await
    }

    /// Sends one observer's view.
    pub async fn report_view(&self, req: pb::ReportRequest) -> Result<pb::ReportResponse, ClientError> {
        self.unary(req, |mut c, r| async move { c.report(r).await }).await
    }

    pub async fn get_matrix(&self, group: &str, consistency: pb::Consistency) -> Result<pb::Matrix, ClientError> {
        let req = pb::GetMatrixRequest { group: group.into(), consistency: consistency as i32 };
        self.unary(req, |mut c, r| async move { c.get_matrix(r).await }).await
    }

    pub async fn explain(&self, group: &str, member: &str) -> Result<pb::ExplainResponse, ClientError> {
        let req = pb::ExplainRequest { group: group.into(), member: member.into() };
        self.unary(req, |mut c, r| async move { c.explain(r).await }).await
    }

    /// One call with the default timeout, `req` cloned for every attempt.
    async fn unary<Req, Resp, F, Fut>(&self, req: Req, f: F) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(CoordinatorClient<Channel>, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        self.call(self.call_timeout, |c| f(c, req.clone())).await
    }

    pub async fn get_election(
        &self,
        group: &str,
        consistency: pb::Consistency,
    ) -> Result<pb::ElectionStatus, ClientError> {
        let req = pb::GetElectionRequest { group: group.into(), consistency: consistency as i32 };
        self.unary(req, |mut c, r| async move { c.get_election(r).await }).await
    }

    pub async fn set_maintenance(&self, group: &str, on: bool) -> Result<pb::ElectionStatus, ClientError> {
        let req = pb::SetMaintenanceRequest { group: group.into(), on };
        self.unary(req, |mut c, r| async move { c.set_maintenance(r).await }).await
    }

    pub async fn unblock_failover(&self, group: &str) -> Result<pb::ElectionStatus, ClientError> {
        let req = pb::UnblockFailoverRequest { group: group.into() };
        self.unary(req, |mut c, r| async move { c.unblock_failover(r).await }).await
    }

    pub async fn cancel_switchover(&self, group: &str, reason: &str) -> Result<pb::ElectionStatus, ClientError> {
        let req = pb::CancelSwitchoverRequest { group: group.into(), reason: reason.into() };
        self.unary(req, |mut c, r| async move { c.cancel_switchover(r).await }).await
    }

    /// A planned switchover; waits up to `wait` for the target to hold the lease.
    pub async fn switchover(
        &self,
        group: &str,
        to: Option<&str>,
        wait: Duration,
    ) -> Result<pb::SwitchoverResponse, ClientError> {
        let req = pb::SwitchoverRequest {
            group: group.into(),
            to: to.unwrap_or_default().into(),
            wait_timeout_ms: wait.as_millis() as u64,
        };
        self.call(self.call_timeout + wait, |mut c| {
            let req = req.clone();
            async move { c.switchover(req).await }
        })
        .await
    }

    pub async fn whatif(&self, group: &str, down: &[String]) -> Result<pb::WhatIfResponse, ClientError> {
        let req = pb::WhatIfRequest { group: group.into(), down: down.to_vec() };
        self.unary(req, |mut c, r| async move { c.what_if(r).await }).await
    }

    /// Deletes a group (`force`: even with a live primary).
    pub async fn delete_group(&self, group: &str, force: bool) -> Result<pb::DeleteGroupResponse, ClientError> {
        let req = pb::DeleteGroupRequest { group: group.into(), force };
        self.unary(req, |mut c, r| async move { c.delete_group(r).await }).await
    }

    /// A backup file of the cluster's state, from the leader (the call
    /// follows leader hints). The transfer is bounded: at most
    /// [`crate::backup::MAX_BACKUP_BYTES`], within [`SNAPSHOT_TRANSFER`].
    pub async fn save_snapshot(&self) -> Result<SnapshotDownload, ClientError> {
        let mut stream =
            self.unary(pb::SaveSnapshotRequest {}, |mut c, r| async move { c.save_snapshot(r).await }).await?;
        let read = async {
            let mut got = SnapshotDownload { bytes: Vec::new(), revision: 0, served_by: 0 };
            let mut total = None;
            while let Some(chunk) = stream.message().await.map_err(|s| ClientError::Transfer(s.message().to_owned()))? {
                let want = *total.get_or_insert(chunk.total_bytes);
                if want > crate::backup::MAX_BACKUP_BYTES || chunk.total_bytes != want {
                    return Err(ClientError::Transfer(format!(
                        "the server announced {} bytes (limit {})",
                        chunk.total_bytes,
                        crate::backup::MAX_BACKUP_BYTES
                    )));
                }
                if got.bytes.len() as u64 + chunk.data.len() as u64 > want {
                    return Err(ClientError::Transfer(format!("more than the {want} bytes announced")));
                }
                got.bytes.extend_from_slice(&chunk.data);
                (got.revision, got.served_by) = (chunk.revision, chunk.served_by);
            }
            match total {
                Some(want) if got.bytes.len() as u64 == want => Ok(got),
                want => Err(ClientError::Transfer(format!(
                    "the stream ended after {} of {} bytes",
                    got.bytes.len(),
                    want.map_or_else(|| "the announced".to_owned(), |w| w.to_string())
                ))),
            }
        };
        tokio::time::timeout(SNAPSHOT_TRANSFER, read)
            .await
            .map_err(|_| ClientError::Transfer(format!("not complete within {SNAPSHOT_TRANSFER:?}")))?
    }

    /// The coordinators as the leader sees them.
    pub async fn cluster_members(&self) -> Result<pb::ClusterMembersResponse, ClientError> {
        self.unary(pb::ClusterMembersRequest {}, |mut c, r| async move { c.cluster_members(r).await }).await
    }

    /// Adds node `id` at `addr` (a learner, then a voter once caught up,
    /// within `wait`).
    pub async fn add_node(&self, id: u64, addr: &str, wait: Duration) -> Result<pb::AddNodeResponse, ClientError> {
        let req = pb::AddNodeRequest { id, addr: addr.into(), wait_timeout_ms: wait.as_millis() as u64 };
        self.call(self.call_timeout + wait, |mut c| {
            let req = req.clone();
            async move { c.add_node(req).await }
        })
        .await
    }

    /// Removes node `id` for good.
    pub async fn remove_node(&self, id: u64) -> Result<pb::RemoveNodeResponse, ClientError> {
        // A membership change commits in two steps (joint consensus): give
        // it more than one ordinary call's time.
        self.call(self.call_timeout * 3, |mut c| async move { c.remove_node(pb::RemoveNodeRequest { id }).await }).await
    }
}

/// How long a snapshot transfer may take once the leader answered.
pub const SNAPSHOT_TRANSFER: Duration = Duration::from_secs(120);

/// A backup file as received (checked by `crate::backup::decode`).
#[derive(Debug, Clone)]
pub struct SnapshotDownload {
    pub bytes: Vec<u8>,
    /// The log index it was read at, and the node that read it.
    pub revision: u64,
    pub served_by: u64,
}

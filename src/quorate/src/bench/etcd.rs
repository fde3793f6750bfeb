//! `quorate bench --target etcd`: the closed loops of [`super::run`] against
//! an etcd cluster, the anchor quorate's figures are compared with.
//!
//! The client side is the same code as quorate's benchmarks: tonic, one
//! lazily connected HTTP/2 channel per client, one call at a time, each
//! latency recorded; only the protobuf messages differ (the subset of
//! etcd's API in `proto/anchors/etcd/rpc.proto`). So whatever the client
//! costs, it costs both sides the same.
//!
//! - `lease-get`: back-to-back `Range` of one key. Linearizable by default
//!   (etcd's default: the member asked confirms its read index with the
//!   leader, a ReadIndex round, before it answers); `--consistency stale`
//!   is `serializable=true`, a member-local read.
//! - `acquire-renew`: each client grants itself a lease (TTL 10 s), then
//!   sends `LeaseKeepAlive` on its own stream back to back, waiting for
//!   each answer: what one keep-alive costs. Note what it measures: etcd's
//!   leader extends a lease in memory (a follower forwards the keep-alive
//!   to it), with no Raft entry, where a quorate renewal is a committed
//!   Raft entry. It is the call a holder makes to keep its lease, not the
//!   same amount of work.
//!
//! Where the clients go: client `i` uses endpoint `i mod n`, one endpoint
//! per channel, as etcd's own Go client spreads its calls over the members
//! it is given (every member serves a linearizable read, after asking the
//! leader for the read index). quorate's [`crate::client::Client`] instead
//! starts every client at the first endpoint and follows leader hints, so
//! that its linearizable reads all end up on the leader (a follower
//! answers UNAVAILABLE with the leader's address); its stale reads stay on
//! the first endpoint.
//!
//! Plain text only: the etcd of `deploy/bench/etcd.sh` serves plain text.

use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::transport::Channel;

use super::{BenchKind, BenchReport, percentiles};
use crate::pb::etcd as pb;
use crate::pb::etcd::kv_client::KvClient;
use crate::pb::etcd::lease_client::LeaseClient;
use crate::pb::etcd::maintenance_client::MaintenanceClient;
use crate::tls::transport::Transport;
use crate::wire::lazy_channel_with;

/// The key `lease-get` and `read-gap` read (written once before a run, so
/// that a read returns one key-value, as a quorate `GetLease` returns one
/// lease).
pub const BENCH_KEY: &[u8] = b"quorate-bench/lease";

/// The TTL of the benchmark's leases, in seconds (quorate's acquire-renew
/// takes 10 s leases too).
const LEASE_TTL_S: i64 = 10;

/// How long one `Status` call of [`leader`] may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Which system a benchmark drives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// A quorate cluster (`--endpoints`).
    #[default]
    Quorate,
    /// An etcd v3 cluster (`--etcd-endpoints`), plain text.
    Etcd,
}

/// Why an etcd benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoints given: pass --etcd-endpoints HOST:PORT,...")]
    NoEndpoints,
    #[error("invalid etcd endpoint {addr:?}: {message}")]
    BadEndpoint { addr: String, message: String },
    #[error("etcd {call} at {addr} failed: {message} ({code:?})")]
    Call { call: &'static str, addr: String, code: tonic::Code, message: String },
    #[error("etcd {call} at {addr} did not answer within {timeout:?}")]
    Timeout { call: &'static str, addr: String, timeout: Duration },
    #[error("etcd refused a lease: {0}")]
    Lease(String),
    #[error("no etcd member names a leader it can be reached at (last: {last})")]
    NoLeader { last: String },
    #[error("a benchmark client stopped: {0}")]
    Join(String),
}

impl EtcdError {
    fn call(call: &'static str, addr: &str, s: &tonic::Status) -> Self {
        EtcdError::Call { call, addr: addr.to_owned(), code: s.code(), message: s.message().to_owned() }
    }
}

/// The endpoints of an etcd cluster, and a way to open channels to them.
#[derive(Debug, Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
}

impl Etcd {
    /// `list`: HOST:PORT separated by commas.
    pub fn from_list(list: &str) -> Result<Self, EtcdError> {
        let endpoints: Vec<String> = list.split(',').map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()).collect();
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        Ok(Self { endpoints })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A new channel (a connection of its own) to endpoint `i mod n`.
    pub fn channel(&self, i: usize) -> Result<(String, Channel), EtcdError> {
        let addr = self.endpoints[i % self.endpoints.len()].clone();
        let ch = lazy_channel_with(&addr, &Transport::Insecure)
            .map_err(|e| EtcdError::BadEndpoint { addr: addr.clone(), message: e.to_string() })?;
        Ok((addr, ch))
    }

    /// Writes [`BENCH_KEY`] (through the first endpoint that takes it).
    pub async fn put_bench_key(&self) -> Result<(), EtcdError> {
        let mut last = None;
        for i in 0..self.endpoints.len() {
            let (addr, ch) = self.channel(i)?;
            let req = pb::PutRequest { key: BENCH_KEY.to_vec(), value: b"holder-1".to_vec(), lease: 0 };
            match tokio::time::timeout(STATUS_TIMEOUT, KvClient::new(ch).put(req)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(s)) => last = Some(EtcdError::call("Put", &addr, &s)),
                Err(_) => last = Some(EtcdError::Timeout { call: "Put", addr, timeout: STATUS_TIMEOUT }),
            }
        }
        Err(last.unwrap_or(EtcdError::NoEndpoints))
    }
}

/// A Range of [`BENCH_KEY`].
pub fn range_request(serializable: bool) -> pb::RangeRequest {
    pb::RangeRequest { key: BENCH_KEY.to_vec(), serializable, ..Default::default() }
}

/// Runs `lease-get` or `acquire-renew` against etcd; the same report as
/// [`super::run`] (the consistency is `linearizable` or `serializable`,
/// `keep-alive` for acquire-renew).
pub async fn run(
    etcd: &Etcd,
    kind: BenchKind,
    clients: usize,
    duration: Duration,
    serializable: bool,
) -> Result<BenchReport, EtcdError> {
    let clients = clients.max(1);
    if kind == BenchKind::LeaseGet {
        etcd.put_bench_key().await?;
    }
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let (addr, ch) = etcd.channel(i)?;
        tasks.spawn(async move {
            match kind {
                BenchKind::AcquireRenew => keep_alive_worker(addr, ch, end).await,
                _ => range_worker(ch, end, serializable).await,
            }
        });
    }
    let mut latencies_us: Vec<u32> = Vec::new();
    let mut errors = 0;
    while let Some(res) = tasks.join_next().await {
        let (lat, errs) = res.map_err(|e| EtcdError::Join(e.to_string()))??;
        latencies_us.extend(lat);
        errors += errs;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (p50_ms, p99_ms, max_ms) = percentiles(&mut latencies_us);
    Ok(BenchReport {
        kind,
        consistency: match (kind, serializable) {
            (BenchKind::AcquireRenew, _) => "keep-alive".to_owned(),
            (_, true) => "serializable".to_owned(),
            (_, false) => "linearizable".to_owned(),
        },
        clients,
        duration_s: elapsed,
        ops: latencies_us.len() as u64,
        errors,
        ops_per_s: latencies_us.len() as f64 / elapsed,
        p50_ms,
        p99_ms,
        max_ms,
    })
}

fn micros(t: Instant) -> u32 {
    u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX)
}

/// Back-to-back Ranges until `end`: latencies and the error count.
async fn range_worker(ch: Channel, end: Instant, serializable: bool) -> Result<(Vec<u32>, u64), EtcdError> {
    let mut kv = KvClient::new(ch);
    let mut lat = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    while Instant::now() < end {
        let t = Instant::now();
        match kv.range(range_request(serializable)).await {
            Ok(_) => lat.push(micros(t)),
            Err(_) => errors += 1,
        }
    }
    Ok((lat, errors))
}

/// Grants a lease, then keeps it alive back to back until `end`, one
/// request in flight on the stream at a time; revokes it at the end.
async fn keep_alive_worker(addr: String, ch: Channel, end: Instant) -> Result<(Vec<u32>, u64), EtcdError> {
    let mut lease = LeaseClient::new(ch);
    let grant = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: LEASE_TTL_S, id: 0 })
        .await
        .map_err(|s| EtcdError::call("LeaseGrant", &addr, &s))?
        .into_inner();
    if !grant.error.is_empty() {
        return Err(EtcdError::Lease(grant.error));
    }
    let id = grant.id;
    // The request side of the stream: one message per keep-alive, sent
    // only once the previous answer is in. The first one is queued before
    // the call is awaited: etcd sends the stream's response headers only
    // with its first answer, so awaiting the call with nothing queued
    // would wait forever.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut t = Instant::now();
    tx.send(pb::LeaseKeepAliveRequest { id }).await.map_err(|_| EtcdError::Lease("keep-alive stream closed".into()))?;
    let call = lease.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut answers = tokio::time::timeout(STATUS_TIMEOUT, call)
        .await
        .map_err(|_| EtcdError::Timeout { call: "LeaseKeepAlive", addr: addr.clone(), timeout: STATUS_TIMEOUT })?
        .map_err(|s| EtcdError::call("LeaseKeepAlive", &addr, &s))?
        .into_inner();
    let mut lat = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    let mut first = true;
    while Instant::now() < end {
        if !first {
            t = Instant::now();
            if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                errors += 1;
                break;
            }
        }
        first = false;
        // Bounded: a stream that stays silent past the run's end ends it.
        let left = end.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        match tokio::time::timeout(left, answers.message()).await {
            Ok(Ok(Some(a))) if a.ttl > 0 => lat.push(micros(t)),
            // TTL 0 or less: the lease is gone; nothing more to keep alive.
            Ok(Ok(Some(_))) => return Err(EtcdError::Lease(format!("lease {id:x} expired during the run"))),
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    drop(tx);
    let _ = tokio::time::timeout(STATUS_TIMEOUT, lease.lease_revoke(pb::LeaseRevokeRequest { id })).await;
    Ok((lat, errors))
}

/// Who leads an etcd cluster, as its members say.
#[derive(Debug, Clone, Serialize)]
pub struct EtcdLeader {
    pub target: Target,
    /// etcd's member id of the leader, in hex (as etcdctl prints it).
    pub member_id: String,
    /// The leader's client endpoint, one of `--etcd-endpoints`.
    pub endpoint: String,
    pub raft_term: u64,
}

/// Asks every member's Status; the leader is the member whose own id is
/// the leader id that the most members name (a member that just lost
/// its leader names none).
pub async fn leader(etcd: &Etcd) -> Result<EtcdLeader, EtcdError> {
    let mut own: Vec<(u64, String)> = Vec::new();
    let mut named: Vec<(u64, u64)> = Vec::new();
    let mut last = String::from("no member answered");
    for i in 0..etcd.endpoints.len() {
        let (addr, ch) = etcd.channel(i)?;
        match tokio::time::timeout(STATUS_TIMEOUT, MaintenanceClient::new(ch).status(pb::StatusRequest {})).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                let member = r.header.map_or(0, |h| h.member_id);
                own.push((member, addr));
                if r.leader != 0 {
                    named.push((r.leader, r.raft_term));
                }
            }
            Ok(Err(s)) => last = format!("{addr}: {}", s.message()),
            Err(_) => last = format!("{addr}: no answer within {STATUS_TIMEOUT:?}"),
        }
    }
    let mut best: Option<(usize, u64, u64)> = None;
    for &(l, term) in &named {
        let votes = named.iter().filter(|(x, _)| *x == l).count();
        if best.is_none_or(|(v, _, _)| votes > v) {
            best = Some((votes, l, term));
        }
    }
    let (_, id, raft_term) = best.ok_or_else(|| EtcdError::NoLeader { last: last.clone() })?;
    let endpoint = own.into_iter().find(|(m, _)| *m == id).map(|(_, a)| a).ok_or(EtcdError::NoLeader { last })?;
    Ok(EtcdLeader { target: Target::Etcd, member_id: format!("{id:x}"), endpoint, raft_term })
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// The bytes etcd decodes: field numbers and types as in etcd's
    /// rpc.proto (a wrong number would be ignored by etcd, not refused).
    #[test]
    fn requests_encode_with_etcds_field_numbers() {
        let range = pb::RangeRequest { key: b"k".to_vec(), serializable: true, ..Default::default() };
        // key = 1 (bytes: tag 0x0a), serializable = 7 (varint: tag 0x38).
        assert_eq!(range.encode_to_vec(), vec![0x0a, 1, b'k', 0x38, 1]);
        let grant = pb::LeaseGrantRequest { ttl: 10, id: 5 };
        // TTL = 1, ID = 2, both varints.
        assert_eq!(grant.encode_to_vec(), vec![0x08, 10, 0x10, 5]);
        let put = pb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), lease: 3 };
        assert_eq!(put.encode_to_vec(), vec![0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 3]);
        assert_eq!(pb::LeaseKeepAliveRequest { id: 7 }.encode_to_vec(), vec![0x08, 7]);
    }

    #[test]
    fn status_decodes_leader_and_member() {
        // header{member_id=2: 9}, leader=4: 9, raftTerm=6: 3.
        let bytes = [0x0a, 0x02, 0x10, 9, 0x20, 9, 0x30, 3];
        let s = pb::StatusResponse::decode(&bytes[..]).unwrap();
        assert_eq!((s.header.map(|h| h.member_id), s.leader, s.raft_term), (Some(9), 9, 3));
    }

    #[test]
    fn endpoints_parse() {
        assert!(matches!(Etcd::from_list(" , "), Err(EtcdError::NoEndpoints)));
        let e = Etcd::from_list("127.0.0.1:1, 127.0.0.1:2").unwrap();
        assert_eq!(e.endpoints(), ["127.0.0.1:1", "127.0.0.1:2"]);
    }
}

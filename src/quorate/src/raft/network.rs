//! The client side of Raft RPCs, over tonic.
//!
//! - A few cached, lazily connecting `Channel`s ("lanes") per peer (openraft
//!   calls `new_client` for every replication stream and vote broadcast; a
//!   new channel each time would defeat connection reuse). Calls use one lane
//!   until a call times out, then the next: see [`LANES`].
//! - Every RPC is bounded, both as a gRPC timeout header and as a local
//!   timeout. Heartbeats and votes get the deadline openraft passes
//!   (`soft_ttl`, 3/4 of the heartbeat interval); an AppendEntries that
//!   carries entries, and a snapshot, get that plus time for their bytes
//!   ([`payload_deadline`]). A fixed heartbeat-sized deadline for every
//!   append made one large entry time out on every attempt, for ever.
//! - An AppendEntries carries at most [`MAX_APPEND_BYTES`] of entries (and
//!   always at least one): the rest of openraft's batch is left out and the
//!   reply says so (`PartialSuccess`), so openraft sends it next.
//! - Every request names its target node in metadata; the receiver refuses
//!   requests meant for another node.
//! - Connection failures map to `Unreachable` (openraft backs off), deadline
//!   expiry to `Timeout`, everything else to `Network`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{AnyError, BasicNode, RaftNetworkV2};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::tls::transport::Transport;
use crate::wire::lazy_channel_with;

use super::{Snapshot, TypeConfig, Vote, encoded_len};
use crate::pb::raft::raft_client::RaftClient;
use crate::pb::raft::{RaftPayload, SnapshotChunk};

/// Metadata key naming the node a Raft request is meant for.
pub const TARGET_NODE_HEADER: &str = "x-quorate-target-node";

/// Snapshot bytes per streamed chunk: well under tonic's 4 MiB decode limit.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// The most encoded bytes one AppendEntries carries, unless its first entry
/// alone is larger (entries are bounded by [`super::MAX_ENTRY_BYTES`]).
pub const MAX_APPEND_BYTES: usize = 1 << 20;

/// The throughput deadlines assume for payloads: far below what loopback
/// or a LAN does, so that only a stalled connection runs out of time, yet a
/// megabyte over a lossy link (retransmissions at 200 ms and more) fits.
const PAYLOAD_BYTES_PER_SEC: u64 = 1 << 20;

/// The deadline of a call that carries `bytes`: `base` (what openraft gives
/// a heartbeat) plus a second per MiB.
pub fn payload_deadline(base: Duration, bytes: usize) -> Duration {
    base + Duration::from_micros((bytes as u64).saturating_mul(1_000_000) / PAYLOAD_BYTES_PER_SEC)
}

/// How many of `entries`, from the first, fit in `budget` encoded bytes;
/// at least one.
fn entries_within<T: Serialize>(entries: &[T], budget: usize) -> usize {
    let mut total = 0usize;
    for (i, e) in entries.iter().enumerate() {
        total = total.saturating_add(encoded_len(e));
        if total > budget {
            return i.max(1);
        }
    }
    entries.len()
}

/// Connections per peer. After a call to a peer times out, later calls go
/// over the next connection: the timed-out call most likely waits for a TCP
/// retransmission (200 ms or more, doubling on repeats), and on one HTTP/2
/// connection every later request waits behind it, far longer than the
/// heartbeat-sized deadlines openraft gives replication. Under 20% packet
/// loss this is what keeps commits (and so lease renewals) flowing.
pub const LANES: usize = 3;

/// The connections to one peer and the one in use, shared by every
/// [`PeerClient`] of that peer.
#[derive(Debug, Clone)]
struct Lanes {
    channels: Arc<[Channel]>,
    current: Arc<AtomicUsize>,
}

impl Lanes {
    fn new(addr: &str, transport: &Transport) -> Result<Self, tonic::transport::Error> {
        let channels = (0..LANES).map(|_| lazy_channel_with(addr, transport)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { channels: channels.into(), current: Arc::new(AtomicUsize::new(0)) })
    }

    /// The lane to use now and its channel.
    fn pick(&self) -> (usize, Channel) {
        let lane = self.current.load(Ordering::Relaxed) % self.channels.len();
        (lane, self.channels[lane].clone())
    }

    /// A call on `lane` timed out: move on, unless another call already did.
    fn timed_out(&self, lane: usize) {
        let next = (lane + 1) % self.channels.len();
        let _ = self.current.compare_exchange(lane, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Creates per-peer clients; owns the channel cache.
#[derive(Debug)]
pub struct NetworkFactory {
    self_id: u64,
    transport: Transport,
    lanes: HashMap<(u64, String), Lanes>,
}

impl NetworkFactory {
    pub fn new(self_id: u64, transport: Transport) -> Self {
        Self { self_id, transport, lanes: HashMap::new() }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        assert_ne!(target, self.self_id, "openraft asked for a client to this node itself");
        let key = (target, node.addr.clone());
        let lanes = match self.lanes.get(&key) {
            Some(l) => Ok(l.clone()),
            None => Lanes::new(&node.addr, &self.transport).inspect(|l| {
                self.lanes.insert(key, l.clone());
            }),
        };
        PeerClient { self_id: self.self_id, target, addr: node.addr.clone(), lanes: lanes.map_err(|e| e.to_string()) }
    }
}

/// The RPC client for one peer.
#[derive(Debug)]
pub struct PeerClient {
    self_id: u64,
    target: u64,
    addr: String,
    /// An unparsable address is kept as an error and reported on each call.
    lanes: Result<Lanes, String>,
}

/// Why one RPC failed, before it is mapped to openraft's error kinds.
enum CallError {
    Unreachable(String),
    Timeout(Duration),
    Other(String),
}

impl PeerClient {
    fn request<T>(&self, msg: T, deadline: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(deadline);
        if let Ok(v) = self.target.to_string().parse() {
            req.metadata_mut().insert(TARGET_NODE_HEADER, v);
        }
        req
    }

    /// A client on the current lane, and that lane.
    fn client(&self) -> Result<(usize, RaftClient<Channel>), CallError> {
        match &self.lanes {
            Ok(l) => {
                let (lane, c) = l.pick();
                Ok((lane, RaftClient::new(c).max_decoding_message_size(64 << 20)))
            }
            Err(e) => Err(CallError::Unreachable(format!("bad address {:?}: {e}", self.addr))),
        }
    }

    /// Bookkeeping after a call on `lane`: a timeout moves later calls to
    /// the next lane.
    fn after_call<T>(&self, lane: usize, res: Result<T, CallError>) -> Result<T, CallError> {
        if let (Err(CallError::Timeout(_)), Ok(l)) = (&res, &self.lanes) {
            l.timed_out(lane);
        }
        res
    }

    /// One unary call: encode, send with the deadline, decode.
    async fn unary<Req, Resp, F, Fut>(&self, req: &Req, deadline: Duration, call: F) -> Result<Resp, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, tonic::Request<RaftPayload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        let data = serde_json::to_vec(req).map_err(|e| CallError::Other(e.to_string()))?;
        self.unary_encoded(data, deadline, call).await
    }

    /// [`Self::unary`] with the request already encoded.
    async fn unary_encoded<Resp, F, Fut>(&self, data: Vec<u8>, deadline: Duration, call: F) -> Result<Resp, CallError>
    where
        Resp: DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, tonic::Request<RaftPayload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        let (lane, client) = self.client()?;
        let fut = call(client, self.request(RaftPayload { data }, deadline));
        let res = match tokio::time::timeout(deadline, fut).await {
            Err(_) => Err(CallError::Timeout(deadline)),
            Ok(r) => r.map_err(|s| status_to_call_error(s, deadline)),
        };
        self.after_call(lane, res.and_then(|resp| decode_reply(&resp.into_inner().data)))
    }

    fn map_err<E: std::error::Error>(&self, action: RPCTypes, e: CallError) -> RPCError<TypeConfig, E> {
        match e {
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&AnyError::error(m))),
            CallError::Timeout(timeout) => {
                RPCError::Timeout(Timeout { action, id: self.self_id, target: self.target, timeout })
            }
            CallError::Other(m) => RPCError::Network(NetworkError::from_string(m)),
        }
    }
}

fn status_to_call_error(s: tonic::Status, deadline: Duration) -> CallError {
    use tonic::Code;
    match s.code() {
        // Connect failures, refused targets and a peer shutting down: back off.
        Code::Unavailable | Code::FailedPrecondition => CallError::Unreachable(s.message().to_owned()),
        Code::DeadlineExceeded | Code::Cancelled => CallError::Timeout(deadline),
        _ => CallError::Other(format!("{}: {}", s.code(), s.message())),
    }
}

/// A reply is either the response JSON or `{"error": "..."}` from a node
/// whose Raft refused the call (it is shutting down or failed): unreachable.
fn decode_reply<T: DeserializeOwned>(data: &[u8]) -> Result<T, CallError> {
    #[derive(serde::Deserialize)]
    struct ErrorReply {
        error: String,
    }
    match serde_json::from_slice::<T>(data) {
        Ok(v) => Ok(v),
        Err(e) => match serde_json::from_slice::<ErrorReply>(data) {
            Ok(r) => Err(CallError::Unreachable(r.error)),
            Err(_) => Err(CallError::Other(format!("undecodable Raft reply: {e}"))),
        },
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let fail = |e: CallError| self.map_err(RPCTypes::AppendEntries, e);
        let encode = |rpc: &AppendEntriesRequest<TypeConfig>| {
            serde_json::to_vec(rpc).map_err(|e| fail(CallError::Other(e.to_string())))
        };
        let mut data = encode(&rpc)?;
        // Send a prefix that fits the byte budget; openraft sends the rest
        // after the PartialSuccess below.
        let mut sent_up_to = None;
        if data.len() > MAX_APPEND_BYTES && rpc.entries.len() > 1 {
            let keep = entries_within(&rpc.entries, MAX_APPEND_BYTES);
            if keep < rpc.entries.len() {
                rpc.entries.truncate(keep);
                sent_up_to = rpc.entries.last().map(|e| e.log_id);
                data = encode(&rpc)?;
            }
        }
        let deadline =
            if rpc.entries.is_empty() { option.soft_ttl() } else { payload_deadline(option.soft_ttl(), data.len()) };
        let resp: AppendEntriesResponse<TypeConfig> = self
            .unary_encoded(data, deadline, |mut c, r| async move { c.append_entries(r).await })
            .await
            .map_err(fail)?;
        Ok(match (resp, sent_up_to) {
            (AppendEntriesResponse::Success, Some(last)) => AppendEntriesResponse::PartialSuccess(Some(last)),
            (resp, _) => resp,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, option.soft_ttl(), |mut c, r| async move { c.vote(r).await })
            .await
            .map_err(|e| self.map_err(RPCTypes::Vote, e))
    }

    /// Pre-Vote must never be granted on behalf of an unreachable peer (the
    /// default implementation grants): it goes over the wire like a vote.
    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, option.soft_ttl(), |mut c, r| async move { c.pre_vote(r).await })
            .await
            .map_err(|e| self.map_err(RPCTypes::Vote, e))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // openraft's deadline is `install_snapshot_timeout`; a large
        // snapshot gets time for its bytes on top.
        let deadline = payload_deadline(option.soft_ttl(), snapshot.snapshot.len());
        let to_streaming = |e: CallError| -> StreamingError<TypeConfig> {
            match self.map_err::<std::convert::Infallible>(RPCTypes::InstallSnapshot, e) {
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::RemoteError(r) => StreamingError::Network(NetworkError::from_string(r.to_string())),
            }
        };
        let meta = serde_json::to_vec(&serde_json::json!({ "vote": vote, "meta": snapshot.meta }))
            .map_err(|e| to_streaming(CallError::Other(e.to_string())))?;
        let mut chunks = vec![SnapshotChunk { meta, data: Vec::new() }];
        chunks.extend(
            snapshot
                .snapshot
                .chunks(SNAPSHOT_CHUNK_BYTES)
                .map(|c| SnapshotChunk { meta: Vec::new(), data: c.to_vec() }),
        );
        let (lane, mut client) = self.client().map_err(&to_streaming)?;
        let req = self.request(tokio_stream::iter(chunks), deadline);
        let call = async {
            let res = match tokio::time::timeout(deadline, client.install_snapshot(req)).await {
                Err(_) => Err(CallError::Timeout(deadline)),
                Ok(r) => {
                    r.map_err(|s| status_to_call_error(s, deadline)).and_then(|r| decode_reply(&r.into_inner().data))
                }
            };
            self.after_call(lane, res)
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = call => res.map_err(to_streaming),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Lane switching against a peer that accepts connections and never
    //! answers, as a connection waiting for a retransmission looks: each
    //! timed-out call moves the next one to a new connection, and the
    //! connections are reused round-robin rather than multiplied.

    use std::sync::atomic::AtomicUsize;

    use openraft::raft::VoteRequest;

    use super::*;

    #[tokio::test]
    async fn a_timed_out_call_moves_later_calls_to_the_next_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });

        // The accepting task may lag on a busy machine: wait for the count
        // to reach `n` (bounded), then it must be exactly `n`.
        let connections = |n: usize| {
            let accepted = accepted.clone();
            async move {
                for _ in 0..500 {
                    if accepted.load(Ordering::SeqCst) >= n {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                accepted.load(Ordering::SeqCst)
            }
        };

        let mut factory = NetworkFactory::new(1, Transport::Insecure);
        let mut peer = factory.new_client(2, &BasicNode { addr: addr.clone() }).await;
        let option = RPCOption::new(Duration::from_millis(200));
        let req = || VoteRequest::<TypeConfig>::new(Vote::new(1, 1), None);
        for call in 1..=LANES + 2 {
            let res = peer.vote(req(), option.clone()).await;
            assert!(matches!(res, Err(RPCError::Timeout(_))), "call {call}: {res:?}");
            // A new connection per lane, then the lanes come round again.
            assert_eq!(connections(call.min(LANES)).await, call.min(LANES), "after call {call}");
        }
        // Another client of the same peer shares the lanes and where they are.
        let mut other = factory.new_client(2, &BasicNode { addr }).await;
        let _ = other.vote(req(), option).await;
        assert_eq!(connections(LANES).await, LANES);
        silent.abort();
    }
}

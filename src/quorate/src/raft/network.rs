//! The client side of Raft RPCs, over tonic.
//!
//! - One cached, lazily connecting `Channel` per peer (openraft calls
//!   `new_client` for every replication stream and vote broadcast; a new
//!   channel each time would defeat connection reuse).
//! - Every RPC is bounded by the deadline openraft passes (`soft_ttl`), both
//!   as a gRPC timeout header and as a local timeout.
//! - Every request names its target node in metadata; the receiver refuses
//!   requests meant for another node.
//! - Connection failures map to `Unreachable` (openraft backs off), deadline
//!   expiry to `Timeout`, everything else to `Network`.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{AnyError, BasicNode, RaftNetworkV2};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::{Snapshot, TypeConfig, Vote};
use crate::pb::raft::raft_client::RaftClient;
use crate::pb::raft::{RaftPayload, SnapshotChunk};

/// Metadata key naming the node a Raft request is meant for.
pub const TARGET_NODE_HEADER: &str = "x-quorate-target-node";

/// Snapshot bytes per streamed chunk: well under tonic's 4 MiB decode limit.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// How long a TCP connect may take before the peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Builds one lazily connecting channel for a peer address.
pub fn lazy_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Creates per-peer clients; owns the channel cache.
#[derive(Debug)]
pub struct NetworkFactory {
    self_id: u64,
    channels: HashMap<(u64, String), Channel>,
}

impl NetworkFactory {
    pub fn new(self_id: u64) -> Self {
        Self { self_id, channels: HashMap::new() }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        assert_ne!(target, self.self_id, "openraft asked for a client to this node itself");
        let key = (target, node.addr.clone());
        let channel = match self.channels.get(&key) {
            Some(c) => Ok(c.clone()),
            None => lazy_channel(&node.addr).inspect(|c| {
                self.channels.insert(key, c.clone());
            }),
        };
        PeerClient {
            self_id: self.self_id,
            target,
            addr: node.addr.clone(),
            channel: channel.map_err(|e| e.to_string()),
        }
    }
}

/// The RPC client for one peer.
#[derive(Debug)]
pub struct PeerClient {
    self_id: u64,
    target: u64,
    addr: String,
    /// An unparsable address is kept as an error and reported on each call.
    channel: Result<Channel, String>,
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

    fn client(&self) -> Result<RaftClient<Channel>, CallError> {
        match &self.channel {
            Ok(c) => Ok(RaftClient::new(c.clone()).max_decoding_message_size(64 << 20)),
            Err(e) => Err(CallError::Unreachable(format!("bad address {:?}: {e}", self.addr))),
        }
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
        let client = self.client()?;
        let fut = call(client, self.request(RaftPayload { data }, deadline));
        let resp = match tokio::time::timeout(deadline, fut).await {
            Err(_) => return Err(CallError::Timeout(deadline)),
            Ok(r) => r.map_err(status_to_call_error)?,
        };
        decode_reply(&resp.into_inner().data)
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

fn status_to_call_error(s: tonic::Status) -> CallError {
    use tonic::Code;
    match s.code() {
        // Connect failures, refused targets and a peer shutting down: back off.
        Code::Unavailable | Code::FailedPrecondition => CallError::Unreachable(s.message().to_owned()),
        Code::DeadlineExceeded | Code::Cancelled => CallError::Timeout(Duration::ZERO),
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
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, option.soft_ttl(), |mut c, r| async move { c.append_entries(r).await })
            .await
            .map_err(|e| self.map_err(RPCTypes::AppendEntries, e))
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
        let deadline = option.soft_ttl();
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
        let mut client = self.client().map_err(&to_streaming)?;
        let req = self.request(tokio_stream::iter(chunks), deadline);
        let call = async {
            match tokio::time::timeout(deadline, client.install_snapshot(req)).await {
                Err(_) => Err(CallError::Timeout(deadline)),
                Ok(r) => decode_reply(&r.map_err(status_to_call_error)?.into_inner().data),
            }
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = call => res.map_err(to_streaming),
        }
    }
}

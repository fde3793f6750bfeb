//! The server side of Raft RPCs: check the sender (a node certificate, not
//! of a node removed from the cluster, and the node its messages claim to
//! come from), decode, check the target, hand to openraft (votes only when
//! this node may vote, see [`Readiness`]).

use crate::tls::caller::Caller;
use futures::StreamExt;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::vote::RaftLeaderId as _;
use quorate_core::access::{Action, Identity};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status, Streaming};

use super::network::TARGET_NODE_HEADER;
use std::sync::Arc;

use super::readiness::Readiness;
use super::state_machine::SmReader;
use super::{Raft, SnapshotMeta, TypeConfig, Vote};
use crate::pb::raft::raft_server;
use crate::pb::raft::{RaftPayload, SnapshotChunk};

/// The largest snapshot this node accepts, in bytes.
const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// Serves Raft RPCs for one node.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    node_id: u64,
    readiness: Arc<Readiness>,
    reader: Arc<SmReader>,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").field("node_id", &self.node_id).finish()
    }
}

impl RaftService {
    pub fn new(raft: Raft, node_id: u64, readiness: Arc<Readiness>, reader: Arc<SmReader>) -> Self {
        Self { raft, node_id, readiness, reader }
    }

    /// A node that lost its data does not vote until it is caught up
    /// (see `server::catchup`); the refusal goes back as an openraft-level
    /// error, which the candidate counts as no answer.
    fn vote_refusal(&self) -> Option<Result<Response<RaftPayload>, Status>> {
        let why = self.readiness.vote_refusal(self.node_id)?;
        tracing::debug!("refusing a vote: {why}");
        Some(reply::<(), _>(Err(why)))
    }

    pub fn into_server(self) -> raft_server::RaftServer<Self> {
        raft_server::RaftServer::new(self).max_decoding_message_size(64 << 20)
    }

    /// Only node certificates reach the Raft service, and none of a node
    /// removed from the cluster (its stale log must not vote or lead);
    /// returns the node the certificate names (`None` over plain text).
    fn check_sender<T>(&self, req: &Request<T>) -> Result<Option<u64>, Status> {
        let caller = Caller::of_request(req);
        caller.check(Action::Raft).map_err(|d| Status::permission_denied(d.to_string()))?;
        let sender = match caller {
            Caller::Known(Identity::Node { id }) => Some(id),
            _ => None,
        };
        if let Some(id) = sender.filter(|id| self.reader.is_removed(*id)) {
            return Err(Status::permission_denied(format!(
                "node {id} was removed from this cluster; it must not rejoin under this id"
            )));
        }
        Ok(sender)
    }

    /// Defence in depth: a message whose vote names a leader or candidate
    /// other than the node its certificate names is refused before openraft
    /// sees it (a compromised node cannot speak for another).
    fn check_claim(sender: Option<u64>, claimed: u64, what: &str) -> Result<(), Status> {
        match sender {
            Some(id) if id != claimed => {
                let d = format!("node {id} may not send {what} in the name of node {claimed}");
                tracing::warn!("permission denied: {d}");
                Err(Status::permission_denied(d))
            }
            _ => Ok(()),
        }
    }

    /// Refuses requests meant for another node: a leader must never
    /// replicate to itself or to a node that took over a stale address.
    fn check_target<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let target = req.metadata().get(TARGET_NODE_HEADER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match target {
            Some(t) if t == self.node_id => Ok(()),
            Some(t) => Err(Status::failed_precondition(format!("this is node {}, not node {t}", self.node_id))),
            None => Err(Status::invalid_argument(format!("missing {TARGET_NODE_HEADER}"))),
        }
    }
}

fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(data).map_err(|e| Status::invalid_argument(format!("undecodable Raft request: {e}")))
}

/// Encodes openraft's answer; an openraft error (shutting down, fatal) goes
/// back as `{"error": ...}`, which the sender treats as unreachable.
fn reply<T: Serialize, E: std::fmt::Display>(res: Result<T, E>) -> Result<Response<RaftPayload>, Status> {
    let data = match res {
        Ok(v) => serde_json::to_vec(&v),
        Err(e) => serde_json::to_vec(&serde_json::json!({ "error": e.to_string() })),
    }
    .map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftPayload { data }))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = self.check_sender(&req)?;
        self.check_target(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req.into_inner().data)?;
        Self::check_claim(sender, *rpc.vote.leader_id().node_id(), "AppendEntries")?;
        reply(self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = self.check_sender(&req)?;
        self.check_target(&req)?;
        if let Some(refused) = self.vote_refusal() {
            return refused;
        }
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data)?;
        Self::check_claim(sender, *rpc.vote.leader_id().node_id(), "a vote request")?;
        reply(self.raft.vote(rpc).await)
    }

    async fn pre_vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = self.check_sender(&req)?;
        self.check_target(&req)?;
        if let Some(refused) = self.vote_refusal() {
            return refused;
        }
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data)?;
        Self::check_claim(sender, *rpc.vote.leader_id().node_id(), "a pre-vote request")?;
        reply(self.raft.pre_vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftPayload>, Status> {
        #[derive(serde::Deserialize)]
        struct Head {
            vote: Vote,
            meta: SnapshotMeta,
        }
        let sender = self.check_sender(&req)?;
        self.check_target(&req)?;
        let mut stream = req.into_inner();
        let first = stream.next().await.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let head: Head = decode(&first.meta)?;
        Self::check_claim(sender, *head.vote.leader_id().node_id(), "a snapshot")?;
        let mut data = first.data;
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?.data);
            if data.len() > MAX_SNAPSHOT_BYTES {
                return Err(Status::resource_exhausted("snapshot larger than 1 GiB"));
            }
        }
        let snapshot = openraft::alias::SnapshotOf::<TypeConfig, Vec<u8>> { meta: head.meta, snapshot: data };
        reply(self.raft.install_full_snapshot(head.vote, snapshot).await)
    }
}

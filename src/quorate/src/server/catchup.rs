//! Catching up after a start, and a node that lost its data.
//!
//! Two rules, both about what a node may do before it has caught up with
//! the cluster since it started:
//!
//! - **Reads.** A node serves no read from its own state (stale reads,
//!   watches, group lists) until it has applied everything committed in the
//!   current leader's term as that leader reported it (`RaftView::caught_up`, in `raft::node`).
//!   An entry committed in the leader's own term implies every earlier
//!   entry is committed, so the node's state is then at least as new as any
//!   state it had before it stopped. Linearizable and lease reads are
//!   confirmed by the leader itself and need no gate.
//! - **Votes.** A node whose store is empty either never ran or lost its
//!   data. If it lost it, granting votes could elect a candidate without
//!   entries this node had acknowledged (a committed entry then vanishes).
//!   So an empty node refuses votes until it is caught up, unless it learns
//!   the cluster has no history yet (first formation: every node is empty,
//!   and the first election needs their votes). It learns which from the
//!   identity file it wrote beside the store ([`IDENTITY_FILE`]: present
//!   with an empty store means the data was lost) and, when that is gone
//!   too, by asking its peers ([`probe_peers`]).
//!
//! The decisions are pure functions of metrics and answers; the tasks here
//! only feed them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::Node;
use crate::pb::v1::StatusRequest;
use crate::pb::v1::coordinator_client::CoordinatorClient;
use crate::raft::Past;
use crate::tls::transport::Transport;
use crate::wire::lazy_channel_with;

/// The file beside the Raft store that says which node the directory
/// belongs to and that it once held data.
pub const IDENTITY_FILE: &str = "quorate-node.json";

/// How often an empty node asks its peers whether the cluster has history.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long one peer may take to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a node still catching up says so.
const REMIND_EVERY: Duration = Duration::from_secs(10);

/// What the data directory says about this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: u64,
}

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a quorate identity file: {message}")]
    Parse { path: String, message: String },
    #[error(
        "{path} says this data directory belongs to node {found}, but this is node {expected}: check data_dir and node_id"
    )]
    WrongNode { path: String, found: u64, expected: u64 },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

/// Reads the identity file; `None` when there is none.
pub fn read_identity(data_dir: &Path, node_id: u64) -> Result<Option<Identity>, IdentityError> {
    let path = identity_path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(IdentityError::Read { path: path.display().to_string(), source }),
    };
    let id: Identity = serde_json::from_str(&text)
        .map_err(|e| IdentityError::Parse { path: path.display().to_string(), message: e.to_string() })?;
    if id.node_id != node_id {
        return Err(IdentityError::WrongNode {
            path: path.display().to_string(),
            found: id.node_id,
            expected: node_id,
        });
    }
    Ok(Some(id))
}

/// Writes the identity file (atomically: a temporary file, then rename).
pub fn write_identity(data_dir: &Path, node_id: u64) -> Result<(), IdentityError> {
    let path = identity_path(data_dir);
    let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
    let err = |source| IdentityError::Write { path: path.display().to_string(), source };
    let text = serde_json::to_string(&Identity { node_id }).expect("identity encodes");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// What a peer said when asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAnswer {
    pub initialized: bool,
    pub last_log_index: u64,
}

/// A peer's answer with the membership it knows, for a node's standing
/// (see `server::standing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipAnswer {
    pub initialized: bool,
    /// The node ids of the membership it knows.
    pub members: std::collections::BTreeSet<u64>,
    /// Every id it applied as removed.
    pub removed: std::collections::BTreeSet<u64>,
}

impl PeerAnswer {
    /// A peer that has entries past the initial membership has seen a
    /// leader elected: the cluster has history.
    pub fn has_history(&self) -> bool {
        self.initialized && self.last_log_index >= 1
    }
}

/// The past of an empty node from its peers' answers (`None`: no answer).
pub fn past_from_answers(answers: &[Option<PeerAnswer>]) -> Past {
    let heard: Vec<&PeerAnswer> = answers.iter().flatten().collect();
    if heard.iter().any(|a| a.has_history()) {
        Past::Lost
    } else if heard.is_empty() {
        Past::Unknown
    } else {
        Past::Forming
    }
}

/// Watches the metrics until this node has caught up, then opens reads
/// (and votes) and records the identity file. Ends when it has.
pub async fn catch_up(node: Node) {
    let readiness = node.readiness.clone();
    let mut watch = node.raft.watch();
    let mut stopping = node.stopping.clone();
    let mut remind = tokio::time::interval(REMIND_EVERY);
    remind.tick().await;
    loop {
        let v = watch.view();
        if v.caught_up {
            readiness.mark_caught_up();
            let applied = v.applied.unwrap_or(0);
            let took_ms = readiness.started().elapsed().as_millis() as u64;
            if readiness.past() == Past::Lost {
                info!(applied, took_ms, "caught up after losing its data: votes and reads are open again");
            } else {
                info!(applied, took_ms, "caught up with the cluster: serving reads");
            }
            if let Err(e) = write_identity(&node.config.data_dir, node.id) {
                warn!("{e}");
            }
            return;
        }
        tokio::select! {
            changed = watch.changed() => if !changed { return },
            _ = remind.tick() => {
                let target = v.cluster_committed.unwrap_or(0);
                let applied = v.applied.unwrap_or(0);
                if readiness.past() == Past::Lost {
                    error!(applied, target, leader = ?v.leader, "still catching up after losing its data: not voting, not serving reads");
                } else {
                    warn!(applied, target, leader = ?v.leader, "not caught up with the cluster yet: not serving reads");
                }
            }
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
    }
}

/// For a node that started with an empty store and no identity file: asks
/// the peers until one answers, and decides whether this is a first
/// formation or a node that lost its data. Ends once it knows, or once the
/// node caught up (which settles it anyway).
pub async fn probe_peers(node: Node) {
    let readiness = node.readiness.clone();
    let mut stopping = node.stopping.clone();
    while readiness.past() == Past::Unknown && !readiness.caught_up() {
        let peers: Vec<String> =
            node.known_addrs().into_iter().filter(|(id, _)| *id != node.id).map(|(_, a)| a).collect();
        let answers = futures::future::join_all(peers.iter().map(|a| ask(a, &node.transport))).await;
        match past_from_answers(&answers) {
            Past::Lost => {
                error!(
                    "this node has no Raft data, but the cluster it belongs to has history (a peer has entries): \
                     its data was lost (raft.redb deleted or emptied, or a new disk), or it joins for the first time. \
                     It neither votes nor serves reads until the leader has caught it up. See README: \"A node that lost its data\""
                );
                readiness.set_past(Past::Lost);
            }
            Past::Forming => {
                info!("no Raft data and no peer has history: forming a new cluster");
                readiness.set_past(Past::Forming);
            }
            Past::Unknown | Past::Intact => {}
        }
        if readiness.past() != Past::Unknown {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(PROBE_EVERY) => {}
            () = crate::shutdown::stopped(&mut stopping) => return,
        }
    }
}

/// Asks one peer for its status; `None` when it does not answer in time.
pub(super) async fn ask(addr: &str, transport: &Transport) -> Option<PeerAnswer> {
    let resp = status_of(addr, transport).await?;
    Some(PeerAnswer { initialized: resp.initialized, last_log_index: resp.last_log_index })
}

/// Asks one peer for the membership it knows; `None` without an answer.
pub(super) async fn ask_membership(addr: &str, transport: &Transport) -> Option<MembershipAnswer> {
    let resp = status_of(addr, transport).await?;
    Some(MembershipAnswer {
        initialized: resp.initialized,
        members: resp.nodes.iter().map(|n| n.id).collect(),
        removed: resp.removed.into_iter().collect(),
    })
}

async fn status_of(addr: &str, transport: &Transport) -> Option<crate::pb::v1::StatusResponse> {
    let channel = lazy_channel_with(addr, transport).ok()?;
    let mut client = CoordinatorClient::new(channel);
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(PROBE_TIMEOUT);
    Some(tokio::time::timeout(PROBE_TIMEOUT, client.status(req)).await.ok()?.ok()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(initialized: bool, last_log_index: u64) -> Option<PeerAnswer> {
        Some(PeerAnswer { initialized, last_log_index })
    }

    #[test]
    fn an_empty_node_learns_its_past_from_the_peers_that_answer() {
        assert_eq!(past_from_answers(&[None, None]), Past::Unknown);
        // First formation: peers empty, or only the initial membership.
        assert_eq!(past_from_answers(&[a(false, 0), None]), Past::Forming);
        assert_eq!(past_from_answers(&[a(true, 0), a(false, 0)]), Past::Forming);
        // Any peer with entries past formation: history exists.
        assert_eq!(past_from_answers(&[a(false, 0), a(true, 1)]), Past::Lost);
        assert_eq!(past_from_answers(&[None, a(true, 12_000)]), Past::Lost);
    }

    #[test]
    fn the_identity_file_names_its_node() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_identity(dir.path(), 3).unwrap().is_none());
        write_identity(dir.path(), 3).unwrap();
        assert_eq!(read_identity(dir.path(), 3).unwrap(), Some(Identity { node_id: 3 }));
        let e = read_identity(dir.path(), 2).unwrap_err().to_string();
        assert!(e.contains("belongs to node 3, but this is node 2"), "{e}");
        std::fs::write(dir.path().join(IDENTITY_FILE), "garbage").unwrap();
        assert!(read_identity(dir.path(), 3).unwrap_err().to_string().contains("not a quorate identity file"));
    }
}

//! The cluster as a client sees it: every node asked for its own status.
//!
//! Each endpoint (and every member the answering nodes know of) is asked for
//! its status with a short timeout. A node is `reachable` when it answered;
//! its role is the one it reports for itself. The leader is the node that
//! says it leads in the highest term.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Client;
use crate::pb::v1 as pb;

const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

async fn ask(client: &Client, addr: &str) -> Option<pb::StatusResponse> {
    let mut c = client.raw(addr).ok()?;
    let mut req = tonic::Request::new(pb::StatusRequest {});
    req.set_timeout(STATUS_TIMEOUT);
    let resp = tokio::time::timeout(STATUS_TIMEOUT, c.status(req)).await.ok()?.ok()?;
    Some(resp.into_inner())
}

/// One node in the combined view.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeView {
    pub id: Option<u64>,
    pub addr: String,
    pub role: String,
    pub reachable: bool,
    /// Its last applied log index, when it answered.
    pub applied: Option<u64>,
    /// Whether it has caught up since it started, when it answered.
    pub caught_up: Option<bool>,
}

/// The combined view `status` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterView {
    pub leader: Option<u64>,
    pub term: u64,
    pub nodes: Vec<NodeView>,
}

/// Asks every endpoint and member, and combines the answers.
pub async fn cluster_view(client: &Client) -> ClusterView {
    let mut answers: BTreeMap<String, Option<pb::StatusResponse>> = BTreeMap::new();
    let mut to_ask: Vec<String> = client.endpoints().to_vec();
    // Two rounds at most: the endpoints, then members they told us about.
    for _ in 0..2 {
        let asks = to_ask.iter().map(|a| async move { (a.clone(), ask(client, a).await) });
        for (addr, resp) in futures::future::join_all(asks).await {
            answers.insert(addr, resp);
        }
        to_ask = answers
            .values()
            .flatten()
            .flat_map(|s| s.nodes.iter().map(|n| n.addr.clone()))
            .filter(|a| !answers.contains_key(a))
            .collect();
        to_ask.sort();
        to_ask.dedup();
        if to_ask.is_empty() {
            break;
        }
    }
    let leader = answers.values().flatten().filter(|s| s.role == "leader").max_by_key(|s| s.term);
    let term = answers.values().flatten().map(|s| s.term).max().unwrap_or(0);
    // Membership as the leader (else any answering node) reports it.
    let members: Vec<(u64, String)> = leader
        .or_else(|| answers.values().flatten().next())
        .map(|s| s.nodes.iter().map(|n| (n.id, n.addr.clone())).collect())
        .unwrap_or_default();
    let mut nodes: Vec<NodeView> = members
        .iter()
        .map(|(id, addr)| {
            let own = answers.get(addr).cloned().flatten();
            NodeView {
                id: Some(*id),
                addr: addr.clone(),
                role: own.as_ref().map_or_else(|| "unknown".to_owned(), |s| s.role.clone()),
                reachable: own.is_some(),
                applied: own.as_ref().map(|s| s.last_applied),
                caught_up: own.as_ref().map(|s| s.caught_up),
            }
        })
        .collect();
    // Endpoints that are not members (or that nobody could tell us about).
    for (addr, resp) in &answers {
        if !members.iter().any(|(_, a)| a == addr) {
            nodes.push(NodeView {
                id: resp.as_ref().map(|s| s.node_id),
                addr: addr.clone(),
                role: resp.as_ref().map_or_else(|| "unknown".to_owned(), |s| s.role.clone()),
                reachable: resp.is_some(),
                applied: resp.as_ref().map(|s| s.last_applied),
                caught_up: resp.as_ref().map(|s| s.caught_up),
            });
        }
    }
    ClusterView { leader: leader.map(|s| s.node_id), term, nodes }
}

//! A coordinator's HTTP health endpoints (etcd and orchestrator style) and
//! `/metrics`, served by [`crate::http`] on `http_listen`:
//!
//! - `/livez`: 200 while the process runs and its Raft core has not stopped;
//! - `/readyz`: 200 when a leader is known, this node has caught up since it
//!   started, and a linearizable read succeeds (on the leader a ReadIndex
//!   round; on a follower a linearizable `GetLease` asked of the leader,
//!   which its leader lease or a quorum round confirms, as etcd's followers
//!   forward their ReadIndex);
//! - `/leader`: 200 on the Raft leader only (orchestrator's
//!   `/api/leader-check`, with 503 elsewhere as every check here);
//! - `/metrics`: [`super::metrics`].
//!
//! Every check answers 200 or 503 with a JSON body
//! `{"health": "true"|"false", "reason": ..., ...}`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::metrics::ServerMetrics;
use crate::http::{Handler, Reply};
use crate::pb::v1 as pb;
use crate::pb::v1::coordinator_client::CoordinatorClient;
use crate::raft::Role;
use crate::service::{Node, ReadConsistency};
use crate::wire::lazy_channel_with;

/// The paths a coordinator's listener serves.
pub const PATHS: &[&str] = &["/livez", "/readyz", "/leader", "/metrics"];

/// The lease name a follower's `/readyz` reads from the leader (any valid
/// name does: an unknown lease reads as free).
const PROBE_LEASE: &str = "quorate-readyz";

/// A coordinator's HTTP handler.
#[derive(Debug, Clone)]
pub struct CoordinatorHttp {
    pub node: Node,
    pub metrics: Arc<ServerMetrics>,
}

impl Handler for CoordinatorHttp {
    async fn handle(&self, path: &str, _query: Option<&str>) -> Reply {
        match path {
            "/livez" => self.livez(),
            "/readyz" => self.readyz().await,
            "/leader" => self.leader(),
            "/metrics" => Reply::metrics(self.metrics.render(&self.node).await),
            _ => Reply::not_found(PATHS),
        }
    }
}

impl CoordinatorHttp {
    fn body(&self, ok: bool, reason: &str) -> serde_json::Value {
        let view = self.node.raft.view();
        json!({
            "health": ok.to_string(),
            "reason": reason,
            "node_id": self.node.id,
            "role": view.role.as_str(),
            "term": view.term,
            "leader": view.leader,
            "caught_up": self.node.readiness.caught_up(),
        })
    }

    fn livez(&self) -> Reply {
        match self.node.raft.view().stopped {
            Some(reason) => Reply::check(false, &self.body(false, &format!("RAFT STOPPED: {reason}"))),
            None => Reply::check(true, &self.body(true, "")),
        }
    }

    fn leader(&self) -> Reply {
        let ok = self.node.raft.view().role == Role::Leader;
        Reply::check(ok, &self.body(ok, if ok { "" } else { "NOT LEADER" }))
    }

    async fn readyz(&self) -> Reply {
        let reason = match self.ready().await {
            Ok(()) => return Reply::check(true, &self.body(true, "")),
            Err(r) => r,
        };
        Reply::check(false, &self.body(false, &reason))
    }

    /// Why this node is not ready, if it is not.
    async fn ready(&self) -> Result<(), String> {
        let view = self.node.raft.view();
        if let Some(reason) = view.stopped {
            return Err(format!("RAFT STOPPED: {reason}"));
        }
        let Some(leader) = view.leader else { return Err("RAFT NO LEADER".into()) };
        if !self.node.readiness.caught_up() {
            return Err("CATCHING UP: this node has not caught up with the cluster since it started".into());
        }
        if view.role == Role::Leader {
            return self.node.confirm_read(ReadConsistency::ReadIndex).await.map_err(|e| format!("READ FAILED: {e}"));
        }
        let addr = self.node.node_addr(leader).ok_or_else(|| format!("RAFT LEADER {leader} UNKNOWN ADDRESS"))?;
        self.read_from(&addr).await.map_err(|e| format!("READ FAILED at leader {leader}: {e}"))
    }

    /// A linearizable read at the leader at `addr`, bounded.
    async fn read_from(&self, addr: &str) -> Result<(), String> {
        let bound = Duration::from_millis((self.node.config.election_timeout_max_ms * 2).max(1_000));
        let channel = lazy_channel_with(addr, &self.node.transport).map_err(|e| e.to_string())?;
        let mut client = CoordinatorClient::new(channel);
        let mut req = tonic::Request::new(pb::GetLeaseRequest {
            group: PROBE_LEASE.into(),
            consistency: pb::Consistency::Linearizable as i32,
        });
        req.set_timeout(bound);
        match tokio::time::timeout(bound, client.get_lease(req)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {} ms", bound.as_millis())),
        }
    }
}

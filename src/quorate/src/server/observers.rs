//! Coordinator nodes observe every member of every group, like agents do:
//! the same observation loop (`crate::observation`), over all groups at
//! once (one read per store per tick, one report per tick with changes,
//! unchanged views renewed by refreshes rather than sent again), reporting
//! as `coordinator-N`. While this node leads, it hands its
//! reports to its own service layer in-process; as a follower it sends them
//! to the leader through a client (only the leader proposes). The set of
//! groups follows the replicated state.

use crate::tls::caller::Caller;
use std::sync::Arc;
use std::time::Duration;

use quorate_core::group::GroupSpec;
use quorate_core::machine::ChangeKind;
use quorate_core::matrix::Observer;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, info_span, warn};

use super::Node;
use crate::api::{report_from_pb, reported_pb};
use crate::client::{Client, ClientError};
use crate::observation::store::RedisStores;
use crate::observation::{Observe, ReportSink};
use crate::pb::v1 as pb;
use crate::redis_access::RedisAccess;
use crate::service::ServiceError;
use crate::service::batch::Batcher;

/// How often the set of groups is re-read without a change event.
const RESYNC_EVERY: Duration = Duration::from_secs(1);
/// After a group change, how long more changes are gathered before the set
/// is re-read: re-reading (and re-planning the observation loop) costs
/// O(groups), so doing it per change made creating N groups cost O(N²).
const COALESCE: Duration = Duration::from_millis(200);

/// Where a coordinator's own reports go: its node's batcher while it
/// leads, else the leader (through `client`).
struct OwnNode {
    node: Node,
    reports: Batcher,
    client: Client,
}

/// Why a coordinator's report did not get through.
#[derive(Debug, thiserror::Error)]
enum OwnReportError {
    #[error(transparent)]
    Local(#[from] ServiceError),
    #[error(transparent)]
    Remote(#[from] ClientError),
}

impl ReportSink for OwnNode {
    type Error = OwnReportError;

    async fn report(&self, req: pb::ReportRequest) -> Result<pb::ReportResponse, OwnReportError> {
        if self.node.raft.is_leader() {
            match self.reports.report(&Caller::Internal, report_from_pb(req.clone())?).await {
                Ok(reported) => return Ok(reported_pb(&reported)),
                // Leadership moved meanwhile: the leader takes it.
                Err(ServiceError::NotLeader { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.client.report_view(req).await?)
    }
}

fn specs_of(node: &Node) -> Vec<GroupSpec> {
    node.reader.with_machine(|m, _| m.groups().map(|g| g.spec.clone()).collect())
}

/// Runs until the node stops.
/// Heartbeat stores are reached with `redis` (this node's credentials and
/// TLS for Redis).
pub async fn observe_groups(node: Node, reports: Batcher, redis: Arc<RedisAccess>) {
    // The membership's addresses and the seeds: the client follows leader
    // hints from there to wherever the leader is now.
    let endpoints: Vec<String> = node.known_addrs().into_values().collect();
    let sink = match Client::new_with(&endpoints, node.transport.clone()) {
        Ok(client) => Arc::new(OwnNode { node: node.clone(), reports, client }),
        Err(e) => {
            warn!("cannot observe groups: {e}");
            return;
        }
    };
    let observer = Observer::Coordinator(node.id);
    let (specs_tx, specs_rx) = watch::channel(specs_of(&node));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Dropping the set (when this task ends or is aborted) aborts the loop.
    let mut task = JoinSet::new();
    let observe = Observe {
        observer: observer.clone(),
        incarnation: node.clock.boot_id(),
        specs: specs_rx,
        status: None,
        stores: Arc::new(RedisStores::with_access(redis)),
        sink,
    };
    task.spawn(observe.run(stop_rx).instrument(info_span!("observe", observer = %observer)));
    let mut changes = node.reader.subscribe();
    let mut stopping = node.stopping.clone();
    loop {
        let resync = tokio::time::sleep(RESYNC_EVERY);
        tokio::pin!(resync);
        // Wait for a spec change (or the periodic resync).
        let stop = loop {
            tokio::select! {
                ev = changes.recv() => match ev {
                    // A spec stored or a group deleted: observe the new set.
                    Ok(ev) if !matches!(ev.change.kind, ChangeKind::GroupApplied | ChangeKind::GroupDeleted) => {}
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break false,
                    Err(broadcast::error::RecvError::Closed) => break true,
                },
                () = &mut resync => break false,
                () = crate::shutdown::stopped(&mut stopping) => break true,
            }
        };
        if stop {
            break;
        }
        // Gather the rest of a burst of changes (bounded by COALESCE).
        let gather = tokio::time::sleep(COALESCE);
        tokio::pin!(gather);
        let stop = loop {
            tokio::select! {
                ev = changes.recv() => if matches!(ev, Err(broadcast::error::RecvError::Closed)) { break true },
                () = &mut gather => break false,
                () = crate::shutdown::stopped(&mut stopping) => break true,
            }
        };
        if stop {
            break;
        }
        let specs = specs_of(&node);
        specs_tx.send_if_modified(|s| {
            let changed = *s != specs;
            if changed {
                *s = specs;
            }
            changed
        });
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), task.join_next()).await;
}

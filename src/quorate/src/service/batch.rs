//! Group commit for reports: concurrent `Report` calls share one log entry.
//!
//! Every agent reports once a second, so a large deployment sends a steady
//! stream of small writes. Each write has a fixed cost (replication round
//! trip, fsync on a majority, apply, wakeups) that dwarfs its content, so
//! the batcher collects the reports that arrive while the previous batch is
//! being committed (and for a short linger) and proposes them as one
//! `Op::Batch`. One batch is in flight at a time; the queue is bounded, and
//! so is a batch: by count and by encoded size, under
//! [`MAX_ENTRY_BYTES`]. A report that does not fit in an entry by itself is
//! refused at once, alone; one that does not fit in the batch being filled
//! starts the next.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use quorate_core::Op;
use quorate_core::machine::Outcome;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::Node;
use super::error::ServiceError;
use super::limits::{MAX_RATE_BUCKETS, RateLimiter};
use crate::raft::{MAX_ENTRY_BYTES, encoded_len};

/// How long the batcher waits for more reports before proposing. Reports
/// are not latency-critical at this scale (down detection takes hundreds of
/// ms); entries are expensive.
const LINGER: Duration = Duration::from_millis(10);
/// The most commands in one entry.
const MAX_BATCH: usize = 512;
/// Reports waiting for a batch; beyond it callers wait for room.
const QUEUE: usize = 4096;
/// Room left in an entry for the batch's envelope and the leader's stamp.
const ENVELOPE_BYTES: usize = 1024;
/// The most encoded bytes of commands in one batch.
const MAX_BATCH_BYTES: usize = MAX_ENTRY_BYTES - ENVELOPE_BYTES;

type Reply = oneshot::Sender<Result<Outcome, ServiceError>>;

/// The handle the API uses to submit a command to the batcher; reports
/// (`service::reports`) are checked against the node's state and rate
/// limited per identity on the way in.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<(Op, Reply)>,
    pub(super) node: Node,
    /// Reports per member identity (`max_reports_per_s`).
    pub(super) rates: Arc<Mutex<RateLimiter<String>>>,
}

impl Batcher {
    /// Starts the batching task; it ends when every handle is dropped.
    pub fn start(node: Node) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rates = RateLimiter::new(node.config.max_reports_per_s, MAX_RATE_BUCKETS);
        let handle = Self { tx, node: node.clone(), rates: Arc::new(Mutex::new(rates)) };
        let task = tokio::spawn(run(node, rx).instrument(tracing::info_span!("report_batcher")));
        (handle, task)
    }

    /// Proposes `op` in the next batch and waits for its own outcome.
    pub async fn propose(&self, op: Op) -> Result<Outcome, ServiceError> {
        let node_id = self.node.id;
        let (reply, rx) = oneshot::channel();
        let stopped = || ServiceError::Stopped { node_id, detail: "the report batcher stopped".into() };
        self.tx.send((op, reply)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn run(node: Node, mut rx: mpsc::Receiver<(Op, Reply)>) {
    // A report that did not fit in the previous batch opens the next one.
    let mut carried: Option<(Op, Reply, usize)> = None;
    loop {
        let (op, reply, size) = match carried.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some((op, reply)) => {
                    let size = encoded_len(&op);
                    (op, reply, size)
                }
                None => return,
            },
        };
        if size > MAX_BATCH_BYTES {
            let _ = reply.send(Err(too_large(&op, size)));
            continue;
        }
        let mut bytes = size;
        let mut batch = vec![(op, reply)];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                item = rx.recv() => match item {
                    Some((op, reply)) => {
                        let size = encoded_len(&op);
                        if bytes + size > MAX_BATCH_BYTES {
                            carried = Some((op, reply, size));
                            break;
                        }
                        bytes += size;
                        batch.push((op, reply));
                    }
                    None => break,
                },
                () = &mut linger => break,
            }
        }
        let (ops, replies): (Vec<Op>, Vec<Reply>) = batch.into_iter().unzip();
        match node.propose_all(ops).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn too_large(op: &Op, bytes: usize) -> ServiceError {
    let what = match op {
        Op::Report { views, .. } => format!("a report with {} views", views.len()),
        Op::Refresh { views, .. } => format!("a refresh of {} views", views.len()),
        _ => "a command".to_owned(),
    };
    ServiceError::TooLarge { what, bytes, limit: MAX_BATCH_BYTES }
}

//! Group commit for reports: concurrent `Report` calls share one log entry.
//!
//! Every agent reports once a second, so a large deployment sends a steady
//! stream of small writes. Each write has a fixed cost (replication round
//! trip, fsync on a majority, apply, wakeups) that dwarfs its content, so
//! the batcher collects the reports that arrive while the previous batch is
//! being committed (and for a short linger) and proposes them as one
//! `Op::Batch`. One batch is in flight at a time; the queue is bounded.

use std::time::Duration;

use quorate_core::Op;
use quorate_core::machine::Outcome;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::error::ApiError;
use crate::server::Node;

/// How long the batcher waits for more reports before proposing. Reports
/// are not latency-critical at this scale (down detection takes hundreds of
/// ms); entries are expensive.
const LINGER: Duration = Duration::from_millis(10);
/// The most commands in one entry.
const MAX_BATCH: usize = 512;
/// Reports waiting for a batch; beyond it callers wait for room.
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<Outcome, ApiError>>;

/// The handle the API uses to submit a command to the batcher.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<(Op, Reply)>,
}

impl Batcher {
    /// Starts the batching task; it ends when every handle is dropped.
    pub fn start(node: Node) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(node, rx).instrument(tracing::info_span!("report_batcher")));
        (Self { tx }, task)
    }

    /// Proposes `op` in the next batch and waits for its own outcome.
    pub async fn propose(&self, op: Op, node_id: u64) -> Result<Outcome, ApiError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || ApiError::Stopped { node_id, detail: "the report batcher stopped".into() };
        self.tx.send((op, reply)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn run(node: Node, mut rx: mpsc::Receiver<(Op, Reply)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => batch.push(item),
                    None => break,
                },
                () = &mut linger => break,
            }
        }
        let (ops, replies): (Vec<Op>, Vec<Reply>) = batch.into_iter().unzip();
        let result = if ops.len() == 1 {
            node.propose(ops.into_iter().next().expect("one op")).await.map(|o| vec![o])
        } else {
            let n = ops.len();
            match node.propose(Op::Batch(ops)).await {
                Ok(Outcome::Batch(outcomes)) if outcomes.len() == n => Ok(outcomes),
                Ok(other) => Err(ApiError::Internal(format!("a batch of {n} commands applied as {other:?}"))),
                Err(e) => Err(e),
            }
        };
        match result {
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

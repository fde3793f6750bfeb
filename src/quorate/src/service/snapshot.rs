//! Backups: a consistent snapshot of the whole replicated state, read on
//! the leader.
//!
//! The leader first confirms a linearizable read (a ReadIndex round, which
//! also waits until its state machine has applied everything committed
//! before the read arrived), then encodes the state machine as it stands,
//! under the reader's lock, as one backup file (`crate::backup`). What it
//! holds is therefore at least as new as every write acknowledged before
//! the call, and one state, never half of two.

use quorate_core::access::Action;

use super::{Node, ReadConsistency, ServiceError};
use crate::backup::{self, Backup};
use crate::tls::caller::Caller;

/// A backup file as the leader encoded it.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    /// The whole file: header and state.
    pub bytes: Vec<u8>,
    /// The log index the state was read at.
    pub revision: u64,
    pub served_by: u64,
}

impl Node {
    /// A backup of the cluster's state (admin only; must reach the leader).
    pub async fn save_snapshot(&self, caller: &Caller) -> Result<SnapshotFile, ServiceError> {
        caller.check(Action::Backup)?;
        self.confirm_read(ReadConsistency::ReadIndex).await?;
        let wall_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        // Copy under the lock, encode without it: applies go on meanwhile.
        let (machine, revision) = self.reader.with_machine_at(|m, _, applied| (m.clone(), applied));
        let file = Backup {
            machine,
            revision,
            served_by: self.id,
            taken_at_unix_ms: wall_ms,
            quorate_version: crate::VERSION.to_owned(),
        };
        let bytes = backup::encode(&file).map_err(|e| match e {
            backup::BackupError::TooLarge { .. } => ServiceError::ResourceExhausted(e.to_string()),
            e => ServiceError::Internal(e.to_string()),
        })?;
        Ok(SnapshotFile { bytes, revision, served_by: self.id })
    }
}

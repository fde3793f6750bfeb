//! The Raft log, vote and committed index, persisted in redb.
//!
//! Durability, as openraft requires it:
//! - `save_vote` commits with `Durability::Immediate` before returning;
//! - `append` commits its batch with `Durability::Immediate` and only then
//!   reports the I/O complete, so entries are on disk when openraft counts
//!   them; they are readable by every reader as soon as `append` returns;
//! - `truncate_after` is durable at once (rare, and it must not resurface);
//! - `purge` and `save_committed` use `Durability::None`: redb makes them
//!   durable with the next immediate commit, in order. A lost purge only
//!   leaves extra entries below the snapshot; a lost committed index is an
//!   older, still-true committed index, from which openraft re-applies.
//!
//! All writes are serialized by redb's single writer and by openraft, which
//! calls the store from one task, so vote and log writes reach the disk in
//! submission order. Blocking redb calls run on tokio's blocking pool.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prometheus_client::metrics::histogram::Histogram;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};

use super::{Entry, LogId, TypeConfig, Vote};

/// Log entries by index, JSON-encoded.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Small values by name: vote, committed, last purged, snapshot.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

pub(super) const KEY_VOTE: &str = "vote";
pub(super) const KEY_COMMITTED: &str = "committed";
pub(super) const KEY_LAST_PURGED: &str = "last_purged";

/// The storage error of this layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the Raft store at {path}: {source}")]
    Open { path: String, source: redb::DatabaseError },
    #[error("Raft store: {0}")]
    Io(#[from] io::Error),
}

/// redb's page cache. Its default (1 GiB) let every node's memory grow
/// with the log until the first snapshot; the working set is the recent
/// log tail and the snapshot, far smaller.
const CACHE_BYTES: usize = 64 << 20;

/// Opens (or creates) the node's redb database file.
pub fn open_database(path: &Path) -> Result<Arc<Database>, StoreError> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
    let store = Arc::new(db);
    // Create the tables so that read transactions never see them missing.
    let txn = store.begin_write().map_err(io_err)?;
    txn.open_table(LOG).map_err(io_err)?;
    txn.open_table(META).map_err(io_err)?;
    txn.commit().map_err(io_err)?;
    Ok(store)
}

pub(super) fn io_err(e: impl Into<redb::Error>) -> io::Error {
    io::Error::other(e.into())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(super) fn encode<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

/// Runs a write transaction on the blocking pool and commits it.
pub(super) async fn write_txn<F>(db: &Arc<Database>, durability: Durability, f: F) -> io::Result<()>
where
    F: FnOnce(&WriteTransaction) -> io::Result<()> + Send + 'static,
{
    let db = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut txn = db.begin_write().map_err(io_err)?;
        txn.set_durability(durability).map_err(io::Error::other)?;
        f(&txn)?;
        txn.commit().map_err(io_err)
    })
    .await
    .map_err(io::Error::other)?
}

pub(super) fn read_meta<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> io::Result<Option<T>> {
    let txn = db.begin_read().map_err(io_err)?;
    let table = txn.open_table(META).map_err(io_err)?;
    match table.get(key).map_err(io_err)? {
        Some(v) => decode(v.value()).map(Some),
        None => Ok(None),
    }
}

pub(super) fn put_meta(txn: &WriteTransaction, key: &str, bytes: &[u8]) -> io::Result<()> {
    let mut table = txn.open_table(META).map_err(io_err)?;
    table.insert(key, bytes).map_err(io_err)?;
    Ok(())
}

/// Whether the store holds nothing at all: no vote, no log, no snapshot,
/// as a node that never ran (or lost its data) finds it.
pub fn is_empty(db: &Database) -> Result<bool, StoreError> {
    let txn = db.begin_read().map_err(io_err)?;
    let log = txn.open_table(LOG).map_err(io_err)?;
    let meta = txn.open_table(META).map_err(io_err)?;
    Ok(log.is_empty().map_err(io_err)? && meta.is_empty().map_err(io_err)?)
}

/// The log store: a handle on the node's redb database.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
    appended: Arc<AtomicU64>,
    commit_seconds: Histogram,
}

/// The buckets of the commit latency histogram: 0.25 ms to about 4 s.
fn commit_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_25, 2.0, 15)
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> Self {
        Self { db, appended: Arc::new(AtomicU64::new(0)), commit_seconds: Histogram::new(commit_buckets()) }
    }

    /// How long each append took to commit, fsync included (the metric
    /// `quorate_raft_log_commit_duration_seconds`); clones share it.
    pub fn commit_histogram(&self) -> Histogram {
        self.commit_seconds.clone()
    }

    /// A counter of the encoded bytes appended since this process started
    /// (snapshots are triggered by how much log accumulates).
    pub fn appended_bytes(&self) -> Arc<AtomicU64> {
        self.appended.clone()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(LOG).map_err(io_err)?;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in table.range(start..).map_err(io_err)? {
            let (k, v) = item.map_err(io_err)?;
            if !range.contains(&k.value()) {
                break;
            }
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        read_meta(&self.db, KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = read_meta(&self.db, KEY_LAST_PURGED)?;
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(LOG).map_err(io_err)?;
        let last = match table.last().map_err(io_err)? {
            Some((_, v)) => Some(decode::<Entry>(v.value())?.log_id),
            None => None,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode(vote)?;
        write_txn(&self.db, Durability::Immediate, move |txn| put_meta(txn, KEY_VOTE, &bytes)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // No fsync (Durability::None), so no need for the blocking pool: a
        // thread hop per commit costs more than the write itself.
        let bytes = encode(&committed)?;
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::None).map_err(io::Error::other)?;
        put_meta(&txn, KEY_COMMITTED, &bytes)?;
        txn.commit().map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(read_meta::<Option<LogId>>(&self.db, KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        let mut bytes = 0u64;
        for e in entries {
            let row = encode(&e)?;
            bytes += row.len() as u64;
            rows.push((e.log_id.index, row));
        }
        self.appended.fetch_add(bytes, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let res = write_txn(&self.db, Durability::Immediate, move |txn| {
            let mut table = txn.open_table(LOG).map_err(io_err)?;
            for (index, bytes) in &rows {
                table.insert(*index, bytes.as_slice()).map_err(io_err)?;
            }
            Ok(())
        })
        .await;
        self.commit_seconds.observe(started.elapsed().as_secs_f64());
        match res {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        write_txn(&self.db, Durability::Immediate, move |txn| {
            let mut table = txn.open_table(LOG).map_err(io_err)?;
            table.retain_in(from.., |_, _| false).map_err(io_err)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let bytes = encode(&Some(log_id))?;
        let upto = log_id.index;
        write_txn(&self.db, Durability::None, move |txn| {
            // Record the purge point first; one transaction, so both or neither.
            put_meta(txn, KEY_LAST_PURGED, &bytes)?;
            let mut table = txn.open_table(LOG).map_err(io_err)?;
            table.retain_in(..=upto, |_, _| false).map_err(io_err)?;
            Ok(())
        })
        .await
    }
}

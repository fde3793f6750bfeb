//! The state machine adapter: the pure [`Machine`] behind openraft's trait.
//!
//! The machine itself is kept in memory (it is small); snapshots are written to
//! redb with immediate durability, and the log store persists the committed
//! index, so openraft rebuilds the machine at start-up by installing the last
//! snapshot and re-applying the committed log after it.
//!
//! The read side ([`SmReader`]) is shared with the API layer: reads take a
//! short `std::sync::RwLock` (never held across an await) and watchers get
//! every change through a bounded broadcast channel.
//!
//! [`seed`] writes a restored state into an empty store as the snapshot a
//! freshly initialized cluster would have at its first log entry: the node
//! starts as a member of the cluster with that state, and the others
//! receive it from it by Raft (InstallSnapshot), as they would any
//! snapshot.

use std::io;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use quorate_core::machine::{Change, ClockBase, LogPosition, ReaderClock};
use quorate_core::{LeaseView, Machine};
use redb::{Database, Durability};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::log_store::{
    KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, META, StoreError, encode, io_err, is_empty, put_meta, read_meta,
    write_txn,
};
use super::{LogId, NodeClock, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

const KEY_SNAPSHOT: &str = "snapshot";

/// How many unread changes a slow watcher may fall behind before it is told
/// to resynchronize.
pub const CHANGE_CHANNEL_CAPACITY: usize = 4096;

/// A change with the log index that made it.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub index: u64,
    pub change: Change,
}

/// Everything the state machine holds, as one serializable value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SmState {
    machine: Machine,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Every node id a membership change ever took out (see
    /// `quorate_core::membership::removed_by`): derived from the log, so
    /// every node agrees, and kept in snapshots so it is never forgotten.
    /// A removed id is never added again, and a removed node that comes
    /// back is told so.
    #[serde(default)]
    removed: std::collections::BTreeSet<u64>,
}

/// A persisted snapshot: its meta and its bytes.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// When this node last applied a command, for estimating the leader's clock
/// on a follower.
#[derive(Debug, Clone, Copy)]
struct ApplyMark {
    base: ClockBase,
    stamp_ms: u64,
    local: Instant,
}

/// The read side of the state machine, shared with the API layer.
#[derive(Debug)]
pub struct SmReader {
    state: RwLock<SmState>,
    changes: broadcast::Sender<ChangeEvent>,
    last_mark: Mutex<Option<ApplyMark>>,
    clock: NodeClock,
}

impl SmReader {
    /// Subscribes to every change applied from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.changes.subscribe()
    }

    /// The last applied log index (0 when nothing is applied).
    pub fn last_applied_index(&self) -> u64 {
        self.read(|s| s.last_applied.as_ref().map_or(0, |l| l.index))
    }

    /// The Raft voters as the state machine last applied them: the
    /// coordinators that observe every member.
    pub fn voters(&self) -> Vec<u64> {
        self.read(|s| s.membership.membership().voter_ids().collect())
    }

    /// Every node of the Raft membership as the state machine last applied
    /// it, voters and learners.
    pub fn node_ids(&self) -> std::collections::BTreeSet<u64> {
        self.read(|s| s.membership.membership().nodes().map(|(id, _)| *id).collect())
    }

    /// Every node id ever removed from the membership.
    pub fn removed_nodes(&self) -> std::collections::BTreeSet<u64> {
        self.read(|s| s.removed.clone())
    }

    /// Whether node `id` was ever removed from the membership.
    pub fn is_removed(&self, id: u64) -> bool {
        self.read(|s| s.removed.contains(&id))
    }

    /// Node `id`'s address in the membership as last applied.
    pub fn node_addr(&self, id: u64) -> Option<String> {
        self.read(|s| s.membership.membership().get_node(&id).map(|n| n.addr.clone()))
    }

    /// Every node of the membership as last applied, with its address.
    pub fn node_addrs(&self) -> std::collections::BTreeMap<u64, String> {
        self.read(|s| s.membership.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect())
    }

    /// `now` on the machine's clock for computing verdicts: as measured by
    /// [`Self::reader_clock`], else the machine's last applied reading.
    pub fn machine_now(&self, machine: &Machine) -> u64 {
        match self.reader_clock(machine) {
            ReaderClock::Now(n) => n,
            ReaderClock::Unknown => machine.clock().map_or(0, |c| c.1),
        }
    }

    /// Number of groups with a lease.
    pub fn lease_count(&self) -> usize {
        self.read(|s| s.machine.lease_count())
    }

    /// `group`'s lease now, with the remaining time measured as well as this
    /// node can (see [`Self::reader_clock`]).
    pub fn lease(&self, group: &str) -> LeaseView {
        self.read(|s| s.machine.lease(group, self.reader_clock(&s.machine)))
    }

    /// Runs `f` on the machine with the reader's clock.
    pub fn with_machine<T>(&self, f: impl FnOnce(&Machine, ReaderClock) -> T) -> T {
        self.read(|s| f(&s.machine, self.reader_clock(&s.machine)))
    }

    /// [`Self::with_machine`], also passing the last applied log index of
    /// the same state (a revision that orders reads across nodes).
    pub fn with_machine_at<T>(&self, f: impl FnOnce(&Machine, ReaderClock, u64) -> T) -> T {
        self.read(|s| f(&s.machine, self.reader_clock(&s.machine), s.last_applied.as_ref().map_or(0, |l| l.index)))
    }

    /// `now` on the machine's clock when that clock is this process's own
    /// (this node leads and its first entry of the term is applied).
    pub fn own_clock_now(&self, machine: &Machine) -> Option<u64> {
        let (base, _) = machine.clock()?;
        (base.node_id == self.clock.node_id() && base.boot_id == self.clock.boot_id()).then(|| self.clock.now_ms())
    }

    /// `now` on the machine's clock, as this node can measure it:
    /// - exactly, when the machine runs on this process's clock (we lead);
    /// - estimated from the last apply otherwise, erring towards earlier
    ///   times (so leases look held for longer, never shorter);
    /// - unknown when nothing was applied on the machine's current clock.
    pub fn reader_clock(&self, machine: &Machine) -> ReaderClock {
        let Some((base, _)) = machine.clock() else { return ReaderClock::Unknown };
        if let Some(now) = self.own_clock_now(machine) {
            return ReaderClock::Now(now);
        }
        let mark = *self.last_mark.lock().unwrap_or_else(|p| p.into_inner());
        match mark {
            Some(m) if m.base == base => {
                let since = u64::try_from(m.local.elapsed().as_millis()).unwrap_or(u64::MAX);
                ReaderClock::Now(m.stamp_ms.saturating_add(since))
            }
            _ => ReaderClock::Unknown,
        }
    }

    fn read<T>(&self, f: impl FnOnce(&SmState) -> T) -> T {
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }
}

/// The openraft state machine: in memory, snapshots in redb.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    reader: Arc<SmReader>,
    db: Arc<Database>,
}

impl StateMachineStore {
    pub fn new(db: Arc<Database>, clock: NodeClock) -> Self {
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        let reader = SmReader { state: RwLock::new(SmState::default()), changes, last_mark: Mutex::new(None), clock };
        Self { reader: Arc::new(reader), db }
    }

    pub fn reader(&self) -> Arc<SmReader> {
        self.reader.clone()
    }

    fn write_state<T>(&self, f: impl FnOnce(&mut SmState) -> T) -> T {
        let mut guard = self.reader.state.write().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Copy under the lock, then encode and persist without it: apply runs
        // concurrently with the builder.
        let state = self.reader.read(|s| s.clone());
        let data = serde_json::to_vec(&state).map_err(io::Error::other)?;
        let meta = SnapshotMeta { last_log_id: state.last_applied, last_membership: state.membership.clone() };
        persist_snapshot(&self.db, &meta, &data).await?;
        Ok(Snapshot { meta, snapshot: data })
    }
}

async fn persist_snapshot(db: &Arc<Database>, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let stored =
        serde_json::to_vec(&StoredSnapshot { meta: meta.clone(), data: data.to_vec() }).map_err(io::Error::other)?;
    write_txn(db, Durability::Immediate, move |txn| {
        let mut table = txn.open_table(META).map_err(io_err)?;
        table.insert(KEY_SNAPSHOT, stored.as_slice()).map_err(io_err)?;
        Ok(())
    })
    .await
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok(self.reader.read(|s| (s.last_applied, s.membership.clone())))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + openraft::OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id;
            let (response, events) = self.write_state(|s| {
                s.last_applied = Some(log_id);
                match entry.payload {
                    EntryPayload::Blank => (None, Vec::new()),
                    EntryPayload::Membership(m) => {
                        let ids =
                            |m: &openraft::Membership<u64, openraft::BasicNode>| m.nodes().map(|(id, _)| *id).collect();
                        let gone = quorate_core::membership::removed_by(&ids(s.membership.membership()), &ids(&m));
                        s.removed.extend(gone);
                        s.membership = StoredMembership::new(Some(log_id), m);
                        (None, Vec::new())
                    }
                    EntryPayload::Normal(cmd) => {
                        let pos = LogPosition {
                            index: log_id.index,
                            term: log_id.leader_id.term,
                            leader_node_id: log_id.leader_id.node_id,
                        };
                        let applied = s.machine.apply(pos, &cmd);
                        if let Some((base, _)) = s.machine.clock() {
                            let mark = ApplyMark { base, stamp_ms: cmd.stamp.now_ms, local: Instant::now() };
                            *self.reader.last_mark.lock().unwrap_or_else(|p| p.into_inner()) = Some(mark);
                        }
                        let events: Vec<ChangeEvent> = applied
                            .changes
                            .into_iter()
                            .map(|change| ChangeEvent { index: log_id.index, change })
                            .collect();
                        (Some(applied.outcome), events)
                    }
                }
            });
            for ev in events {
                // No receivers is fine: nobody is watching.
                let _ = self.reader.changes.send(ev);
            }
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Vec<u8>) -> Result<(), io::Error> {
        let state: SmState =
            serde_json::from_slice(&snapshot).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if state.last_applied != meta.last_log_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot data is at {:?} but its meta says {:?}", state.last_applied, meta.last_log_id),
            ));
        }
        // Persist first: a crash after this point restarts from the new
        // snapshot; before it, from the old one. Never half of each.
        persist_snapshot(&self.db, meta, &snapshot).await?;
        self.write_state(|s| *s = state);
        *self.reader.last_mark.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let stored: Option<StoredSnapshot> = read_meta(&self.db, KEY_SNAPSHOT)?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: s.data }))
    }
}

/// Writes `machine` into the empty store `db` as the state of a new
/// cluster of `members` (id to address), as node `node_id` would hold it
/// right after forming that cluster: the membership entry at log index 0
/// (as `Raft::initialize` writes it), already applied, snapshotted and
/// purged, and this node's vote for itself at term 0. One transaction,
/// durable before it returns: the store is seeded whole or not at all.
///
/// On start, openraft installs the snapshot and the node campaigns; the
/// others (started empty) vote for it, since their logs are shorter, and
/// receive the state by snapshot, because the entry they lack is purged.
pub fn seed(
    db: &Database,
    node_id: u64,
    members: &std::collections::BTreeMap<u64, String>,
    machine: Machine,
) -> Result<(), StoreError> {
    use openraft::vote::{RaftLeaderId as _, RaftVote as _};
    use openraft::{BasicNode, Membership};
    if !is_empty(db)? {
        return Err(StoreError::Io(io::Error::other("the Raft store is not empty: a restore needs an empty data_dir")));
    }
    let leader_id = openraft::alias::LeaderIdOf::<TypeConfig>::new(0, node_id);
    let vote = super::Vote::from_leader_id(leader_id, true);
    let log_id = LogId::new(leader_id.to_committed(), 0);
    let voters: std::collections::BTreeSet<u64> = members.keys().copied().collect();
    let nodes: std::collections::BTreeMap<u64, BasicNode> =
        members.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
    let membership = Membership::new(vec![voters], nodes).map_err(|e| StoreError::Io(io::Error::other(e)))?;
    let stored = StoredMembership::new(Some(log_id), membership);
    // A new cluster: no node of it was ever removed.
    let state =
        SmState { machine, last_applied: Some(log_id), membership: stored.clone(), removed: Default::default() };
    let data = encode(&state)?;
    let snapshot =
        encode(&StoredSnapshot { meta: SnapshotMeta { last_log_id: Some(log_id), last_membership: stored }, data })?;
    let (vote, upto) = (encode(&vote)?, encode(&Some(log_id))?);
    let mut txn = db.begin_write().map_err(io_err)?;
    txn.set_durability(Durability::Immediate).map_err(io::Error::other)?;
    put_meta(&txn, KEY_SNAPSHOT, &snapshot)?;
    put_meta(&txn, KEY_VOTE, &vote)?;
    put_meta(&txn, KEY_LAST_PURGED, &upto)?;
    put_meta(&txn, KEY_COMMITTED, &upto)?;
    txn.commit().map_err(io_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};

    use super::*;
    use crate::raft::log_store::{LogStore, open_database};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().expect("temp dir");
            let db = open_database(&dir.path().join("raft.redb")).expect("open redb");
            Ok((dir, LogStore::new(db.clone()), StateMachineStore::new(db, NodeClock::new(0))))
        }
    }

    /// openraft's own storage conformance suite, against the real redb store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.expect("openraft storage suite");
    }
}

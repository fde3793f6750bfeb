//! Everything that touches openraft lives under this module.
//!
//! openraft 0.10 is an alpha whose APIs change between releases, so its types
//! stay behind this boundary: the rest of the crate sees [`RaftNode`] (the
//! one handle: leadership, propose, confirm a read, status, watch, start and
//! stop), the state machine's read side ([`state_machine::SmReader`]),
//! [`NodeClock`], [`Readiness`] and plain core types.
//!
//! - [`node`]: the [`RaftNode`] facade (membership changes included) and
//!   openraft's configuration.
//! - [`readiness`]: whether this node has caught up since it started.
//! - [`log_store`]: the Raft log, vote and committed index in redb.
//! - [`state_machine`]: the in-memory core [`quorate_core::Machine`] behind
//!   openraft's state-machine trait, with snapshots persisted in redb.
//! - [`network`]: the client side of Raft RPCs over tonic.
//! - [`service`]: the server side of Raft RPCs.

pub mod log_store;
pub mod network;
pub mod node;
pub mod readiness;
pub mod service;
pub mod state_machine;

pub use self::node::{MembershipView, RaftFailure, RaftNode, RaftStatus, RaftView, RaftWatch, ReadConfirm, Role};
pub use self::readiness::{Past, Readiness};

use std::time::Instant;

use openraft::BasicNode;
use quorate_core::machine::Outcome;
use quorate_core::{Command, LeaderStamp, LeaseTiming};

openraft::declare_raft_types!(
    /// The openraft type configuration of quorate.
    pub TypeConfig:
        D = Command,
        R = Option<Outcome>,
        NodeId = u64,
        Node = BasicNode,
);

/// The largest command one log entry may carry, JSON-encoded as it is
/// stored and sent. Every writer stays under it (the report batcher packs
/// by size, observers split their reports); a single request that would
/// exceed it is refused (`ServiceError::TooLarge`). It
/// bounds what one append and one apply cost: entries of several MB made
/// every replication attempt run out of time.
pub const MAX_ENTRY_BYTES: usize = 512 << 10;

/// The JSON-encoded size of `value`, without keeping the bytes.
pub fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Encoding into a counter does not fail for our types; if it did, the
    // value counts as too large for anything.
    match serde_json::to_writer(&mut c, value) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

/// The openraft handle, with our state machine (inside `raft/` only).
pub(crate) type Raft = openraft::Raft<TypeConfig, state_machine::StateMachineStore>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Vec<u8>>;

/// This process's monotonic clock, as stamped on the commands it proposes.
///
/// `boot_id` is random per process start: the state machine compares lease
/// times only between readings of one clock, and a restarted process has a
/// new one.
#[derive(Debug, Clone)]
pub struct NodeClock {
    node_id: u64,
    boot_id: u64,
    start: Instant,
}

impl NodeClock {
    pub fn new(node_id: u64) -> Self {
        Self { node_id, boot_id: rand::random(), start: Instant::now() }
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    /// Milliseconds since this process started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The local instant a reading of this clock corresponds to.
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.start + std::time::Duration::from_millis(ms)
    }

    /// A stamp for a command proposed now.
    pub fn stamp(&self, timing: LeaseTiming) -> LeaderStamp {
        let wall_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        LeaderStamp { node_id: self.node_id, boot_id: self.boot_id, now_ms: self.now_ms(), timing, wall_ms }
    }
}

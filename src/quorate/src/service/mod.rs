//! The service layer: every coordinator operation, on domain types, with one
//! error type ([`ServiceError`]). Front doors (the gRPC API in `api`, and
//! later the Sentinel-compatible endpoint and HTTP) decode a request, call
//! in here and encode the answer; a rule lives here once.
//!
//! - [`node`]: one running coordinator as the operations see it: propose a
//!   command (bounded), confirm a read at a consistency level, say who
//!   leads. Raft's failures become [`ServiceError`]s here.
//! - [`leases`]: acquire (with its waiting protocol), renew, release, read.
//! - [`groups`]: creating, updating, deleting and reading groups; the matrix and
//!   verdicts; why a member's verdict is what it is.
//! - [`election`]: managed groups: election status, maintenance, failover
//!   blocks, switchover (waiting for the new holder), what-if.
//! - [`membership`]: the coordinators: who they are, adding one (learner,
//!   then voter once caught up), removing one for good.
//! - [`reports`]: observers' reports, checked and batched.
//! - [`snapshot`]: backups: the whole state, read on the leader after a
//!   linearizable read, as one backup file.
//! - [`watch`]: a watch's events (lease, election, verdict changes).
//! - [`discovery`]: each managed group's primary and replicas as clients
//!   reach them, and the changes of both (the Sentinel endpoint).
//! - [`limits`]: the pure accounting of rate and stream limits.
//! - [`batch`]: the report batcher, which packs observers' reports into
//!   few log entries.
//! - [`error`]: [`ServiceError`] and the leader hint.

pub mod batch;
pub mod discovery;
pub mod election;
pub mod error;
pub mod groups;
pub mod leases;
pub mod limits;
pub mod membership;
pub mod node;
pub mod reports;
pub mod snapshot;
pub mod watch;

pub use self::error::{LeaderHint, ServiceError};
pub use self::node::{Node, ReadConsistency};

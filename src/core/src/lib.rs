//! # quorate-core: the pure decision core
//!
//! Everything quorate *decides* lives here; everything it *does* lives in the
//! `quorate` crate. This crate has no tokio, no sockets, no Raft library and no
//! clock: time is always a value passed in by the caller, so every decision can
//! be replayed, property-tested and checked exhaustively.
//!
//! ## Layout
//!
//! - [`lease`]: lease arithmetic on both sides of a lease. The holder's
//!   deadline (`send + ttl * (1 - drift) - margin`) and the grantor's wait
//!   before a new holder (`renewed + ttl * (1 + drift) + margin`).
//! - [`names`]: validation of group and holder names (shared by the API layer
//!   and the state machine, so both refuse the same inputs).
//! - [`role`]: the role decisions of a member's agent (when to take the
//!   lease, arm and apply the fence, promote, follow), as a state machine
//!   whose actions the agent's runtime performs.
//! - [`observe`]: one observer's view of one member (up, down, unknown,
//!   why), from heartbeat readings.
//! - [`quorum`]: quorum sizes and three-valued quorum answers.
//! - [`group`]: a group's spec (members, priorities, policy) and its
//!   validation.
//! - [`designation`]: the replicated election state of a managed group, as
//!   data (designated member, history, member statuses).
//! - [`matrix`]: every observer's latest view of every member of a group,
//!   and the rest of a group's replicated state.
//! - [`verdict`]: the quorum verdict per member over the matrix.
//! - [`election`]: the decisions over verdicts: candidates, failover,
//!   switchover.
//! - [`machine`]: the replicated state machine. Commands carry the proposing
//!   leader's clock reading; `apply` is deterministic and returns its decision
//!   as data ([`machine::Outcome`]) together with the change to publish.
//!
//! ## The one rule
//!
//! Safety comes from leases and fencing tokens; availability from the quorum
//! verdict. The epoch of a group (its fencing token) is strictly increasing and
//! never reused, and a new holder is only granted once the previous lease has
//! expired with the drift margin on the granting leader's clock.

pub mod designation;
pub mod election;
pub mod group;
pub mod lease;
pub mod machine;
pub mod matrix;
pub mod names;
pub mod observe;
pub mod quorum;
pub mod ranking;
pub mod role;
pub mod verdict;

pub use lease::LeaseTiming;
pub use machine::{Command, LeaderStamp, LeaseView, Machine, Op, Outcome, Rejection};
pub use names::{NameError, NameKind};

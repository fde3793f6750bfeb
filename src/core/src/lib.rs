//! # quorate-core: the pure decision core
//!
//! Everything quorate *decides* lives here; everything it *does* lives in the
//! `quorate` crate. This crate has no tokio, no sockets, no Raft library and no
//! clock: time is always a value passed in by the caller, so every decision can
//! be replayed, property-tested and checked exhaustively.
//!
//! ## Layout
//!
//! One line per module, in the order they build on each other:
//!
//! - [`names`]: the rules for group, holder and member names, shared by the API and the machine.
//! - [`access`]: identities (from certificates) and the one check of what each may do.
//! - [`lease`]: lease arithmetic: the holder's deadline and the grantor's wait, with drift and margin.
//! - [`quorum`]: majorities over all configured voters, with three answers (yes, no, not enough information).
//! - [`membership`]: cluster membership decisions: may a node be added, removed or promoted, is it safe to stop one now.
//! - [`ranking`]: the one order of members for the primary role, and its tie-break.
//! - [`group`]: a group's spec (members, priorities, timing policy, failover policy) and its validation.
//! - [`observe`]: one observer's judgement of one member (up, down, unknown, why) from heartbeat reads.
//! - [`designation`]: a managed group's replicated election state, as data (designated member, history, statuses).
//! - [`matrix`]: a group's replicated state: every observer's latest view of every member, and the rest.
//! - [`verdict`]: the quorum verdict per member over the matrix, with its evidence.
//! - [`election`]: the leader's decisions over verdicts: candidates, failover, what-if.
//! - [`role`]: a member agent's role decisions (take the lease, fence, promote, follow) as a state machine.
//! - [`machine`]: the replicated state machine: deterministic `apply`, its decision returned as data.
//! - [`renewals`]: the leader's renewals confirmed without a log entry each, and why that is safe.
//!
//! ## The one rule
//!
//! Safety comes from leases and fencing tokens; availability from the quorum
//! verdict. The epoch of a group (its fencing token) is strictly increasing and
//! never reused, and a new holder is only granted once the previous lease has
//! expired with the drift margin on the granting leader's clock.

#![deny(missing_docs)]

pub mod access;
pub mod designation;
pub mod election;
pub mod group;
pub mod lease;
pub mod machine;
pub mod matrix;
pub mod membership;
pub mod names;
pub mod observe;
pub mod quorum;
pub mod ranking;
pub mod renewals;
pub mod role;
pub mod verdict;

pub use lease::LeaseTiming;
pub use machine::{Command, LeaderStamp, LeaseView, Machine, Op, Outcome, Rejection};
pub use names::{NameError, NameKind};

//! The API layer's error type, and the one place errors become gRPC status.
//!
//! Every handler returns `Result<_, ApiError>`; [`ApiError::into_status`]
//! picks the code, writes a message a person can act on, and attaches the
//! leader hint (`x-quorate-leader-id`, `x-quorate-leader-addr`) whenever the
//! call should be sent elsewhere.

use tonic::Status;
use tonic::metadata::MetadataValue;

pub use crate::wire::{CURRENT_EPOCH_HEADER, LEADER_ADDR_HEADER, LEADER_ID_HEADER};

/// A known leader: id and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    pub id: u64,
    pub addr: String,
}

/// Why an API call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named group (or member) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is well formed but the state does not allow it (group
    /// not managed, in maintenance, failover blocked, stale decision).
    #[error("{0}")]
    Precondition(String),
    /// This node is not the leader. Nothing was written.
    #[error("node {node_id} is not the leader{}", hint_text(.leader))]
    NotLeader { node_id: u64, leader: Option<LeaderHint> },
    /// This node cannot reach a quorum of the cluster.
    #[error("node {node_id} cannot reach a quorum of the cluster ({detail}){}", unknown_text(*.outcome_unknown))]
    NoQuorum { node_id: u64, detail: String, outcome_unknown: bool },
    /// Renew or Release by someone who does not hold the lease at that epoch.
    #[error("{message}")]
    NotHolder { message: String, current_epoch: u64 },
    /// Renew after the lease expired.
    #[error("{message}")]
    Expired { message: String, current_epoch: u64 },
    /// A write did not finish in time; it may still commit.
    #[error("the write did not complete within {waited_ms} ms; it may still take effect")]
    OutcomeUnknown { waited_ms: u64 },
    /// The node is shutting down or its Raft stopped.
    #[error("node {node_id} is shutting down or stopped: {detail}")]
    Stopped { node_id: u64, detail: String },
    /// This node has not caught up with the cluster since it started, so
    /// its state may be older than one it served before. Nothing was read.
    #[error(
        "node {node_id} has not caught up with the cluster since it started (applied {applied}{}); ask another node or retry shortly",
        target.map(|t| format!(" of {t}")).unwrap_or_else(|| ", no leader heard yet".to_owned())
    )]
    CatchingUp { node_id: u64, applied: u64, target: Option<u64> },
    /// The request would not fit in one Raft log entry. Nothing was written.
    #[error(
        "{what} encodes to {bytes} bytes as a Raft log entry; the limit is {limit} bytes (MAX_ENTRY_BYTES): split it into smaller requests"
    )]
    TooLarge { what: String, bytes: usize, limit: usize },
    /// A bug or an impossible state; the message says what.
    #[error("internal error: {0}")]
    Internal(String),
}

fn hint_text(leader: &Option<LeaderHint>) -> String {
    match leader {
        Some(l) => format!("; the leader is node {} at {}", l.id, l.addr),
        None => "; no leader is known right now, retry shortly".to_owned(),
    }
}

fn unknown_text(unknown: bool) -> &'static str {
    if unknown { "; the write may or may not take effect" } else { "; nothing was written" }
}

impl From<crate::wire::DecodeError> for ApiError {
    fn from(e: crate::wire::DecodeError) -> Self {
        ApiError::InvalidArgument(e.0)
    }
}

impl ApiError {
    /// The single mapping from API errors to gRPC status.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        let mut status = match &self {
            ApiError::InvalidArgument(_) | ApiError::TooLarge { .. } => Status::invalid_argument(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::NotLeader { .. }
            | ApiError::NoQuorum { .. }
            | ApiError::Stopped { .. }
            | ApiError::CatchingUp { .. } => Status::unavailable(message),
            ApiError::NotHolder { .. } | ApiError::Expired { .. } | ApiError::Precondition(_) => {
                Status::failed_precondition(message)
            }
            ApiError::OutcomeUnknown { .. } => Status::deadline_exceeded(message),
            ApiError::Internal(_) => Status::internal(message),
        };
        let md = status.metadata_mut();
        match &self {
            ApiError::NotLeader { leader: Some(l), .. } => {
                md.insert(LEADER_ID_HEADER, MetadataValue::from(l.id));
                if let Ok(v) = l.addr.parse() {
                    md.insert(LEADER_ADDR_HEADER, v);
                }
            }
            ApiError::NotHolder { current_epoch, .. } | ApiError::Expired { current_epoch, .. } => {
                md.insert(CURRENT_EPOCH_HEADER, MetadataValue::from(*current_epoch));
            }
            _ => {}
        }
        status
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        e.into_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_carries_the_hint() {
        let s = ApiError::NotLeader { node_id: 2, leader: Some(LeaderHint { id: 1, addr: "127.0.0.1:7101".into() }) }
            .into_status();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_ID_HEADER).unwrap(), "1");
        assert_eq!(s.metadata().get(LEADER_ADDR_HEADER).unwrap(), "127.0.0.1:7101");
        assert_eq!(s.message(), "node 2 is not the leader; the leader is node 1 at 127.0.0.1:7101");
    }

    #[test]
    fn stale_epoch_carries_the_current_epoch() {
        let s = ApiError::NotHolder { message: "stale".into(), current_epoch: 5 }.into_status();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.metadata().get(CURRENT_EPOCH_HEADER).unwrap(), "5");
    }
}

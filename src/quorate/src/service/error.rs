//! The service layer's one error type. Every operation returns
//! `Result<_, ServiceError>`; its message is one a person can act on. Each
//! front door maps it to its protocol in exactly one place (gRPC:
//! `api::status`).

/// A known leader: id and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    pub id: u64,
    pub addr: String,
}

/// Why an operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
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
    /// A limit on the size or number of something was reached; the message
    /// names the limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller's identity may not do this; the message names the
    /// identity, what it may not do, and why.
    #[error("{0}")]
    PermissionDenied(String),
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

impl From<quorate_core::access::Denied> for ServiceError {
    fn from(d: quorate_core::access::Denied) -> Self {
        ServiceError::PermissionDenied(d.to_string())
    }
}

impl From<crate::wire::DecodeError> for ServiceError {
    fn from(e: crate::wire::DecodeError) -> Self {
        ServiceError::InvalidArgument(e.0)
    }
}

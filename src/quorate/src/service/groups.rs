//! Group operations of the service layer.

use quorate_core::Op;
use quorate_core::group::GroupSpec;
use quorate_core::machine::Outcome;

use super::leases::{rejection, unexpected};
use super::{Node, ServiceError};

/// What applying a spec did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub created: bool,
    /// The log index the spec was applied at.
    pub revision: u64,
}

impl Node {
    /// Creates or updates a group. Refuses an invalid spec, and a managed
    /// group whose `failover.lease_ttl_ms` this server could never grant
    /// (outside `min_lease_ttl_ms..=max_lease_ttl_ms`), naming the field.
    pub async fn apply_group(&self, spec: GroupSpec) -> Result<Applied, ServiceError> {
        spec.validate().map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        if let Some(f) = &spec.failover {
            self.check_ttl(f.lease_ttl_ms).map_err(|e| {
                ServiceError::InvalidArgument(format!("group {}: failover.lease_ttl_ms: {e}", spec.name))
            })?;
        }
        match self.propose(Op::ApplyGroup { spec }).await? {
            Outcome::GroupApplied { revision, created } => Ok(Applied { created, revision }),
            Outcome::Rejected(rej) => Err(rejection(rej)),
            other => Err(unexpected("ApplyGroup", &other)),
        }
    }
}

//! The one place service errors become gRPC status: the code, the message,
//! and the leader hint (`x-quorate-leader-id`, `x-quorate-leader-addr`)
//! whenever the call should be sent elsewhere, or the current epoch of a
//! lease on a stale-epoch refusal.

use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::service::ServiceError;
use crate::wire::{CURRENT_EPOCH_HEADER, LEADER_ADDR_HEADER, LEADER_ID_HEADER};

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        status_of(e)
    }
}

/// The single mapping from service errors to gRPC status.
fn status_of(e: ServiceError) -> Status {
    let message = e.to_string();
    let mut status = match &e {
        ServiceError::InvalidArgument(_) | ServiceError::TooLarge { .. } => Status::invalid_argument(message),
        ServiceError::NotFound(_) => Status::not_found(message),
        ServiceError::NotLeader { .. }
        | ServiceError::NoQuorum { .. }
        | ServiceError::Stopped { .. }
        | ServiceError::CatchingUp { .. } => Status::unavailable(message),
        ServiceError::NotHolder { .. } | ServiceError::Expired { .. } | ServiceError::Precondition(_) => {
            Status::failed_precondition(message)
        }
        ServiceError::OutcomeUnknown { .. } => Status::deadline_exceeded(message),
        ServiceError::PermissionDenied(_) => Status::permission_denied(message),
        ServiceError::ResourceExhausted(_) => Status::resource_exhausted(message),
        ServiceError::Internal(_) => Status::internal(message),
    };
    let md = status.metadata_mut();
    match &e {
        ServiceError::NotLeader { leader: Some(l), .. } => {
            md.insert(LEADER_ID_HEADER, MetadataValue::from(l.id));
            if let Ok(v) = l.addr.parse() {
                md.insert(LEADER_ADDR_HEADER, v);
            }
        }
        ServiceError::NotHolder { current_epoch, .. } | ServiceError::Expired { current_epoch, .. } => {
            md.insert(CURRENT_EPOCH_HEADER, MetadataValue::from(*current_epoch));
        }
        _ => {}
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::LeaderHint;

    #[test]
    fn not_leader_carries_the_hint() {
        let s = Status::from(ServiceError::NotLeader {
            node_id: 2,
            leader: Some(LeaderHint { id: 1, addr: "127.0.0.1:7101".into() }),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_ID_HEADER).unwrap(), "1");
        assert_eq!(s.metadata().get(LEADER_ADDR_HEADER).unwrap(), "127.0.0.1:7101");
        assert_eq!(s.message(), "node 2 is not the leader; the leader is node 1 at 127.0.0.1:7101");
    }

    #[test]
    fn stale_epoch_carries_the_current_epoch() {
        let s = Status::from(ServiceError::NotHolder { message: "stale".into(), current_epoch: 5 });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.metadata().get(CURRENT_EPOCH_HEADER).unwrap(), "5");
    }
}

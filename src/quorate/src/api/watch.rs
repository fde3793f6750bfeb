//! A watch over gRPC: the service's watch events (`service::watch`),
//! encoded.

use crate::pb::v1 as pb;
use crate::service::watch::{ElectionChange, LeaseEvent, WatchEvent};
use crate::wire::convert::{lease_pb, member_verdict_pb, verdict_state_pb};

fn kind_pb(kind: LeaseEvent) -> pb::EventKind {
    match kind {
        LeaseEvent::Current => pb::EventKind::Current,
        LeaseEvent::Acquired => pb::EventKind::Acquired,
        LeaseEvent::Renewed => pb::EventKind::Renewed,
        LeaseEvent::Released => pb::EventKind::Released,
        LeaseEvent::Expired => pb::EventKind::Expired,
        LeaseEvent::Resync => pb::EventKind::Resync,
        LeaseEvent::Deleted => pb::EventKind::Deleted,
    }
}

fn election_change_pb(c: ElectionChange) -> pb::ElectionChange {
    pb::ElectionChange {
        designated: c.designated.unwrap_or_default(),
        switchover_to: c.switchover_to.unwrap_or_default(),
        revision: c.revision,
    }
}

/// One watch event as protobuf.
pub(super) fn watch_event_pb(ev: WatchEvent) -> pb::WatchEvent {
    match ev {
        WatchEvent::Lease { kind, lease } => {
            pb::WatchEvent { kind: kind_pb(kind) as i32, lease: Some(lease_pb(&lease)), verdict: None, election: None }
        }
        WatchEvent::Election { change, lease } => pb::WatchEvent {
            kind: pb::EventKind::Election as i32,
            lease: Some(lease_pb(&lease)),
            verdict: None,
            election: Some(election_change_pb(change)),
        },
        WatchEvent::Verdict { member, from, to } => pb::WatchEvent {
            kind: pb::EventKind::Verdict as i32,
            lease: None,
            verdict: Some(pb::VerdictChange {
                member,
                from: from.map_or(pb::VerdictState::Unspecified, verdict_state_pb) as i32,
                to: Some(member_verdict_pb(&to)),
            }),
            election: None,
        },
    }
}

//! Group lifecycle in the state machine: deleting a group, and the state a
//! cluster restored from a backup starts from.
//!
//! Both keep the one rule of epochs: a group's epoch never goes back.
//!
//! - A **delete** removes a group's spec, matrix, election state, history
//!   and lease record (so the snapshot after it no longer holds them), but
//!   raises the machine's epoch floor to the deleted lease's epoch: a group
//!   created again under the same name starts above every epoch the old
//!   one handed out.
//! - A **restore** ([`Machine::restored`]) cannot know what the backed-up
//!   cluster granted after the backup was taken. So every lease starts free
//!   at its epoch plus a margin (`restore_epoch_bump`, 1,000,000 by
//!   default, as `etcdutl snapshot restore --bump-revision` does), and the
//!   floor for names without a lease goes above the highest epoch in the
//!   backup plus the margin: a fencing token handed out after the backup is
//!   never handed out again, as long as fewer grants than the margin were
//!   made after the backup.

use super::{Applied, Change, ChangeKind, LeaseView, Machine, Outcome, Rejection, rejected_outcome};
use crate::names::{self, NameKind};

/// Why a backup cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// A bump of 0 would let the restored cluster hand out epochs the old
    /// one may have handed out after the backup.
    #[error("restore_epoch_bump must be at least 1")]
    ZeroBump,
    /// An epoch plus the bump does not fit in 64 bits.
    #[error("lease {group:?} at epoch {epoch} cannot be bumped by {bump}: the epoch would overflow")]
    Overflow {
        /// The lease (or `*` for the floor of names without one).
        group: String,
        /// Its epoch in the backup.
        epoch: u64,
        /// The bump asked for.
        bump: u64,
    },
}

impl Machine {
    /// The highest epoch this state holds or has held for any name: every
    /// lease's epoch and the floor left by deleted ones.
    pub fn max_epoch(&self) -> u64 {
        self.leases.values().map(|r| r.epoch).fold(self.epoch_floor, u64::max)
    }

    /// The epoch a name without a lease record starts from (its first grant
    /// is one above).
    pub fn epoch_floor(&self) -> u64 {
        self.epoch_floor
    }

    /// The state a new cluster restored from this one starts from: specs,
    /// designations and history kept; every lease free at its epoch plus
    /// `epoch_bump` (so its next grant is one above that); the floor of new
    /// names above every epoch here plus the bump; no clock; observations
    /// forgotten ([`crate::matrix::GroupState::forget_observations`]).
    pub fn restored(&self, epoch_bump: u64) -> Result<Machine, RestoreError> {
        if epoch_bump == 0 {
            return Err(RestoreError::ZeroBump);
        }
        let bump = |group: &str, epoch: u64| {
            epoch.checked_add(epoch_bump).ok_or_else(|| RestoreError::Overflow {
                group: group.to_owned(),
                epoch,
                bump: epoch_bump,
            })
        };
        // Every name starts above the highest epoch in the backup, not only
        // above its own: then no epoch the new cluster grants is one the
        // backup holds, whatever the names (a per-name bump would let a
        // name far behind another re-grant that one's epochs).
        let top = self.max_epoch();
        let mut leases = self.leases.clone();
        for (group, rec) in &mut leases {
            // Free, with no clock reading: nobody holds a lease of the new
            // cluster until it grants one, with a new epoch.
            rec.epoch = bump(group, top)?;
            rec.holder = None;
            rec.renewed_at_ms = 0;
            rec.timing = None;
        }
        let mut groups = self.groups.clone();
        for g in groups.values_mut() {
            g.forget_observations();
        }
        Ok(Machine { clock: None, clock_now_ms: 0, clock_started_ms: 0, leases, groups, epoch_floor: bump("*", top)? })
    }

    pub(super) fn delete_group(&mut self, index: u64, now: u64, group: &str, force: bool) -> Applied {
        if let Err(e) = names::validate(NameKind::Group, group) {
            return rejected_outcome(e.into());
        }
        let Some(g) = self.groups.get(group) else {
            return rejected_outcome(Rejection::UnknownGroup { group: group.to_owned() });
        };
        if g.spec.is_managed()
            && !force
            && let Some(rec) = self.leases.get(group)
            && let Some(holder) = &rec.holder
        {
            // Held and not expired at the entry's time: its holder acts as
            // primary now. (After a leader change the TTL restarts on the
            // new clock: a delete can be refused longer, never sooner.)
            let expires = rec.renewed_at_ms.saturating_add(rec.ttl_ms);
            if now < expires {
                return rejected_outcome(Rejection::LivePrimary {
                    group: group.to_owned(),
                    holder: holder.clone(),
                    epoch: rec.epoch,
                    remaining_ms: expires - now,
                });
            }
        }
        self.groups.remove(group);
        if let Some(rec) = self.leases.remove(group) {
            self.epoch_floor = self.epoch_floor.max(rec.epoch);
        }
        let lease = LeaseView::free(group, self.epoch_floor, index);
        Applied {
            outcome: Outcome::GroupDeleted { revision: index, lease: lease.clone() },
            changes: vec![Change { group: group.to_owned(), kind: ChangeKind::GroupDeleted, lease: Some(lease) }],
        }
    }
}

#[cfg(test)]
mod tests;

//! Group operations of the service layer: creating, updating and deleting
//! groups, reading their specs, their observation matrix and verdicts, and
//! why a member's verdict is what it is.

use crate::tls::caller::Caller;
use quorate_core::access::Action;
use quorate_core::group::GroupSpec;
use quorate_core::machine::Outcome;
use quorate_core::matrix::{GroupState, RestartEvent};
use quorate_core::names::NameKind;
use quorate_core::verdict::{GroupVerdict, MemberVerdict, explain, verdict};
use quorate_core::{LeaseView, Op};

use super::leases::{check_name, rejection, unexpected};
use super::{Node, ReadConsistency, ServiceError};

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
    pub async fn apply_group(&self, caller: &Caller, spec: GroupSpec) -> Result<Applied, ServiceError> {
        caller.check(Action::ApplyGroup)?;
        let (exists, count) = self.reader.with_machine(|m, _| (m.group(&spec.name).is_some(), m.groups().count()));
        if !exists && count as u64 >= self.config.max_groups {
            return Err(ServiceError::ResourceExhausted(format!(
                "the cluster holds {count} groups; the limit is {} (max_groups)",
                self.config.max_groups
            )));
        }
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

/// What deleting a group did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The log index of the delete.
    pub revision: u64,
    /// The name's lease now: free, at the epoch its next grant builds on.
    pub lease: LeaseView,
}

impl Node {
    /// Deletes a group with its lease, views and history. The state machine
    /// refuses a managed group whose primary holds a live lease unless
    /// `force` (FAILED_PRECONDITION, naming the holder); the snapshot after
    /// the delete no longer holds the group.
    pub async fn delete_group(&self, caller: &Caller, name: &str, force: bool) -> Result<Deleted, ServiceError> {
        caller.check(Action::DeleteGroup)?;
        check_name(NameKind::Group, name)?;
        match self.propose(Op::DeleteGroup { group: name.to_owned(), force }).await? {
            Outcome::GroupDeleted { revision, lease } => Ok(Deleted { revision, lease }),
            Outcome::Rejected(quorate_core::Rejection::UnknownGroup { .. }) => Err(no_such_group(name)),
            Outcome::Rejected(rej) => Err(rejection(rej)),
            other => Err(unexpected("DeleteGroup", &other)),
        }
    }
}

/// A group's spec as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRead {
    pub spec: GroupSpec,
    /// The log index the spec was last applied at.
    pub revision: u64,
}

/// A group's whole replicated state with its verdict, as of one read: what
/// the matrix shows.
#[derive(Debug, Clone)]
pub struct MatrixRead {
    pub state: GroupState,
    pub verdict: GroupVerdict,
    /// The coordinators (Raft voters), which observe every member.
    pub coordinators: Vec<u64>,
    pub served_by: u64,
}

/// Why a member's verdict is what it is.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The verdict in one sentence.
    pub sentence: String,
    pub verdict: MemberVerdict,
    /// The group's state the verdict was computed from (its evidence).
    pub state: GroupState,
    /// Restarts of the member the observers saw.
    pub restarts: Vec<RestartEvent>,
}

/// The error for a group that does not exist, with how to create one.
pub(super) fn no_such_group(name: &str) -> ServiceError {
    ServiceError::NotFound(format!("no group named {name:?}; create it with `quorate group apply FILE.toml`"))
}

impl Node {
    /// Runs `f` on a group's state (and the machine's clock) after
    /// confirming the read.
    async fn with_group<T>(
        &self,
        name: &str,
        consistency: ReadConsistency,
        f: impl FnOnce(&GroupState, u64) -> T,
    ) -> Result<T, ServiceError> {
        check_name(NameKind::Group, name)?;
        self.confirm_read(consistency).await?;
        self.reader.with_machine(|m, _| {
            let now = self.reader.machine_now(m);
            m.group(name).map(|g| f(g, now)).ok_or_else(|| no_such_group(name))
        })
    }

    /// A group's spec.
    pub async fn group(
        &self,
        caller: &Caller,
        name: &str,
        consistency: ReadConsistency,
    ) -> Result<GroupRead, ServiceError> {
        caller.check(Action::Read)?;
        self.with_group(name, consistency, |g, _| GroupRead { spec: g.spec.clone(), revision: g.spec_revision }).await
    }

    /// The names of every group (from this node's state, once caught up).
    pub fn group_names(&self, caller: &Caller) -> Result<Vec<String>, ServiceError> {
        caller.check(Action::Read)?;
        self.ensure_caught_up()?;
        Ok(self.reader.with_machine(|m, _| m.groups().map(|g| g.spec.name.clone()).collect()))
    }

    /// A group's observation matrix and verdict.
    pub async fn matrix(
        &self,
        caller: &Caller,
        name: &str,
        consistency: ReadConsistency,
    ) -> Result<MatrixRead, ServiceError> {
        caller.check(Action::Read)?;
        let coordinators = self.reader.voters();
        self.with_group(name, consistency, |g, now| MatrixRead {
            verdict: verdict(g, &coordinators, now),
            state: g.clone(),
            coordinators: coordinators.clone(),
            served_by: self.id,
        })
        .await
    }

    /// Why `member`'s verdict is what it is (a linearizable read).
    pub async fn explain(&self, caller: &Caller, name: &str, member: &str) -> Result<Explanation, ServiceError> {
        caller.check(Action::Read)?;
        check_name(NameKind::Member, member)?;
        let voters = self.reader.voters();
        self.with_group(name, ReadConsistency::Linearizable, |g, now| {
            let v = verdict(g, &voters, now);
            let mv = v
                .member(member)
                .ok_or_else(|| ServiceError::NotFound(format!("group {:?} has no member {member:?}", g.spec.name)))?;
            Ok(Explanation {
                sentence: explain(mv),
                verdict: mv.clone(),
                state: g.clone(),
                restarts: g.restarts.iter().filter(|x| x.member == member).cloned().collect(),
            })
        })
        .await?
    }
}

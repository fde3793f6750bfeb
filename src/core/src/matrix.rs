//! The replicated matrix of a group: every observer's latest view of every
//! member, with the time it was committed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::designation::{Election, HistoryEntry, MemberStatus, MoveKind};
use crate::group::GroupSpec;
use crate::observe::Observation;

/// Restart events kept per group.
pub const MAX_RESTART_EVENTS: usize = 32;

/// Who observes: a member's agent, or a coordinator node. Serialized as its
/// display form (`coordinator-N` or the member id), so it can key a map.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Observer {
    /// A coordinator node, by its Raft node id.
    Coordinator(u64),
    /// A member's agent, by the member's name.
    Member(String),
}

impl fmt::Display for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observer::Coordinator(id) => write!(f, "coordinator-{id}"),
            Observer::Member(m) => f.write_str(m),
        }
    }
}

impl From<Observer> for String {
    fn from(o: Observer) -> String {
        o.to_string()
    }
}

impl From<String> for Observer {
    fn from(s: String) -> Observer {
        Observer::parse(&s)
    }
}

pub use crate::names::COORDINATOR_PREFIX;

impl Observer {
    /// Parses the display form (`coordinator-N` or a member id).
    pub fn parse(s: &str) -> Observer {
        match s.strip_prefix(COORDINATOR_PREFIX).and_then(|n| n.parse().ok()) {
            Some(id) => Observer::Coordinator(id),
            None => Observer::Member(s.to_owned()),
        }
    }

    /// May this observer report at all, given the cluster's coordinator
    /// node ids? A coordinator only if it is one of `nodes`; members are
    /// checked per group ([`Self::check_member_of`]).
    pub fn check_node(&self, nodes: &BTreeSet<u64>) -> Result<(), ObserverRefused> {
        match self {
            Observer::Coordinator(id) if !nodes.contains(id) => {
                let ids: Vec<String> = nodes.iter().map(u64::to_string).collect();
                Err(ObserverRefused::NotANode { id: *id, nodes: ids.join(", ") })
            }
            _ => Ok(()),
        }
    }

    /// May this observer report about the group `spec` describes? A member
    /// only about its own group; a coordinator about every group.
    pub fn check_member_of(&self, spec: &GroupSpec) -> Result<(), ObserverRefused> {
        match self {
            Observer::Member(m) if spec.member(m).is_none() => {
                Err(ObserverRefused::NotAMember { observer: m.clone(), group: spec.name.clone() })
            }
            _ => Ok(()),
        }
    }
}

/// Why an observer may not report (checked before a report is proposed;
/// the state machine also drops a view whose observer is not a member of
/// its group). Names are bounded, so the message is too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObserverRefused {
    /// `coordinator-N` where N is not a node of the cluster.
    #[error(
        "observer coordinator-{id} is not a node of this cluster (nodes {nodes}): only the cluster's own coordinators report as coordinator-N"
    )]
    NotANode {
        /// The node id claimed.
        id: u64,
        /// The cluster's node ids, comma separated.
        nodes: String,
    },
    /// A member observer reporting about a group it is not in.
    #[error("observer {observer} is not a member of group {group}: a member reports only about its own group")]
    NotAMember {
        /// The observer.
        observer: String,
        /// The group.
        group: String,
    },
}

/// One observer's view as committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredView {
    /// When it was committed, on the machine's clock. Signed: after a move
    /// to a new leader's clock, old views may predate that clock's zero.
    pub reported_at_ms: i64,
    /// The observer's own incarnation (a restarted agent starts afresh).
    pub observer_incarnation: u64,
    /// Its observation of each target, by member id.
    pub cells: BTreeMap<String, Observation>,
    /// The observer's token for these cells (0: none). A later
    /// [`GroupState::refresh`] with the same token renews the view's time
    /// without the cells being sent again; anything but a report that
    /// changes the cells clears it. Absent in views stored before it.
    #[serde(default)]
    pub version: u64,
}

/// A member seen coming back with a new incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartEvent {
    /// The member that restarted.
    pub member: String,
    /// The incarnation it had before.
    pub from_incarnation: u64,
    /// The incarnation it came back with.
    pub to_incarnation: u64,
    /// The observer whose report first showed it.
    pub seen_by: Observer,
    /// Raft log index of that report.
    pub revision: u64,
}

/// A group in the replicated state: its spec and its matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// The group's spec as last applied.
    pub spec: GroupSpec,
    /// Log index of the last spec change.
    pub spec_revision: u64,
    /// Every observer's latest view of the members.
    pub views: BTreeMap<Observer, StoredView>,
    /// The latest incarnation of each member, as reported.
    pub incarnations: BTreeMap<String, u64>,
    /// The latest restarts, oldest first.
    pub restarts: VecDeque<RestartEvent>,
    /// Log index of the last change to the matrix.
    pub revision: u64,
    /// What each member's agent last reported about its data service.
    #[serde(default)]
    pub statuses: BTreeMap<String, MemberStatus>,
    /// Election state (managed groups).
    #[serde(default)]
    pub election: Election,
}

impl GroupState {
    /// A group just created at log index `revision`: no views yet, nobody
    /// designated.
    pub fn new(spec: GroupSpec, revision: u64) -> Self {
        Self {
            spec,
            spec_revision: revision,
            views: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            restarts: VecDeque::new(),
            revision,
            statuses: BTreeMap::new(),
            election: Election::default(),
        }
    }

    /// Designates `to` (by the spec's initial choice) when a managed group
    /// has no valid designated member; unmanaged groups have none.
    pub fn ensure_designation(&mut self, revision: u64, wall_ms: u64) {
        if !self.spec.is_managed() {
            self.election.designated = None;
            self.election.switchover = None;
            return;
        }
        let valid =
            self.election.designated.as_deref().is_some_and(|d| self.spec.member(d).is_some_and(|m| m.priority > 0));
        if valid {
            return;
        }
        if let Some(to) = self.spec.initial_primary().map(str::to_owned) {
            let from = self.election.designated.take();
            self.election.designated = Some(to.clone());
            self.election.record(HistoryEntry {
                revision,
                kind: MoveKind::Initial,
                from,
                to,
                epoch: None,
                reason: "group spec applied: initial primary".into(),
                evidence: Vec::new(),
                wall_ms,
            });
        }
    }

    /// Replaces the spec; views of observers and targets no longer in the
    /// group are dropped.
    pub fn respec(&mut self, spec: GroupSpec, revision: u64) {
        let keep = |id: &str| spec.member(id).is_some();
        self.views.retain(|o, _| match o {
            Observer::Member(m) => keep(m),
            Observer::Coordinator(_) => true,
        });
        for v in self.views.values_mut() {
            let before = v.cells.len();
            v.cells.retain(|t, _| keep(t));
            // The cells are no longer what the observer sent under its
            // token: a refresh must not vouch for them.
            if v.cells.len() != before {
                v.version = 0;
            }
        }
        self.incarnations.retain(|m, _| keep(m));
        self.statuses.retain(|m, _| keep(m));
        self.spec = spec;
        self.spec_revision = revision;
        self.revision = revision;
    }

    /// Stores a view without a token ([`Self::report_versioned`] with 0).
    pub fn report(
        &mut self,
        observer: Observer,
        observer_incarnation: u64,
        cells: &[(String, Observation)],
        now_ms: u64,
        revision: u64,
    ) -> Vec<RestartEvent> {
        self.report_versioned(observer, observer_incarnation, cells, 0, now_ms, revision)
    }

    /// Stores a view under the observer's token `version`
    /// ([`StoredView::version`]). Cells about non-members, and a member's
    /// cell about itself, are dropped. Returns the restarts it reveals.
    pub fn report_versioned(
        &mut self,
        observer: Observer,
        observer_incarnation: u64,
        cells: &[(String, Observation)],
        version: u64,
        now_ms: u64,
        revision: u64,
    ) -> Vec<RestartEvent> {
        let now_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let mut restarts = Vec::new();
        let mut stored = BTreeMap::new();
        for (target, obs) in cells {
            if self.spec.member(target).is_none() || observer == Observer::Member(target.clone()) {
                continue;
            }
            if let Some(inc) = obs.incarnation {
                match self.incarnations.insert(target.clone(), inc) {
                    Some(prev) if prev != inc => restarts.push(RestartEvent {
                        member: target.clone(),
                        from_incarnation: prev,
                        to_incarnation: inc,
                        seen_by: observer.clone(),
                        revision,
                    }),
                    _ => {}
                }
            }
            stored.insert(target.clone(), obs.clone());
        }
        for r in &restarts {
            if self.restarts.len() == MAX_RESTART_EVENTS {
                self.restarts.pop_front();
            }
            self.restarts.push_back(r.clone());
        }
        self.views
            .insert(observer, StoredView { reported_at_ms: now_ms, observer_incarnation, cells: stored, version });
        self.revision = revision;
        restarts
    }

    /// Renews the time of `observer`'s view if it is still the one stored
    /// under `version` by this incarnation of the observer, its cells
    /// untouched since. The observer sends a refresh only while it observes
    /// exactly what those cells say (states, reasons, incarnations,
    /// restarts), so the renewed view claims no more than a full report of
    /// the same observations would. Each cell's `state_age_ms` grows by the
    /// time since the view was last renewed, as the observer's own would.
    /// False, and nothing changes, otherwise: the observer must then send
    /// the view in full.
    pub fn refresh(
        &mut self,
        observer: &Observer,
        observer_incarnation: u64,
        version: u64,
        now_ms: u64,
        revision: u64,
    ) -> bool {
        let now_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let Some(view) = self.views.get_mut(observer) else { return false };
        if version == 0 || view.version != version || view.observer_incarnation != observer_incarnation {
            return false;
        }
        let elapsed = u64::try_from(now_ms.saturating_sub(view.reported_at_ms)).unwrap_or(0);
        for cell in view.cells.values_mut() {
            cell.state_age_ms = cell.state_age_ms.saturating_add(elapsed);
        }
        view.reported_at_ms = now_ms;
        self.revision = revision;
        true
    }

    /// Moves every view's time onto a new clock, keeping its age as of the
    /// old clock's last reading. (The time between that reading and the new
    /// clock's first is unknown and not counted: views can look up to one
    /// leader election fresher than they are. Failover decisions therefore
    /// also require views reported on the current clock.)
    pub fn rebase(&mut self, old_now_ms: u64, new_now_ms: u64) {
        let delta = i128::from(new_now_ms) - i128::from(old_now_ms);
        let shift = |t: i64| {
            let moved = i128::from(t) + delta;
            i64::try_from(moved).unwrap_or(if moved < 0 { i64::MIN } else { i64::MAX })
        };
        for v in self.views.values_mut() {
            v.reported_at_ms = shift(v.reported_at_ms);
        }
        if let Some(t) = self.election.last_failover_ms {
            self.election.last_failover_ms = Some(shift(t));
        }
    }

    /// Forgets what observers and agents reported (views, incarnations,
    /// members' data statuses) and the clock-bound election state (the last
    /// failover's time, a pending switchover), keeping the spec, the
    /// designation and the history: what a group restored from a backup
    /// keeps. Reports are measured on the old cluster's clocks and describe
    /// a past moment; the new cluster's observers report afresh within
    /// `report_interval_ms`.
    pub fn forget_observations(&mut self) {
        self.views.clear();
        self.incarnations.clear();
        self.statuses.clear();
        self.election.last_failover_ms = None;
        self.election.switchover = None;
    }

    /// A view's age at `now_ms`, in ms (0 if it is from the future).
    pub fn view_age_ms(view: &StoredView, now_ms: u64) -> u64 {
        let age = i128::from(now_ms) - i128::from(view.reported_at_ms);
        u64::try_from(age.max(0)).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod observer_tests {
    use super::*;
    use crate::group::MemberSpec;

    fn spec(members: &[&str]) -> GroupSpec {
        GroupSpec {
            name: "g".into(),
            members: members
                .iter()
                .map(|m| MemberSpec {
                    id: (*m).into(),
                    heartbeat: "redis://h:1".into(),
                    priority: 100,
                    data: None,
                    announce: None,
                })
                .collect(),
            policy: crate::group::Policy::default(),
            failover: None,
        }
    }

    #[test]
    fn only_the_clusters_nodes_report_as_coordinators() {
        let nodes: BTreeSet<u64> = [1, 2, 3].into();
        assert_eq!(Observer::Coordinator(2).check_node(&nodes), Ok(()));
        assert_eq!(Observer::Member("db-1".into()).check_node(&nodes), Ok(()));
        let e = Observer::Coordinator(9).check_node(&nodes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "observer coordinator-9 is not a node of this cluster (nodes 1, 2, 3): only the cluster's own coordinators report as coordinator-N"
        );
    }

    #[test]
    fn members_report_only_about_their_group() {
        let g = spec(&["a", "b"]);
        assert_eq!(Observer::Member("a".into()).check_member_of(&g), Ok(()));
        assert_eq!(Observer::Coordinator(7).check_member_of(&g), Ok(()));
        let e = Observer::Member("z".into()).check_member_of(&g).unwrap_err();
        assert_eq!(e.to_string(), "observer z is not a member of group g: a member reports only about its own group");
        // A name that only looks like a coordinator is a member name, and
        // no member has one.
        let fake = Observer::parse("coordinator-99999999999999999999999");
        assert!(fake.check_member_of(&g).is_err());
    }
}

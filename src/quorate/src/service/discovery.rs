//! Discovery: who each managed group's primary is, for front doors that
//! answer "where do I write?" (the Sentinel-compatible endpoint). Read from
//! this node's committed state only; the one definition of the answer:
//!
//! - the **primary** of a managed group is its *designated* member: the
//!   lease holder in steady state; during a failover, from the moment the
//!   leader commits the successor's designation, the successor (which
//!   refuses writes, `READONLY`, until its agent holds the lease and
//!   promotes it), never the old primary the lease is running out on.
//! - a member's **down flags** come from its verdict: `o_down` when a quorum
//!   of coordinators says down (the only verdict that fails over), `s_down`
//!   with it, and alone while some observers but not yet a quorum say down.
//! - the **epoch** is the lease's fencing token.
//!
//! [`DiscoveryTracker`] turns successive reads into events: a
//! `SwitchMaster` on every committed change of lease holder, and the down
//! flags of each primary going on and off. [`Node::discovery_events`]
//! drives it from the state machine's change feed (what `watch` follows)
//! plus the verdicts' recheck timer, since verdicts change with time.

use std::collections::BTreeMap;
use std::time::Duration;

use quorate_core::access::Action;
use quorate_core::group::{GroupSpec, parse_host_port, parse_redis_url};
use quorate_core::machine::{Change, ChangeKind, ReaderClock};
use quorate_core::matrix::GroupState;
use quorate_core::verdict::{GroupVerdict, MemberVerdict, Verdict, verdict};
use tokio::sync::{broadcast, mpsc};

use super::{Node, ServiceError};
use crate::raft::state_machine::ChangeEvent;
use crate::shutdown::stopped;
use crate::tls::caller::Caller;

/// How often the primaries' down flags are recomputed without a change in
/// the log (as watches recheck verdicts).
const RECHECK: Duration = Duration::from_millis(200);
/// The most queued changes one rescan stands for ([`drain`]).
const DRAIN_AT_MOST: usize = 4096;

/// A member's down flags, from its verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DownFlags {
    /// Some observers (not yet a quorum), or a quorum, say down.
    pub s_down: bool,
    /// A quorum of coordinators says down.
    pub o_down: bool,
}

impl DownFlags {
    /// The flags of one member's verdict.
    pub fn of(v: &MemberVerdict) -> Self {
        let o_down = v.state == Verdict::Down;
        Self { s_down: o_down || v.down_votes > 0, o_down }
    }
}

/// One member as clients reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberAddr {
    pub member: String,
    /// Its announce address, else its data URL's (`redis://HOST:PORT`).
    pub host: String,
    pub port: u16,
    pub flags: DownFlags,
    /// Votes saying down, and the quorum that needs.
    pub down_votes: usize,
    pub quorum: usize,
    /// As its agent last reported (replicas): link to the primary up, offset.
    pub link_up: bool,
    pub offset: u64,
    /// The spec's priority (0: never promoted).
    pub priority: u32,
}

/// A managed group as discovery answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    pub group: String,
    /// The designated member (see the module header); None when its data
    /// URL cannot be used.
    pub primary: Option<MemberAddr>,
    /// Every other member with a usable data URL, in spec order.
    pub replicas: Vec<MemberAddr>,
    /// The lease holder now (None between an expiry and the next grant).
    pub holder: Option<String>,
    /// The lease's epoch (fencing token).
    pub epoch: u64,
    /// Coordinators a verdict needs (a majority of them).
    pub quorum: usize,
    pub down_after_ms: u64,
    pub lease_ttl_ms: u64,
}

impl Primary {
    /// The address of `member`, if it has a usable data URL.
    pub fn addr_of(&self, member: &str) -> Option<&MemberAddr> {
        self.primary.iter().chain(&self.replicas).find(|m| m.member == member)
    }
}

/// Where clients reach a member (its announce address, else its data
/// URL's host and port), with its verdict.
fn member_addr(spec: &GroupSpec, g: &GroupState, v: &GroupVerdict, member: &str) -> Option<MemberAddr> {
    let m = spec.member(member)?;
    let (host, port) = match &m.announce {
        Some(a) => parse_host_port(a).ok()?,
        None => parse_redis_url(m.data.as_deref()?).map(|a| (a.host, a.port)).ok()?,
    };
    let mv = v.member(member);
    let status = g.statuses.get(member);
    Some(MemberAddr {
        member: member.to_owned(),
        host,
        port,
        flags: mv.map(DownFlags::of).unwrap_or_default(),
        down_votes: mv.map_or(0, |x| x.down_votes),
        quorum: mv.map_or(0, |x| x.quorum),
        link_up: status.is_some_and(|s| s.link_up),
        offset: status.map_or(0, |s| s.offset),
        priority: m.priority,
    })
}

fn primary_of(g: &GroupState, v: &GroupVerdict, holder: Option<String>, epoch: u64, voters: usize) -> Primary {
    let spec = &g.spec;
    let designated = g.election.designated.clone().or_else(|| holder.clone());
    let policy = spec.failover.clone().unwrap_or_default();
    Primary {
        group: spec.name.clone(),
        primary: designated.as_deref().and_then(|d| member_addr(spec, g, v, d)),
        replicas: spec
            .members
            .iter()
            .filter(|m| Some(m.id.as_str()) != designated.as_deref())
            .filter_map(|m| member_addr(spec, g, v, &m.id))
            .collect(),
        holder,
        epoch,
        quorum: voters / 2 + 1,
        down_after_ms: spec.policy.down_after_ms,
        lease_ttl_ms: policy.lease_ttl_ms,
    }
}

/// Whether the cluster's quorum is reachable from this node, as
/// `SENTINEL ckquorum` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumCheck {
    /// Coordinators this node counts as reachable (itself included).
    pub usable: usize,
    pub needed: usize,
    pub voters: usize,
}

impl Node {
    /// Every managed group's primary and replicas, from this node's
    /// committed state. Refused while this node has not caught up or knows
    /// no leader: its state may then be older than what clients already saw.
    pub fn discovery(&self, caller: &Caller) -> Result<Vec<Primary>, ServiceError> {
        caller.check(Action::Read)?;
        self.ensure_caught_up()?;
        if self.raft.leader().is_none() {
            return Err(ServiceError::NoQuorum {
                node_id: self.id,
                detail: "this node knows no leader".into(),
                outcome_unknown: false,
            });
        }
        Ok(self.discovery_now())
    }

    /// The answer of [`Self::discovery`] without its checks.
    fn discovery_now(&self) -> Vec<Primary> {
        let voters = self.reader.voters();
        self.reader.with_machine(|m, clock: ReaderClock| {
            let now = self.reader.machine_now(m);
            m.groups()
                .filter(|g| g.spec.is_managed())
                .map(|g| {
                    let lease = m.lease(&g.spec.name, clock);
                    primary_of(g, &verdict(g, &voters, now), lease.holder, lease.epoch, voters.len())
                })
                .collect()
        })
    }

    /// The names of the managed groups (from this node's state).
    pub fn managed_group_names(&self, caller: &Caller) -> Result<Vec<String>, ServiceError> {
        caller.check(Action::Read)?;
        Ok(self
            .reader
            .with_machine(|m, _| m.groups().filter(|g| g.spec.is_managed()).map(|g| g.spec.name.clone()).collect()))
    }

    /// How many coordinators this node reaches, against the quorum.
    pub fn quorum_check(&self, caller: &Caller) -> Result<QuorumCheck, ServiceError> {
        caller.check(Action::Read)?;
        let st = self.raft.status();
        let voters = st.members.len().max(1);
        let usable = st.members.iter().filter(|m| m.id == self.id || m.reachable).count();
        Ok(QuorumCheck { usable, needed: voters / 2 + 1, voters })
    }

    /// Can `change` move what discovery shows? Anything but a view
    /// reported about a group that is not managed: discovery lists only
    /// managed groups, and every observer reports every second about every
    /// group, so rescanning every group for each report grew with groups
    /// times reports.
    fn concerns_discovery(&self, change: &Change) -> bool {
        change.kind != ChangeKind::ViewReported
            || self.reader.with_machine(|m, _| m.group(&change.group).is_none_or(|g| g.spec.is_managed()))
    }

    /// Follows discovery's changes and sends them on `tx` until the node
    /// stops or the receiver goes. Nothing is sent for the state at start.
    pub async fn discovery_events(&self, tx: mpsc::Sender<DiscoveryEvent>) {
        let mut changes = self.reader.subscribe();
        let mut stopping = self.stopping.clone();
        let mut tracker = DiscoveryTracker::default();
        if self.ensure_caught_up().is_ok() {
            tracker.update(&self.discovery_now());
        }
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                ev = changes.recv() => match ev {
                    Ok(ev) if !self.concerns_discovery(&ev.change) => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => drain(&mut changes),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = recheck.tick() => {}
                () = tx.closed() => return,
                () = stopped(&mut stopping) => return,
            }
            // A node that has not caught up may hold an old state: it would
            // announce a switch back to a previous primary.
            if self.ensure_caught_up().is_err() {
                continue;
            }
            for ev in tracker.update(&self.discovery_now()) {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Drops the changes already queued: the rescan that follows sees the
/// state after them all (it reads the state now), so a burst of reports
/// costs one rescan, not one each. Bounded, so a flood cannot hold the loop.
fn drain(changes: &mut broadcast::Receiver<ChangeEvent>) {
    for _ in 0..DRAIN_AT_MOST {
        match changes.try_recv() {
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    }
}

/// A change clients may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// The lease passed from one member to another (committed).
    SwitchMaster { group: String, from: (String, u16), to: (String, u16) },
    /// A primary's `s_down` (`objective: false`) or `o_down` flag went on
    /// or off.
    Down { group: String, addr: (String, u16), objective: bool, on: bool, votes: usize, quorum: usize },
}

/// The last lease holder and primary flags seen per group; turns reads
/// into [`DiscoveryEvent`]s.
#[derive(Debug, Default)]
pub struct DiscoveryTracker {
    /// The last holder (with its address) of each group, kept across the
    /// gap between an expiry and the next grant.
    holders: BTreeMap<String, (String, (String, u16))>,
    /// The primary and its flags as last seen.
    flags: BTreeMap<String, (String, DownFlags)>,
    started: bool,
}

impl DiscoveryTracker {
    /// The events between the last read and `now` (none for the first).
    pub fn update(&mut self, now: &[Primary]) -> Vec<DiscoveryEvent> {
        let mut out = Vec::new();
        let first = !self.started;
        self.started = true;
        for p in now {
            self.holder_events(p, first, &mut out);
            self.flag_events(p, first, &mut out);
        }
        self.holders.retain(|g, _| now.iter().any(|p| &p.group == g));
        self.flags.retain(|g, _| now.iter().any(|p| &p.group == g));
        out
    }

    fn holder_events(&mut self, p: &Primary, first: bool, out: &mut Vec<DiscoveryEvent>) {
        let Some(holder) = &p.holder else { return };
        let Some(addr) = p.addr_of(holder).map(|a| (a.host.clone(), a.port)) else { return };
        let before = self.holders.insert(p.group.clone(), (holder.clone(), addr.clone()));
        if let Some((old, from)) = before
            && !first
            && &old != holder
        {
            out.push(DiscoveryEvent::SwitchMaster { group: p.group.clone(), from, to: addr });
        }
    }

    fn flag_events(&mut self, p: &Primary, first: bool, out: &mut Vec<DiscoveryEvent>) {
        let Some(m) = &p.primary else {
            self.flags.remove(&p.group);
            return;
        };
        let before = match self.flags.insert(p.group.clone(), (m.member.clone(), m.flags)) {
            // A new primary starts from no flags.
            Some((member, f)) if member == m.member => f,
            _ if first => m.flags,
            _ => DownFlags::default(),
        };
        let addr = (m.host.clone(), m.port);
        let mut push = |objective: bool, on: bool| {
            out.push(DiscoveryEvent::Down {
                group: p.group.clone(),
                addr: addr.clone(),
                objective,
                on,
                votes: m.down_votes,
                quorum: m.quorum,
            });
        };
        // Subjective before objective going on, the reverse going off.
        if m.flags.s_down && !before.s_down {
            push(false, true);
        }
        if m.flags.o_down != before.o_down {
            push(true, m.flags.o_down);
        }
        if !m.flags.s_down && before.s_down {
            push(false, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, port: u16, s_down: bool, o_down: bool) -> MemberAddr {
        MemberAddr {
            member: name.into(),
            host: "10.0.0.1".into(),
            port,
            flags: DownFlags { s_down, o_down },
            down_votes: usize::from(s_down) + usize::from(o_down),
            quorum: 2,
            link_up: true,
            offset: 0,
            priority: 100,
        }
    }

    fn view(primary: MemberAddr, replica: MemberAddr, holder: Option<&str>) -> Vec<Primary> {
        vec![Primary {
            group: "db".into(),
            primary: Some(primary),
            replicas: vec![replica],
            holder: holder.map(Into::into),
            epoch: 1,
            quorum: 2,
            down_after_ms: 500,
            lease_ttl_ms: 1000,
        }]
    }

    #[test]
    fn a_crash_and_failover_as_events() {
        let mut t = DiscoveryTracker::default();
        let (a, b) = (|s, o| member("db-1", 7001, s, o), |s, o| member("db-2", 7002, s, o));
        assert!(t.update(&view(a(false, false), b(false, false), Some("db-1"))).is_empty(), "nothing at start");
        let ev = t.update(&view(a(true, false), b(false, false), Some("db-1")));
        assert!(matches!(&ev[..], [DiscoveryEvent::Down { objective: false, on: true, .. }]), "{ev:?}");
        let ev = t.update(&view(a(true, true), b(false, false), Some("db-1")));
        assert!(matches!(&ev[..], [DiscoveryEvent::Down { objective: true, on: true, .. }]), "{ev:?}");
        // The successor is designated while the old lease runs out: no
        // switch yet, and the new primary starts without flags.
        assert!(t.update(&view(b(false, false), a(true, true), Some("db-1"))).is_empty());
        assert!(t.update(&view(b(false, false), a(true, true), None)).is_empty(), "the lease is free");
        let ev = t.update(&view(b(false, false), a(true, true), Some("db-2")));
        assert_eq!(
            ev,
            [DiscoveryEvent::SwitchMaster {
                group: "db".into(),
                from: ("10.0.0.1".into(), 7001),
                to: ("10.0.0.1".into(), 7002)
            }]
        );
        assert!(t.update(&view(b(false, false), a(false, false), Some("db-2"))).is_empty());
        let ev = t.update(&view(b(true, true), a(false, false), Some("db-2")));
        assert_eq!(ev.len(), 2, "+sdown then +odown: {ev:?}");
        let ev = t.update(&view(b(false, false), a(false, false), Some("db-2")));
        assert!(
            matches!(
                &ev[..],
                [
                    DiscoveryEvent::Down { objective: true, on: false, .. },
                    DiscoveryEvent::Down { objective: false, on: false, .. }
                ]
            ),
            "-odown then -sdown: {ev:?}"
        );
    }
}

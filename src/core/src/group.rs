//! Failover groups: who the members are, where their heartbeats live, and the
//! timing policy every observer follows. Stored in the replicated state.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::names::{self, NameError, NameKind};
use crate::ranking::{self, Rank};

/// The most members a group may have (the matrix is members x observers).
pub const MAX_MEMBERS: usize = 32;

/// The longest heartbeat or data URL, in bytes.
pub const MAX_URL_LEN: usize = 256;

/// The shortest heartbeat interval: every observer reads every member this
/// often, so a shorter one only turns CPU into noise.
pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 10;

/// A failover group as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// The group's name, unique in the cluster (and its lease's name).
    pub name: String,
    /// Its members, at most [`MAX_MEMBERS`].
    pub members: Vec<MemberSpec>,
    /// The timing its observers follow.
    #[serde(default)]
    pub policy: Policy,
    /// Present for a *managed* group: quorate picks its primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverPolicy>,
}

/// How quorate runs the primary role of a managed group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverPolicy {
    /// The primary's lease: it must renew within this TTL or fence itself.
    pub lease_ttl_ms: u64,
    /// A replica more than this many bytes behind the primary's last
    /// reported replication offset is not promoted.
    pub max_lag_bytes: u64,
    /// After an automatic failover, no other for this long (an operator can
    /// clear the block).
    pub min_failover_interval_ms: u64,
    /// The primary when the group is created; default: the member with the
    /// highest priority (the first by name on a tie, see
    /// [`crate::ranking`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_primary: Option<String>,
}

impl FailoverPolicy {
    /// The bound on each coordinator call of an agent, in ms: a sixth of the
    /// lease TTL (100 ms for the default 600 ms lease), within
    /// 50..=1000 ms. Below the renewal interval (a quarter of the TTL), so a
    /// call to an unreachable coordinator never holds up what comes after it
    /// for as long as one renewal.
    pub fn agent_call_timeout_ms(&self) -> u64 {
        (self.lease_ttl_ms / 6).clamp(50, 1_000)
    }
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        Self { lease_ttl_ms: 600, max_lag_bytes: 1 << 20, min_failover_interval_ms: 30_000, initial_primary: None }
    }
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// The member's name, unique in the group.
    pub id: String,
    /// The Redis that holds this member's heartbeat key:
    /// `redis://HOST:PORT[/DB]` or `rediss://...`. Several members may share
    /// one store; the key names the member.
    pub heartbeat: String,
    /// Preference for the primary role (higher wins); 0 = never primary.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// The member's data service, for drivers that need to reach it from
    /// elsewhere: the redis driver makes replicas follow the primary's
    /// `redis://HOST:PORT`. Required in managed groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Where clients reach the data service, `HOST:PORT`, when that is not
    /// the data URL's host and port (NAT, a container's published port, a
    /// separate client network). Redis Sentinel clients are given this
    /// address; replicas keep following the data URL. Only with `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<String>,
}

fn default_priority() -> u32 {
    100
}

/// Timing every observer of the group follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// How often members publish their heartbeat and observers read them.
    pub heartbeat_interval_ms: u64,
    /// An observer calls a target down once it has seen no progress (a new
    /// sequence number) for this long: key missing, expired, frozen, or its
    /// store unreachable.
    pub down_after_ms: u64,
    /// Observers re-send their whole view at least this often, even without
    /// changes, so that its freshness is known.
    pub report_interval_ms: u64,
    /// A view older than this does not count in verdicts.
    pub freshness_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self { heartbeat_interval_ms: 100, down_after_ms: 500, report_interval_ms: 1_000, freshness_ms: 3_000 }
    }
}

/// The shortest bound on a heartbeat store call, whatever the interval: a
/// round trip to a store needs a few ms even when heartbeats are 1 ms apart.
pub const MIN_STORE_TIMEOUT_MS: u64 = 20;

/// The shortest election tick: the leader's election loop never spins
/// faster than this, however short a group's heartbeat interval.
pub const MIN_ELECTION_TICK_MS: u64 = 10;

impl Policy {
    /// The TTL of a heartbeat key: it disappears once the member has not
    /// published for `down_after_ms`.
    pub fn heartbeat_ttl_ms(&self) -> u64 {
        self.down_after_ms
    }

    /// How often an observer reads its targets' heartbeats: once per
    /// heartbeat interval, so that it sees every beat's progress.
    pub fn read_interval_ms(&self) -> u64 {
        self.heartbeat_interval_ms
    }

    /// The bound on one heartbeat store call (an observer's read round):
    /// four fifths of the heartbeat interval, so that a slow store cannot
    /// stall the next round, and at least [`MIN_STORE_TIMEOUT_MS`].
    pub fn store_timeout_ms(&self) -> u64 {
        (self.heartbeat_interval_ms * 4 / 5).max(MIN_STORE_TIMEOUT_MS)
    }

    /// How often an observer re-sends its whole view even without changes:
    /// every report interval, so that the view's freshness is known.
    pub fn refresh_interval_ms(&self) -> u64 {
        self.report_interval_ms
    }

    /// How often the Raft leader decides about a managed group: once per
    /// heartbeat interval (no verdict changes faster than the readings it
    /// comes from), and no faster than [`MIN_ELECTION_TICK_MS`].
    pub fn election_tick_ms(&self) -> u64 {
        self.heartbeat_interval_ms.max(MIN_ELECTION_TICK_MS)
    }

    /// The policy one loop serving several groups runs by: each field the
    /// shortest of `policies`, so that every group is served at least as
    /// often as its own policy asks; [`Policy::default`] when there is no
    /// group, so that an idle loop still ticks at the usual pace.
    ///
    /// Every derived timing above is non-decreasing in the fields it reads,
    /// so a timing of the tightest policy is the shortest of the groups'
    /// timings. The tightest of valid policies is valid: each bound that
    /// [`Policy::validate`] checks holds for the minima too.
    pub fn tightest<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Policy {
        policies
            .into_iter()
            .copied()
            .reduce(|a, b| Policy {
                heartbeat_interval_ms: a.heartbeat_interval_ms.min(b.heartbeat_interval_ms),
                down_after_ms: a.down_after_ms.min(b.down_after_ms),
                report_interval_ms: a.report_interval_ms.min(b.report_interval_ms),
                freshness_ms: a.freshness_ms.min(b.freshness_ms),
            })
            .unwrap_or_default()
    }
}

/// An invalid group spec, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SpecError {
    /// The group's name is not a valid name.
    #[error("name: {0}")]
    Name(NameError),
    /// A group without members has nothing to observe.
    #[error("members: a group needs at least one member")]
    NoMembers,
    /// More members than [`MAX_MEMBERS`] (the matrix grows as their square).
    #[error("members: {count} members is more than the limit of {max}", max = MAX_MEMBERS)]
    TooManyMembers {
        /// How many the spec lists.
        count: usize,
    },
    /// A member's name is not a valid name.
    #[error("members[{index}].id: {error}")]
    MemberId {
        /// The member's place in the list.
        index: usize,
        /// What is wrong with the name.
        error: NameError,
    },
    /// A member's name would pass for a coordinator observer's.
    #[error("members[{index}].id: {id:?} starts with \"coordinator-\", which names coordinator observers")]
    ReservedMemberId {
        /// The member's place in the list.
        index: usize,
        /// The name.
        id: String,
    },
    /// Two members share a name.
    #[error("members[{index}].id: {id:?} appears twice")]
    DuplicateMember {
        /// The second one's place in the list.
        index: usize,
        /// The name.
        id: String,
    },
    /// A member's announce address is not `HOST:PORT`, or has no data URL.
    #[error("members[{index}].announce: {announce:?}: {reason}")]
    BadAnnounce {
        /// The member's place in the list.
        index: usize,
        /// The address given.
        announce: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A heartbeat store's URL does not parse.
    #[error("members[{index}].heartbeat: {url:?}: {reason}")]
    BadUrl {
        /// The member's place in the list.
        index: usize,
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A timing of the policy breaks one of its bounds.
    #[error("policy.{field}: {reason}")]
    Policy {
        /// The field at fault.
        field: String,
        /// The bound it breaks.
        reason: String,
    },
    /// A data service's URL does not parse.
    #[error("members[{index}].data: {url:?}: {reason}")]
    BadDataUrl {
        /// The member's place in the list.
        index: usize,
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A URL longer than [`MAX_URL_LEN`] (not echoed back).
    #[error("members[{index}].{field}: the URL is {len} bytes; the limit is {max} bytes", max = MAX_URL_LEN)]
    UrlTooLong {
        /// The member's place in the list.
        index: usize,
        /// `heartbeat` or `data`.
        field: String,
        /// Its length.
        len: usize,
    },
    /// The failover section does not fit the group.
    #[error("failover.{field}: {reason}")]
    Failover {
        /// The field at fault.
        field: String,
        /// Why.
        reason: String,
    },
}

impl GroupSpec {
    /// Checks the spec; the error names the field at fault.
    pub fn validate(&self) -> Result<(), SpecError> {
        names::validate(NameKind::Group, &self.name).map_err(SpecError::Name)?;
        if self.members.is_empty() {
            return Err(SpecError::NoMembers);
        }
        if self.members.len() > MAX_MEMBERS {
            return Err(SpecError::TooManyMembers { count: self.members.len() });
        }
        let mut seen = BTreeSet::new();
        for (index, m) in self.members.iter().enumerate() {
            names::validate(NameKind::Member, &m.id).map_err(|error| SpecError::MemberId { index, error })?;
            if m.id.starts_with(names::COORDINATOR_PREFIX) {
                return Err(SpecError::ReservedMemberId { index, id: m.id.clone() });
            }
            if !seen.insert(m.id.as_str()) {
                return Err(SpecError::DuplicateMember { index, id: m.id.clone() });
            }
            if m.heartbeat.len() > MAX_URL_LEN {
                return Err(SpecError::UrlTooLong { index, field: "heartbeat".into(), len: m.heartbeat.len() });
            }
            check_redis_url(&m.heartbeat).map_err(|reason| SpecError::BadUrl {
                index,
                url: redacted(&m.heartbeat),
                reason,
            })?;
            if let Some(data) = &m.data {
                if data.len() > MAX_URL_LEN {
                    return Err(SpecError::UrlTooLong { index, field: "data".into(), len: data.len() });
                }
                check_redis_url(data).map_err(|reason| SpecError::BadDataUrl { index, url: redacted(data), reason })?;
            }
            if let Some(announce) = &m.announce {
                let reason = if m.data.is_none() {
                    Some("given without data (only a data service is announced)".to_owned())
                } else if announce.len() > MAX_URL_LEN {
                    Some(format!("{} bytes is longer than {MAX_URL_LEN}", announce.len()))
                } else {
                    parse_host_port(announce).err()
                };
                if let Some(reason) = reason {
                    return Err(SpecError::BadAnnounce { index, announce: announce.clone(), reason });
                }
            }
        }
        self.policy.validate()?;
        if let Some(f) = &self.failover {
            self.validate_failover(f)?;
        }
        Ok(())
    }

    fn validate_failover(&self, f: &FailoverPolicy) -> Result<(), SpecError> {
        let bad = |field: &str, reason: String| Err(SpecError::Failover { field: field.to_owned(), reason });
        let p = &self.policy;
        if f.lease_ttl_ms < p.down_after_ms + p.heartbeat_interval_ms {
            return bad(
                "lease_ttl_ms",
                format!(
                    "{} ms is shorter than down_after_ms + heartbeat_interval_ms ({} ms): a primary would lose its lease before anyone could judge it down",
                    f.lease_ttl_ms,
                    p.down_after_ms + p.heartbeat_interval_ms
                ),
            );
        }
        if !self.members.iter().any(|m| m.priority > 0) {
            return bad("members", "a managed group needs a member with priority above 0".into());
        }
        // Data URLs are all or nothing: the redis driver needs the
        // primary's, and a mix is almost certainly a typo.
        let with_data = self.members.iter().filter(|m| m.data.is_some()).count();
        if with_data != 0 && with_data != self.members.len() {
            let index = self.members.iter().position(|m| m.data.is_none()).unwrap_or(0);
            return Err(SpecError::Failover {
                field: format!("members[{index}].data"),
                reason: "missing: give every member of the group its data URL, or none (exec and none drivers)".into(),
            });
        }
        if let Some(initial) = &f.initial_primary {
            match self.member(initial) {
                None => return bad("initial_primary", format!("{initial:?} is not a member")),
                Some(m) if m.priority == 0 => {
                    return bad("initial_primary", format!("{initial:?} has priority 0 (never primary)"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// [`FailoverPolicy::agent_call_timeout_ms`] of this group's failover
    /// policy, or of the default one for a group quorate does not manage.
    pub fn agent_call_timeout_ms(&self) -> u64 {
        self.failover.clone().unwrap_or_default().agent_call_timeout_ms()
    }

    /// Whether quorate picks this group's primary.
    pub fn is_managed(&self) -> bool {
        self.failover.is_some()
    }

    /// The primary a new managed group starts with: `initial_primary` if
    /// given, else the best member by [`crate::ranking`] among those with a
    /// priority above 0; `None` for an unmanaged group.
    pub fn initial_primary(&self) -> Option<&str> {
        let f = self.failover.as_ref()?;
        if let Some(p) = &f.initial_primary {
            return Some(p);
        }
        // No member has reported data yet: the ranking falls to priority,
        // then name.
        let may_lead = self.members.iter().filter(|m| m.priority > 0);
        ranking::best(may_lead, |m| Rank { eligible: true, priority: m.priority, offset: 0, member: &m.id })
            .map(|m| m.id.as_str())
    }

    /// The member named `id`.
    pub fn member(&self, id: &str) -> Option<&MemberSpec> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The members' names, in list order.
    pub fn member_ids(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| m.id.as_str())
    }
}

impl Policy {
    /// Checks the bounds between the timings; the error names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field: &str, reason: String| Err(SpecError::Policy { field: field.to_owned(), reason });
        if self.heartbeat_interval_ms < MIN_HEARTBEAT_INTERVAL_MS {
            return bad(
                "heartbeat_interval_ms",
                format!("{} ms is below the minimum of {MIN_HEARTBEAT_INTERVAL_MS} ms", self.heartbeat_interval_ms),
            );
        }
        if self.down_after_ms < 2 * self.heartbeat_interval_ms {
            return bad(
                "down_after_ms",
                format!(
                    "{} ms is shorter than two heartbeat intervals ({} ms): one late heartbeat would mark a member down",
                    self.down_after_ms,
                    2 * self.heartbeat_interval_ms
                ),
            );
        }
        if self.report_interval_ms < self.heartbeat_interval_ms {
            return bad(
                "report_interval_ms",
                format!(
                    "{} ms is shorter than heartbeat_interval_ms ({} ms)",
                    self.report_interval_ms, self.heartbeat_interval_ms
                ),
            );
        }
        if self.freshness_ms < 2 * self.report_interval_ms {
            return bad(
                "freshness_ms",
                format!(
                    "{} ms is shorter than two report intervals ({} ms): a single late report would make a view stale",
                    self.freshness_ms,
                    2 * self.report_interval_ms
                ),
            );
        }
        Ok(())
    }
}

/// The parts of a Redis URL quorate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisAddr {
    /// `rediss://`: connect with TLS.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// TCP port, 1-65535.
    pub port: u16,
    /// Database number (0 when not given).
    pub db: u32,
}

/// Parses `redis://[user:pass@]HOST:PORT[/DB]` (or `rediss://`).
pub fn parse_redis_url(url: &str) -> Result<RedisAddr, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("redis://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("rediss://") {
        (true, r)
    } else {
        return Err("must start with redis:// or rediss://".into());
    };
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let (hostport, db) = match rest.split_once('/') {
        Some((hp, "")) => (hp, 0),
        Some((hp, db)) => (hp, db.parse::<u32>().map_err(|_| format!("database {db:?} is not a number"))?),
        None => (rest, 0),
    };
    let (host, port) = parse_host_port(hostport)?;
    Ok(RedisAddr { tls, host, port, db })
}

/// Parses `HOST:PORT` (the host non-empty, the port 1-65535).
pub fn parse_host_port(hostport: &str) -> Result<(String, u16), String> {
    let (host, port) = hostport.rsplit_once(':').ok_or("needs HOST:PORT")?;
    if host.is_empty() {
        return Err("has no host".into());
    }
    let port = port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("port {port:?} is not 1-65535"))?;
    Ok((host.to_owned(), port))
}

/// `url` with any password replaced by `***`, for messages and logs: a
/// Redis URL may carry credentials, which are never echoed.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

fn check_redis_url(url: &str) -> Result<(), String> {
    parse_redis_url(url).map(|_| ())
}

/// The heartbeat key of `member` in `group`.
pub fn heartbeat_key(group: &str, member: &str) -> String {
    format!("quorate:hb:{{{group}}}:{member}")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(members: &[&str]) -> GroupSpec {
        GroupSpec {
            name: "cache".into(),
            members: members
                .iter()
                .enumerate()
                .map(|(i, id)| MemberSpec {
                    id: (*id).into(),
                    heartbeat: format!("redis://127.0.0.1:{}", 6400 + i),
                    priority: 100,
                    data: None,
                    announce: None,
                })
                .collect(),
            policy: Policy::default(),
            failover: None,
        }
    }

    #[test]
    fn a_good_spec_passes() {
        spec(&["cache-1", "cache-2"]).validate().unwrap();
    }

    #[test]
    fn each_mistake_names_its_field() {
        let err = |s: GroupSpec| s.validate().unwrap_err().to_string();
        assert_eq!(err(spec(&[])), "members: a group needs at least one member");
        assert_eq!(err(spec(&["a", "b", "a"])), "members[2].id: \"a\" appears twice");
        assert!(err(spec(&["coordinator-1"])).contains("names coordinator observers"));
        assert!(err(spec(&["a b"])).starts_with("members[0].id: member name"));
        let mut s = spec(&["a"]);
        s.members[0].heartbeat = "http://x:1".into();
        assert_eq!(err(s.clone()), "members[0].heartbeat: \"http://x:1\": must start with redis:// or rediss://");
        s.members[0].heartbeat = "redis://host".into();
        assert!(err(s.clone()).contains("needs HOST:PORT"));
        s.members[0].heartbeat = "redis://host:0".into();
        assert!(err(s.clone()).contains("is not 1-65535"));
        let mut s = spec(&["a"]);
        s.policy.down_after_ms = 150;
        assert!(err(s.clone()).starts_with("policy.down_after_ms: 150 ms is shorter than two heartbeat intervals"));
        s.policy = Policy { freshness_ms: 1000, ..Policy::default() };
        assert!(err(s.clone()).starts_with("policy.freshness_ms:"));
        s.policy = Policy { report_interval_ms: 50, ..Policy::default() };
        assert!(err(s.clone()).starts_with("policy.report_interval_ms:"));
        s.name = String::new();
        assert!(err(s).starts_with("name: group name must not be empty"));
    }

    #[test]
    fn urls_and_intervals_are_bounded_and_passwords_never_echoed() {
        let err = |s: GroupSpec| s.validate().unwrap_err().to_string();
        let mut s = spec(&["a"]);
        s.members[0].heartbeat = format!("redis://{}:1", "h".repeat(MAX_URL_LEN));
        let e = err(s.clone());
        assert!(e.starts_with("members[0].heartbeat: the URL is 266 bytes; the limit is 256"), "{e}");
        assert!(!e.contains("hhhh"), "a long URL is not echoed: {e}");
        s.members[0].heartbeat = "redis://user:s3cret@host".into();
        let e = err(s.clone());
        assert!(e.contains("user:***@host") && !e.contains("s3cret"), "{e}");
        assert_eq!(redacted("rediss://:pw@h:1/2"), "rediss://:***@h:1/2");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
        let mut s = spec(&["a"]);
        s.policy = Policy { heartbeat_interval_ms: 5, down_after_ms: 10, ..Policy::default() };
        assert_eq!(err(s), "policy.heartbeat_interval_ms: 5 ms is below the minimum of 10 ms");
    }

    #[test]
    fn an_agent_call_is_bounded_by_a_sixth_of_the_lease() {
        let mut s = spec(&["a", "b"]);
        assert_eq!(s.agent_call_timeout_ms(), 100, "unmanaged: the default lease's");
        let ttl = |ms| FailoverPolicy { lease_ttl_ms: ms, ..FailoverPolicy::default() };
        s.failover = Some(ttl(3_000));
        assert_eq!(s.agent_call_timeout_ms(), 500);
        assert_eq!(ttl(120).agent_call_timeout_ms(), 50, "at least 50 ms");
        assert_eq!(ttl(60_000).agent_call_timeout_ms(), 1_000, "at most a second");
    }

    #[test]
    fn managed_groups_are_checked_too() {
        let err = |s: GroupSpec| s.validate().unwrap_err().to_string();
        let mut s = spec(&["a", "b"]);
        s.failover = Some(FailoverPolicy::default());
        s.validate().unwrap();
        s.members[1].data = Some("redis://127.0.0.1:6501".into());
        assert_eq!(
            err(s.clone()),
            "failover.members[0].data: missing: give every member of the group its data URL, or none (exec and none drivers)"
        );
        for (i, m) in s.members.iter_mut().enumerate() {
            m.data = Some(format!("redis://127.0.0.1:{}", 6500 + i));
        }
        s.validate().unwrap();
        assert_eq!(s.initial_primary(), Some("a"));
        s.members[1].priority = 200;
        assert_eq!(s.initial_primary(), Some("b"));
        s.failover.as_mut().unwrap().lease_ttl_ms = 300;
        assert!(err(s.clone()).starts_with("failover.lease_ttl_ms: 300 ms is shorter than down_after_ms"));
        s.failover = Some(FailoverPolicy { initial_primary: Some("zz".into()), ..FailoverPolicy::default() });
        assert_eq!(err(s.clone()), "failover.initial_primary: \"zz\" is not a member");
        s.failover = Some(FailoverPolicy::default());
        s.members[0].priority = 0;
        s.members[1].priority = 0;
        assert!(err(s).starts_with("failover.members: a managed group needs a member with priority above 0"));
    }

    #[test]
    fn announce_addresses_need_a_data_url_and_a_host_and_port() {
        let err = |s: GroupSpec| s.validate().unwrap_err().to_string();
        let mut s = spec(&["a", "b"]);
        s.members[0].announce = Some("db.example.com:6379".into());
        assert_eq!(
            err(s.clone()),
            "members[0].announce: \"db.example.com:6379\": given without data (only a data service is announced)"
        );
        s.members[0].data = Some("redis://10.0.0.1:6379".into());
        s.validate().unwrap();
        for (bad, why) in [("db.example.com", "needs HOST:PORT"), (":6379", "has no host"), ("h:0", "is not 1-65535")] {
            s.members[0].announce = Some(bad.into());
            let e = err(s.clone());
            assert!(e.starts_with("members[0].announce: ") && e.contains(why), "{bad}: {e}");
        }
        s.members[0].announce = Some(format!("{}:1", "h".repeat(MAX_URL_LEN)));
        assert!(err(s).contains("is longer than"));
    }

    #[test]
    fn the_initial_primary_is_the_best_by_the_one_ranking() {
        let mut s = spec(&["b", "a", "c"]);
        assert_eq!(s.initial_primary(), None, "unmanaged");
        s.failover = Some(FailoverPolicy::default());
        // A tie of priorities goes by name, not by list order.
        assert_eq!(s.initial_primary(), Some("a"));
        s.members[2].priority = 150;
        assert_eq!(s.initial_primary(), Some("c"));
        for m in &mut s.members {
            m.priority = 0;
        }
        assert_eq!(s.initial_primary(), None, "nobody may be primary");
        s.failover.as_mut().unwrap().initial_primary = Some("b".into());
        assert_eq!(s.initial_primary(), Some("b"), "the configured one, unchecked here");
    }

    #[test]
    fn derived_timings_follow_the_heartbeat_and_report_intervals() {
        let p = Policy::default();
        assert_eq!(
            (p.read_interval_ms(), p.store_timeout_ms(), p.refresh_interval_ms(), p.election_tick_ms()),
            (100, 80, 1_000, 100)
        );
        let p = Policy { heartbeat_interval_ms: 250, report_interval_ms: 2_000, ..Policy::default() };
        assert_eq!(
            (p.read_interval_ms(), p.store_timeout_ms(), p.refresh_interval_ms(), p.election_tick_ms()),
            (250, 200, 2_000, 250)
        );
        // The floors of very short intervals.
        let p = Policy { heartbeat_interval_ms: 24, ..Policy::default() };
        assert_eq!((p.store_timeout_ms(), p.election_tick_ms()), (MIN_STORE_TIMEOUT_MS, 24));
        let p = Policy { heartbeat_interval_ms: 3, ..Policy::default() };
        assert_eq!((p.store_timeout_ms(), p.election_tick_ms()), (MIN_STORE_TIMEOUT_MS, MIN_ELECTION_TICK_MS));
    }

    #[test]
    fn the_tightest_policy_serves_every_group_and_defaults_when_there_is_none() {
        assert_eq!(Policy::tightest([]), Policy::default());
        let a =
            Policy { heartbeat_interval_ms: 50, down_after_ms: 900, report_interval_ms: 1_000, freshness_ms: 2_000 };
        let b = Policy { heartbeat_interval_ms: 200, down_after_ms: 400, report_interval_ms: 200, freshness_ms: 5_000 };
        let t = Policy::tightest([&a, &b]);
        assert_eq!(
            t,
            Policy { heartbeat_interval_ms: 50, down_after_ms: 400, report_interval_ms: 200, freshness_ms: 2_000 }
        );
        t.validate().unwrap();
        assert_eq!(Policy::tightest([&b]), b);
        // A timing of the tightest policy is the shortest of the groups'.
        let intervals = [1, 3, 12, 24, 25, 26, 99, 100, 101, 1_000];
        for &x in &intervals {
            for &y in &intervals {
                let ps =
                    [x, y].map(|h| Policy { heartbeat_interval_ms: h, report_interval_ms: h * 3, ..Policy::default() });
                let t = Policy::tightest(&ps);
                let min = |f: fn(&Policy) -> u64| ps.iter().map(f).min().unwrap();
                assert_eq!(t.read_interval_ms(), min(Policy::read_interval_ms));
                assert_eq!(t.store_timeout_ms(), min(Policy::store_timeout_ms));
                assert_eq!(t.refresh_interval_ms(), min(Policy::refresh_interval_ms));
                assert_eq!(t.election_tick_ms(), min(Policy::election_tick_ms));
            }
        }
    }

    #[test]
    fn redis_urls() {
        assert_eq!(
            parse_redis_url("redis://127.0.0.1:6379/2").unwrap(),
            RedisAddr { tls: false, host: "127.0.0.1".into(), port: 6379, db: 2 }
        );
        assert_eq!(parse_redis_url("rediss://u:p@h:1").unwrap().host, "h");
        assert!(parse_redis_url("redis://h:1/x").is_err());
        assert_eq!(heartbeat_key("g", "m"), "quorate:hb:{g}:m");
    }
}

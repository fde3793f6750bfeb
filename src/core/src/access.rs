//! Who may do what: identities and the one permission check.
//!
//! An identity comes from the caller's certificate (its `quorate://` URI
//! subject alternative name, see [`Identity::parse_uri`]); the service layer
//! asks [`check`] before every operation, so the rule lives here once and
//! every front door (gRPC, the Sentinel-compatible endpoint, HTTP) gets the
//! same answer. Pure: no certificates are parsed here, only names compared.
//!
//! The rules, by role:
//! - `node` N: Raft RPCs, and reports as observer `coordinator-N`;
//! - `member` M of group G: reports only as observer M of G; G's lease only
//!   as holder M;
//! - `client` C: acquire, renew and release only as holder C, on the groups
//!   its certificate names (`*` for any);
//! - `reader`: reads only;
//! - `admin`: group changes and deletes, switchover, maintenance, unblock,
//!   what-if, backups (a snapshot holds every group's spec), and cluster
//!   membership (adding and removing coordinator nodes).
//!
//! Every identity may read: reads steer nothing, and agents and lease
//! holders read their group's spec, election and lease to do their work.

use std::fmt;

use crate::names::{self, NameKind};

/// The scheme of identity URIs.
pub const URI_SCHEME: &str = "quorate://";

/// A client's group list that allows every group.
pub const ANY_GROUP: &str = "*";

/// The longest identity URI accepted, in bytes (a member URI with two
/// names of the longest length fits well within it).
pub const MAX_URI_LEN: usize = 1024;

/// The most groups one client identity may name.
pub const MAX_CLIENT_GROUPS: usize = 64;

/// The roles an identity can have, one per certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// A coordinator node.
    Node,
    /// A member of one failover group (its agent).
    Member,
    /// A service using plain leases.
    Client,
    /// Reads only.
    Reader,
    /// Operators: group changes, switchover, maintenance.
    Admin,
}

impl Role {
    /// Every role, in the order the help text lists them.
    pub const ALL: [Role; 5] = [Role::Node, Role::Member, Role::Client, Role::Reader, Role::Admin];

    /// The name in URIs, flags and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Member => "member",
            Role::Client => "client",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|r| r.as_str()).collect();
            format!("{s:?} is not a role; use one of {}", names.join(", "))
        })
    }
}

/// Who is calling, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Coordinator node `id`.
    Node {
        /// Its Raft node id.
        id: u64,
    },
    /// Member `member` of group `group`.
    Member {
        /// The group.
        group: String,
        /// The member id in it.
        member: String,
    },
    /// A service that holds leases as holder `name`.
    Client {
        /// The holder name bound to this identity.
        name: String,
        /// The groups whose leases it may take ([`ANY_GROUP`] for every one).
        groups: Vec<String>,
    },
    /// A reader.
    Reader {
        /// Who (for logs and messages).
        name: String,
    },
    /// An operator.
    Admin {
        /// Who (for logs and messages).
        name: String,
    },
}

/// Why an identity URI is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not a `quorate://` URI of a known shape.
    #[error("{0}")]
    Malformed(String),
}

fn malformed(msg: impl Into<String>) -> IdentityError {
    IdentityError::Malformed(msg.into())
}

fn checked(kind: NameKind, what: &str, name: &str) -> Result<String, IdentityError> {
    names::validate(kind, name).map_err(|e| malformed(format!("{what}: {e}")))?;
    Ok(name.to_owned())
}

impl Identity {
    /// The role this identity has.
    pub fn role(&self) -> Role {
        match self {
            Identity::Node { .. } => Role::Node,
            Identity::Member { .. } => Role::Member,
            Identity::Client { .. } => Role::Client,
            Identity::Reader { .. } => Role::Reader,
            Identity::Admin { .. } => Role::Admin,
        }
    }

    /// The URI a certificate carries as a subject alternative name:
    /// `quorate://node/N`, `quorate://member/G/M`,
    /// `quorate://client/NAME/G1,G2`, `quorate://reader/NAME`,
    /// `quorate://admin/NAME`.
    pub fn uri(&self) -> String {
        let path = match self {
            Identity::Node { id } => format!("node/{id}"),
            Identity::Member { group, member } => format!("member/{group}/{member}"),
            Identity::Client { name, groups } => format!("client/{name}/{}", groups.join(",")),
            Identity::Reader { name } => format!("reader/{name}"),
            Identity::Admin { name } => format!("admin/{name}"),
        };
        format!("{URI_SCHEME}{path}")
    }

    /// Parses an identity URI (the inverse of [`Self::uri`]); every name in
    /// it must be a valid name, so it can never smuggle a separator.
    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        if uri.len() > MAX_URI_LEN {
            return Err(malformed(format!("identity URI is {} bytes; the limit is {MAX_URI_LEN}", uri.len())));
        }
        let path = uri.strip_prefix(URI_SCHEME).ok_or_else(|| malformed("identity URI must start with quorate://"))?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["node", id] => {
                let id = id.parse().map_err(|_| malformed(format!("node id {id:?} is not a number")))?;
                Ok(Identity::Node { id })
            }
            ["member", group, member] => Ok(Identity::Member {
                group: checked(NameKind::Group, "group", group)?,
                member: checked(NameKind::Member, "member", member)?,
            }),
            ["client", name, groups] => {
                let groups: Vec<&str> = groups.split(',').collect();
                if groups.len() > MAX_CLIENT_GROUPS {
                    return Err(malformed(format!("a client names at most {MAX_CLIENT_GROUPS} groups")));
                }
                let groups = groups
                    .into_iter()
                    .map(|g| if g == ANY_GROUP { Ok(g.to_owned()) } else { checked(NameKind::Group, "group", g) })
                    .collect::<Result<_, _>>()?;
                Ok(Identity::Client { name: checked(NameKind::Holder, "client", name)?, groups })
            }
            ["reader", name] => Ok(Identity::Reader { name: checked(NameKind::Holder, "reader", name)? }),
            ["admin", name] => Ok(Identity::Admin { name: checked(NameKind::Holder, "admin", name)? }),
            _ => Err(malformed(
                "identity URI is not one of quorate://node/N, quorate://member/G/M, quorate://client/NAME/GROUPS, \
                 quorate://reader/NAME, quorate://admin/NAME",
            )),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node { id } => write!(f, "node {id}"),
            Identity::Member { group, member } => write!(f, "member {member} of group {group}"),
            Identity::Client { name, .. } => write!(f, "client {name}"),
            Identity::Reader { name } => write!(f, "reader {name}"),
            Identity::Admin { name } => write!(f, "admin {name}"),
        }
    }
}

/// What a caller asks to do, with the names the rules compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Any Raft RPC (vote, append, snapshot).
    Raft,
    /// Report a view as `observer` of `group`.
    Report {
        /// The group the view is of.
        group: &'a str,
        /// The observer the report names.
        observer: &'a str,
    },
    /// Acquire, renew or release `group`'s lease as `holder`.
    Lease {
        /// The group.
        group: &'a str,
        /// The holder the call names.
        holder: &'a str,
    },
    /// Any read: leases, watch, groups, matrix, explain, status, election.
    Read,
    /// Create or change a group.
    ApplyGroup,
    /// Switch over, cancel one, set maintenance, lift a failover block.
    Steer,
    /// Ask what a failover would do.
    WhatIf,
    /// Delete a group (its lease, views and history with it).
    DeleteGroup,
    /// Take a snapshot of the whole replicated state (a backup).
    Backup,
    /// Add a coordinator node to the cluster, or remove one.
    ChangeMembership,
}

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Raft => f.write_str("send Raft messages"),
            Action::Report { group, observer } => write!(f, "report as observer {observer} of group {group}"),
            Action::Lease { group, holder } => write!(f, "hold group {group}'s lease as {holder}"),
            Action::Read => f.write_str("read"),
            Action::ApplyGroup => f.write_str("create or change groups"),
            Action::Steer => f.write_str("switch over, set maintenance or lift a failover block"),
            Action::WhatIf => f.write_str("ask what-if"),
            Action::DeleteGroup => f.write_str("delete groups"),
            Action::Backup => f.write_str("save snapshots of the cluster's state"),
            Action::ChangeMembership => f.write_str("add or remove coordinator nodes"),
        }
    }
}

/// A refusal: the identity, what it may not do, and who may.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{identity} may not {action}: {why}")]
pub struct Denied {
    /// The caller, as displayed.
    pub identity: String,
    /// The action, as displayed.
    pub action: String,
    /// The rule that refuses it.
    pub why: String,
}

/// Between a client identity's name and an instance in a holder name: a
/// service whose instances share one certificate `svc` holds as `svc@a`,
/// `svc@b`, so that two instances never share a holder name (a renewal by
/// the same holder name cannot tell them apart).
pub const INSTANCE_SEPARATOR: char = '@';

/// Whether a client named `name` may hold a lease as `holder`: its name, or
/// its name, `@` and any instance.
pub fn client_may_hold_as(name: &str, holder: &str) -> bool {
    holder == name
        || holder
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(INSTANCE_SEPARATOR))
            .is_some_and(|i| !i.is_empty())
}

/// The one permission check: may `who` do `what`?
pub fn check(who: &Identity, what: Action<'_>) -> Result<(), Denied> {
    let deny = |why: &str| Err(Denied { identity: who.to_string(), action: what.to_string(), why: why.to_owned() });
    match (who, what) {
        (_, Action::Read) => Ok(()),
        (Identity::Node { .. }, Action::Raft) => Ok(()),
        (_, Action::Raft) => deny("only node certificates reach the Raft service"),
        (Identity::Node { id }, Action::Report { observer, .. }) => {
            if observer == format!("{}{id}", names::COORDINATOR_PREFIX) {
                Ok(())
            } else {
                deny(&format!("node {id} reports only as {}{id}", names::COORDINATOR_PREFIX))
            }
        }
        (Identity::Member { group, member }, Action::Report { group: g, observer }) => {
            if g == group && observer == member {
                Ok(())
            } else {
                deny(&format!("it reports only as observer {member} of group {group}"))
            }
        }
        (_, Action::Report { .. }) => deny("only members and nodes report"),
        (Identity::Member { group, member }, Action::Lease { group: g, holder }) => {
            if g == group && holder == member {
                Ok(())
            } else {
                deny(&format!("it holds only group {group}'s lease, as {member}"))
            }
        }
        (Identity::Client { name, groups }, Action::Lease { group: g, holder }) => {
            if !client_may_hold_as(name, holder) {
                deny(&format!("it holds leases only as {name} or {name}{INSTANCE_SEPARATOR}INSTANCE"))
            } else if groups.iter().any(|x| x == ANY_GROUP || x == g) {
                Ok(())
            } else {
                deny(&format!("its certificate allows only groups {}", groups.join(", ")))
            }
        }
        (_, Action::Lease { .. }) => deny("only members and clients hold leases"),
        (
            Identity::Admin { .. },
            Action::ApplyGroup
            | Action::Steer
            | Action::WhatIf
            | Action::DeleteGroup
            | Action::Backup
            | Action::ChangeMembership,
        ) => Ok(()),
        (
            _,
            Action::ApplyGroup
            | Action::Steer
            | Action::WhatIf
            | Action::DeleteGroup
            | Action::Backup
            | Action::ChangeMembership,
        ) => deny("admin only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(g: &str, m: &str) -> Identity {
        Identity::Member { group: g.into(), member: m.into() }
    }

    #[test]
    fn uris_round_trip_and_bad_ones_are_named() {
        for id in [
            Identity::Node { id: 3 },
            member("pair", "db-1"),
            Identity::Client { name: "svc-a".into(), groups: vec!["g1".into(), "g2".into()] },
            Identity::Client { name: "svc-b".into(), groups: vec![ANY_GROUP.into()] },
            Identity::Reader { name: "grafana".into() },
            Identity::Admin { name: "ops".into() },
        ] {
            assert_eq!(Identity::parse_uri(&id.uri()), Ok(id.clone()), "{}", id.uri());
        }
        for bad in [
            "https://node/1",
            "quorate://node/one",
            "quorate://member/pair",
            "quorate://member/pair/db 1",
            "quorate://member/pair/db-1/x",
            "quorate://root/x",
            "quorate://client/a/g,b/c",
        ] {
            assert!(Identity::parse_uri(bad).is_err(), "{bad} accepted");
        }
        let long = format!("quorate://admin/{}", "a".repeat(MAX_URI_LEN));
        assert!(Identity::parse_uri(&long).unwrap_err().to_string().contains("the limit is 1024"));
    }

    #[test]
    fn members_report_and_hold_only_as_themselves() {
        let m = member("pair", "db-1");
        assert!(check(&m, Action::Report { group: "pair", observer: "db-1" }).is_ok());
        assert!(check(&m, Action::Report { group: "pair", observer: "db-2" }).is_err());
        assert!(check(&m, Action::Report { group: "pair", observer: "coordinator-1" }).is_err());
        assert!(check(&m, Action::Report { group: "other", observer: "db-1" }).is_err());
        assert!(check(&m, Action::Lease { group: "pair", holder: "db-1" }).is_ok());
        assert!(check(&m, Action::Lease { group: "pair", holder: "db-2" }).is_err());
        for a in [
            Action::Raft,
            Action::ApplyGroup,
            Action::Steer,
            Action::WhatIf,
            Action::DeleteGroup,
            Action::Backup,
            Action::ChangeMembership,
        ] {
            assert!(check(&m, a).is_err(), "{a}");
        }
        let e = check(&m, Action::Steer).unwrap_err().to_string();
        assert_eq!(
            e,
            "member db-1 of group pair may not switch over, set maintenance or lift a failover block: admin only"
        );
    }

    #[test]
    fn nodes_clients_readers_and_admins() {
        let n = Identity::Node { id: 2 };
        assert!(check(&n, Action::Raft).is_ok());
        assert!(check(&n, Action::Report { group: "g", observer: "coordinator-2" }).is_ok());
        assert!(check(&n, Action::Report { group: "g", observer: "coordinator-1" }).is_err());
        assert!(check(&n, Action::Lease { group: "g", holder: "x" }).is_err());
        let c = Identity::Client { name: "svc".into(), groups: vec!["g".into()] };
        assert!(check(&c, Action::Lease { group: "g", holder: "svc" }).is_ok());
        assert!(check(&c, Action::Lease { group: "h", holder: "svc" }).is_err());
        assert!(check(&c, Action::Lease { group: "g", holder: "other" }).is_err());
        assert!(check(&c, Action::Lease { group: "g", holder: "svc@pod-1" }).is_ok(), "an instance of svc");
        for not_svc in ["svc@", "svcx", "svcx@pod-1", "sv@c", "other@svc"] {
            assert!(check(&c, Action::Lease { group: "g", holder: not_svc }).is_err(), "{not_svc}");
        }
        assert!(check(&c, Action::Raft).is_err());
        let any = Identity::Client { name: "svc".into(), groups: vec![ANY_GROUP.into()] };
        assert!(check(&any, Action::Lease { group: "h", holder: "svc" }).is_ok());
        let r = Identity::Reader { name: "r".into() };
        assert!(check(&r, Action::Read).is_ok());
        for a in [
            Action::Raft,
            Action::Lease { group: "g", holder: "r" },
            Action::ApplyGroup,
            Action::Steer,
            Action::DeleteGroup,
            Action::Backup,
        ] {
            assert!(check(&r, a).is_err(), "{a}");
        }
        assert_eq!(
            check(&r, Action::Backup).unwrap_err().to_string(),
            "reader r may not save snapshots of the cluster's state: admin only"
        );
        assert!(check(&c, Action::DeleteGroup).is_err(), "a client deletes no group");
        let a = Identity::Admin { name: "ops".into() };
        for act in [
            Action::Read,
            Action::ApplyGroup,
            Action::Steer,
            Action::WhatIf,
            Action::DeleteGroup,
            Action::Backup,
            Action::ChangeMembership,
        ] {
            assert!(check(&a, act).is_ok(), "{act}");
        }
        // Not even a node may change the membership: only an operator.
        let e = check(&n, Action::ChangeMembership).unwrap_err().to_string();
        assert_eq!(e, "node 2 may not add or remove coordinator nodes: admin only");
        assert!(check(&a, Action::Raft).is_err());
        assert!(check(&a, Action::Lease { group: "g", holder: "ops" }).is_err());
    }
}

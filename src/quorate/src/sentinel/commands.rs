//! The command layer: one Sentinel command in, its replies out, answered
//! from the service layer ([`Node::discovery`] and friends) only: which
//! member is the master, its flags and epoch are decided there; this file
//! lays them out as Redis Sentinel does.

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::broadcast;

use super::resp::{Args, Reply, glob_match};
use crate::service::Node;
use crate::service::discovery::{DownFlags, MemberAddr, Primary};
use crate::tls::caller::Caller;

/// The Redis version this endpoint reports (clients pick commands by it:
/// at least 5.0 for `SENTINEL replicas`).
pub const REDIS_VERSION: &str = "7.0.0";

/// One published message: channel and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub channel: String,
    pub payload: String,
}

/// What every connection of one endpoint shares.
#[derive(Debug)]
pub struct Shared {
    pub node: Node,
    /// Who the endpoint reads as: a reader (it never changes anything).
    pub caller: Caller,
    /// The password clients must give (`AUTH`), if any.
    pub password: Option<Password>,
    /// The published events.
    pub events: broadcast::Sender<Message>,
}

impl Shared {
    /// Every coordinator's Sentinel address, this node's included: the
    /// nodes of the membership now (nodes come and go), each at its
    /// configured Sentinel address or, for a node added since this one
    /// started, its host with this node's Sentinel port.
    pub fn sentinels(&self) -> BTreeMap<u64, String> {
        let members = self.node.reader.node_addrs();
        self.node.config.sentinel_peers_of(&members)
    }
}

/// A password, never shown.
#[derive(Clone)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// One connection's state.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub authed: bool,
    pub name: Option<Vec<u8>>,
    pub channels: BTreeSet<Vec<u8>>,
    pub patterns: BTreeSet<Vec<u8>>,
    /// `QUIT` was sent: close after the reply.
    pub quit: bool,
    /// The protocol replies are encoded in: 2, or 3 after `HELLO 3`.
    pub proto: u8,
}

impl Session {
    pub fn new(id: u64, needs_auth: bool) -> Self {
        Self {
            id,
            authed: !needs_auth,
            name: None,
            channels: BTreeSet::new(),
            patterns: BTreeSet::new(),
            quit: false,
            proto: 2,
        }
    }

    fn subscriptions(&self) -> i64 {
        (self.channels.len() + self.patterns.len()) as i64
    }

    /// Whether the connection is in Pub/Sub mode.
    pub fn subscribed(&self) -> bool {
        self.subscriptions() > 0
    }

    /// The replies a published message gives this connection.
    pub fn deliver(&self, m: &Message) -> Vec<Reply> {
        let mut out = Vec::new();
        if self.channels.contains(m.channel.as_bytes()) {
            out.push(Reply::Push(vec![Reply::bulk("message"), Reply::bulk(&m.channel), Reply::bulk(&m.payload)]));
        }
        for p in self.patterns.iter().filter(|p| glob_match(p, m.channel.as_bytes())) {
            out.push(Reply::Push(vec![
                Reply::bulk("pmessage"),
                Reply::Bulk(p.clone()),
                Reply::bulk(&m.channel),
                Reply::bulk(&m.payload),
            ]));
        }
        out
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// At most 128 characters of an argument, for an error message.
fn shown(b: &[u8]) -> String {
    let s = text(b);
    match s.char_indices().nth(128) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

fn arity(name: &str) -> Reply {
    Reply::error(format!("ERR wrong number of arguments for '{name}' command"))
}

fn no_such_master() -> Reply {
    Reply::error("ERR No such master with that name")
}

/// The name of a coordinator as a Sentinel run id: 40 hex digits.
pub fn run_id(node_id: u64) -> String {
    format!("{node_id:040x}")
}

/// Runs one command.
pub fn run(shared: &Shared, s: &mut Session, args: &Args) -> Vec<Reply> {
    let Some(first) = args.first() else { return Vec::new() };
    let name = text(first).to_ascii_lowercase();
    if !s.authed && !matches!(name.as_str(), "auth" | "hello" | "quit") {
        return vec![Reply::error("NOAUTH Authentication required.")];
    }
    let pubsub = matches!(name.as_str(), "subscribe" | "psubscribe" | "unsubscribe" | "punsubscribe");
    // RESP3 mixes replies and pushes on one connection; RESP2 cannot.
    if s.proto == 2 && s.subscribed() && !pubsub && !matches!(name.as_str(), "ping" | "quit" | "reset") {
        return vec![Reply::error(format!(
            "ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
        ))];
    }
    let rest = &args[1..];
    let one = match name.as_str() {
        "ping" => ping(s, rest),
        "auth" => auth(shared, s, rest),
        "hello" => hello(shared, s, rest),
        "client" => client(s, rest),
        "select" => match rest {
            [db] if db.as_slice() == b"0" => Reply::ok(),
            [_] => Reply::error("ERR DB index is out of range"),
            _ => arity("select"),
        },
        "quit" => {
            s.quit = true;
            Reply::ok()
        }
        "reset" => {
            s.channels.clear();
            s.patterns.clear();
            s.name = None;
            s.proto = 2;
            Reply::Simple("RESET".into())
        }
        "command" => Reply::Array(Vec::new()),
        "info" => info(shared, rest),
        "role" => role(shared),
        "sentinel" => sentinel(shared, rest),
        "subscribe" | "psubscribe" => return subscribe(s, &name, rest),
        "unsubscribe" | "punsubscribe" => return unsubscribe(s, &name, rest),
        "publish" => Reply::error("ERR PUBLISH is not allowed on a Sentinel (only quorate publishes its events)"),
        _ => {
            let args: Vec<String> = rest.iter().take(4).map(|a| format!("'{}'", shown(a))).collect();
            Reply::error(format!(
                "ERR unknown command '{}', with args beginning with: {}",
                shown(first),
                args.join(" ")
            ))
        }
    };
    vec![one]
}

fn ping(s: &Session, rest: &[Vec<u8>]) -> Reply {
    match (s.subscribed() && s.proto == 2, rest) {
        (true, []) => Reply::Array(vec![Reply::bulk("pong"), Reply::bulk("")]),
        (true, [msg]) => Reply::Array(vec![Reply::bulk("pong"), Reply::Bulk(msg.clone())]),
        (false, []) => Reply::Simple("PONG".into()),
        (false, [msg]) => Reply::Bulk(msg.clone()),
        _ => arity("ping"),
    }
}

/// Checks `AUTH [user] pass` (requirepass-style: the user is `default`).
fn check_password(shared: &Shared, user: Option<&[u8]>, pass: &[u8]) -> Result<(), Reply> {
    let Some(want) = &shared.password else {
        return Err(Reply::error(
            "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        ));
    };
    if user.is_none_or(|u| u == b"default") && pass == want.0.as_bytes() {
        Ok(())
    } else {
        Err(Reply::error("WRONGPASS invalid username-password pair or user is disabled."))
    }
}

fn auth(shared: &Shared, s: &mut Session, rest: &[Vec<u8>]) -> Reply {
    let res = match rest {
        [pass] => check_password(shared, None, pass),
        [user, pass] => check_password(shared, Some(user), pass),
        _ => return arity("auth"),
    };
    match res {
        Ok(()) => {
            s.authed = true;
            Reply::ok()
        }
        Err(e) => e,
    }
}

/// `HELLO [2|3 [AUTH user pass] [SETNAME name]]`: RESP2 or RESP3 (redis-py
/// 8 sends `HELLO 3` and does not fall back); any other version is refused
/// with `NOPROTO`, on which clients fall back.
fn hello(shared: &Shared, s: &mut Session, rest: &[Vec<u8>]) -> Reply {
    let mut proto = s.proto;
    if let Some(v) = rest.first() {
        match text(v).parse::<i64>() {
            Ok(v @ (2 | 3)) => proto = v as u8,
            Ok(_) => return Reply::error("NOPROTO sorry, this protocol version is not supported"),
            Err(_) => return Reply::error("ERR Protocol version is not an integer or out of range"),
        }
    }
    let mut opts = rest.iter().skip(1);
    let mut name = None;
    while let Some(opt) = opts.next() {
        match text(opt).to_ascii_lowercase().as_str() {
            "auth" => {
                let (Some(user), Some(pass)) = (opts.next(), opts.next()) else {
                    return Reply::error("ERR Syntax error in HELLO option 'auth'");
                };
                if let Err(e) = check_password(shared, Some(user), pass) {
                    return e;
                }
                s.authed = true;
            }
            "setname" => match opts.next() {
                Some(n) => name = Some(n.clone()),
                None => return Reply::error("ERR Syntax error in HELLO option 'setname'"),
            },
            other => return Reply::error(format!("ERR Syntax error in HELLO option '{}'", shown(other.as_bytes()))),
        }
    }
    if !s.authed {
        return Reply::error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
        );
    }
    if name.is_some() {
        s.name = name;
    }
    s.proto = proto;
    Reply::Map(vec![
        (Reply::bulk("server"), Reply::bulk("redis")),
        (Reply::bulk("version"), Reply::bulk(REDIS_VERSION)),
        (Reply::bulk("proto"), Reply::Int(i64::from(proto))),
        (Reply::bulk("id"), Reply::Int(s.id as i64)),
        (Reply::bulk("mode"), Reply::bulk("sentinel")),
        (Reply::bulk("role"), Reply::bulk("sentinel")),
        (Reply::bulk("modules"), Reply::Array(Vec::new())),
    ])
}

fn client(s: &mut Session, rest: &[Vec<u8>]) -> Reply {
    let Some(sub) = rest.first() else { return arity("client") };
    match (text(sub).to_ascii_lowercase().as_str(), &rest[1..]) {
        ("setname", [n]) => {
            s.name = (!n.is_empty()).then(|| n.clone());
            Reply::ok()
        }
        ("setinfo", [_, _]) => Reply::ok(),
        ("getname", []) => s.name.clone().map_or(Reply::Nil, Reply::Bulk),
        ("id", []) => Reply::Int(s.id as i64),
        ("setname" | "setinfo" | "getname" | "id", _) => arity(&format!("client|{}", text(sub).to_ascii_lowercase())),
        (other, _) => Reply::error(format!("ERR unknown subcommand '{}'. Try CLIENT HELP.", shown(other.as_bytes()))),
    }
}

fn subscribe(s: &mut Session, name: &str, rest: &[Vec<u8>]) -> Vec<Reply> {
    if rest.is_empty() {
        return vec![arity(name)];
    }
    let pattern = name == "psubscribe";
    rest.iter()
        .map(|ch| {
            if pattern {
                s.patterns.insert(ch.clone());
            } else {
                s.channels.insert(ch.clone());
            }
            Reply::Push(vec![Reply::bulk(name), Reply::Bulk(ch.clone()), Reply::Int(s.subscriptions())])
        })
        .collect()
}

fn unsubscribe(s: &mut Session, name: &str, rest: &[Vec<u8>]) -> Vec<Reply> {
    let pattern = name == "punsubscribe";
    let which: Vec<Vec<u8>> = match (rest.is_empty(), pattern) {
        (true, false) => s.channels.iter().cloned().collect(),
        (true, true) => s.patterns.iter().cloned().collect(),
        (false, _) => rest.to_vec(),
    };
    if which.is_empty() {
        return vec![Reply::Push(vec![Reply::bulk(name), Reply::Nil, Reply::Int(s.subscriptions())])];
    }
    which
        .into_iter()
        .map(|ch| {
            if pattern {
                s.patterns.remove(&ch);
            } else {
                s.channels.remove(&ch);
            }
            Reply::Push(vec![Reply::bulk(name), Reply::Bulk(ch), Reply::Int(s.subscriptions())])
        })
        .collect()
}

fn role(shared: &Shared) -> Reply {
    let names = shared.node.managed_group_names(&shared.caller).unwrap_or_default();
    Reply::Array(vec![Reply::bulk("sentinel"), Reply::Array(names.into_iter().map(Reply::bulk).collect())])
}

fn flags(kind: &str, f: DownFlags) -> String {
    let mut out = kind.to_owned();
    if f.s_down {
        out.push_str(",s_down");
    }
    if f.o_down {
        out.push_str(",o_down");
    }
    out
}

fn info(shared: &Shared, rest: &[Vec<u8>]) -> Reply {
    let section = rest.first().map(|s| text(s).to_ascii_lowercase());
    let all = section.as_deref().is_none_or(|s| matches!(s, "all" | "default" | "everything"));
    let want = |name: &str| all || section.as_deref() == Some(name);
    let mut out = String::new();
    if want("server") {
        out.push_str(&format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:sentinel\r\nrun_id:{}\r\nquorate_version:{}\r\nquorate_node_id:{}\r\n\r\n",
            run_id(shared.node.id),
            crate::VERSION,
            shared.node.id
        ));
    }
    if want("clients") {
        out.push_str("# Clients\r\n\r\n");
    }
    if want("sentinel") {
        let masters = shared.node.discovery(&shared.caller).unwrap_or_default();
        out.push_str(&format!(
            "# Sentinel\r\nsentinel_masters:{}\r\nsentinel_tilt:0\r\nsentinel_running_scripts:0\r\nsentinel_scripts_queue_length:0\r\nsentinel_simulate_failure_flags:0\r\n",
            masters.len()
        ));
        for (i, p) in masters.iter().enumerate() {
            let (status, address) = match &p.primary {
                Some(m) if m.flags.o_down => ("odown", format!("{}:{}", m.host, m.port)),
                Some(m) if m.flags.s_down => ("sdown", format!("{}:{}", m.host, m.port)),
                Some(m) => ("ok", format!("{}:{}", m.host, m.port)),
                None => ("odown", String::new()),
            };
            out.push_str(&format!(
                "master{i}:name={},status={status},address={address},slaves={},sentinels={}\r\n",
                p.group,
                p.replicas.len(),
                shared.sentinels().len().max(1)
            ));
        }
    }
    Reply::Bulk(out.into_bytes())
}

/// The managed group `name` as discovery answers it; Err: the reply.
fn find(shared: &Shared, name: &[u8]) -> Result<Primary, Reply> {
    let masters = shared
        .node
        .discovery(&shared.caller)
        .map_err(|e| Reply::error(format!("NOTREADY this coordinator cannot answer from committed state: {e}")))?;
    masters.into_iter().find(|p| p.group.as_bytes() == name).ok_or_else(no_such_master)
}

fn master_fields(shared: &Shared, p: &Primary, m: &MemberAddr) -> Reply {
    let others = shared.sentinels().len().saturating_sub(1);
    Reply::fields([
        ("name", p.group.clone()),
        ("ip", m.host.clone()),
        ("port", m.port.to_string()),
        ("runid", String::new()),
        ("flags", flags("master", m.flags)),
        ("link-pending-commands", "0".into()),
        ("link-refcount", "1".into()),
        ("last-ping-sent", "0".into()),
        ("last-ok-ping-reply", "0".into()),
        ("last-ping-reply", "0".into()),
        ("down-after-milliseconds", p.down_after_ms.to_string()),
        ("info-refresh", "0".into()),
        ("role-reported", "master".into()),
        ("role-reported-time", "0".into()),
        ("config-epoch", p.epoch.to_string()),
        ("num-slaves", p.replicas.len().to_string()),
        ("num-other-sentinels", others.to_string()),
        ("quorum", p.quorum.to_string()),
        ("failover-timeout", p.lease_ttl_ms.to_string()),
        ("parallel-syncs", "1".into()),
        ("quorate-member", m.member.clone()),
        ("quorate-holder", p.holder.clone().unwrap_or_default()),
    ])
}

fn replica_fields(p: &Primary, r: &MemberAddr) -> Reply {
    let (master_host, master_port) = p.primary.as_ref().map_or((String::new(), 0), |m| (m.host.clone(), m.port));
    Reply::fields([
        ("name", format!("{}:{}", r.host, r.port)),
        ("ip", r.host.clone()),
        ("port", r.port.to_string()),
        ("runid", String::new()),
        ("flags", flags("slave", r.flags)),
        ("link-pending-commands", "0".into()),
        ("link-refcount", "1".into()),
        ("last-ping-sent", "0".into()),
        ("last-ok-ping-reply", "0".into()),
        ("last-ping-reply", "0".into()),
        ("down-after-milliseconds", p.down_after_ms.to_string()),
        ("info-refresh", "0".into()),
        ("role-reported", "slave".into()),
        ("role-reported-time", "0".into()),
        ("master-link-down-time", "0".into()),
        ("master-link-status", if r.link_up { "ok" } else { "err" }.into()),
        ("master-host", master_host),
        ("master-port", master_port.to_string()),
        ("slave-priority", r.priority.to_string()),
        ("slave-repl-offset", r.offset.to_string()),
        ("replica-announced", "1".into()),
        ("quorate-member", r.member.clone()),
    ])
}

fn sentinel_fields(p: &Primary, id: u64, addr: &str) -> Reply {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
    Reply::fields([
        ("name", run_id(id)),
        ("ip", host.to_owned()),
        ("port", port.to_owned()),
        ("runid", run_id(id)),
        ("flags", "sentinel".to_owned()),
        ("link-pending-commands", "0".into()),
        ("link-refcount", "1".into()),
        ("last-ping-sent", "0".into()),
        ("last-ok-ping-reply", "0".into()),
        ("last-ping-reply", "0".into()),
        ("down-after-milliseconds", p.down_after_ms.to_string()),
        ("last-hello-message", "0".into()),
        ("voted-leader", "?".into()),
        ("voted-leader-epoch", "0".into()),
    ])
}

fn sentinel(shared: &Shared, rest: &[Vec<u8>]) -> Reply {
    let Some(sub) = rest.first() else { return arity("sentinel") };
    let sub = text(sub).to_ascii_lowercase();
    let args = &rest[1..];
    let with_group = |f: &dyn Fn(Primary) -> Reply| match args {
        [g] => find(shared, g).map_or_else(|e| e, f),
        _ => arity(&format!("sentinel|{sub}")),
    };
    match sub.as_str() {
        "get-master-addr-by-name" => match args {
            // Unknown, or not answerable here: null, and clients ask
            // another Sentinel.
            [g] => match find(shared, g).ok().and_then(|p| p.primary) {
                Some(m) => Reply::Array(vec![Reply::bulk(m.host), Reply::bulk(m.port.to_string())]),
                None => Reply::NilArray,
            },
            _ => arity("sentinel|get-master-addr-by-name"),
        },
        // A coordinator that cannot answer lists nothing: clients (redis-py)
        // then ask the next Sentinel.
        "masters" => Reply::Array(
            shared
                .node
                .discovery(&shared.caller)
                .unwrap_or_default()
                .iter()
                .filter_map(|p| p.primary.as_ref().map(|m| master_fields(shared, p, m)))
                .collect(),
        ),
        "master" => with_group(&|p| match &p.primary {
            Some(m) => master_fields(shared, &p, m),
            None => no_such_master(),
        }),
        "replicas" | "slaves" => {
            with_group(&|p| Reply::Array(p.replicas.iter().map(|r| replica_fields(&p, r)).collect()))
        }
        "sentinels" => with_group(&|p| {
            Reply::Array(
                shared
                    .sentinels()
                    .iter()
                    .filter(|(id, _)| **id != shared.node.id)
                    .map(|(id, addr)| sentinel_fields(&p, *id, addr))
                    .collect(),
            )
        }),
        "ckquorum" => with_group(&|_| match shared.node.quorum_check(&shared.caller) {
            Ok(q) if q.usable >= q.needed => Reply::Simple(format!(
                "OK {} usable Sentinels. Quorum and failover authorization can be reached",
                q.usable
            )),
            Ok(q) => Reply::error(format!(
                "NOQUORUM {} usable Sentinels. Not enough available Sentinels to reach the specified quorum for this master",
                q.usable
            )),
            Err(e) => Reply::error(format!("ERR {e}")),
        }),
        "myid" => Reply::bulk(run_id(shared.node.id)),
        _ => Reply::error(format!("ERR Unknown sentinel subcommand '{}'", shown(sub.as_bytes()))),
    }
}

/// The message a discovery event publishes, as Redis Sentinel words it.
pub fn message_of(ev: &crate::service::discovery::DiscoveryEvent) -> Message {
    use crate::service::discovery::DiscoveryEvent;
    match ev {
        DiscoveryEvent::SwitchMaster { group, from, to } => Message {
            channel: "+switch-master".into(),
            payload: format!("{group} {} {} {} {}", from.0, from.1, to.0, to.1),
        },
        DiscoveryEvent::Down { group, addr, objective, on, votes, quorum } => {
            let sign = if *on { '+' } else { '-' };
            let kind = if *objective { "odown" } else { "sdown" };
            let quorum = if *objective && *on { format!(" #quorum {votes}/{quorum}") } else { String::new() };
            Message {
                channel: format!("{sign}{kind}"),
                payload: format!("master {group} {} {}{quorum}", addr.0, addr.1),
            }
        }
    }
}

//! The `quorate` command line: argument definitions and output. No logic of
//! its own: each subcommand calls the server, client, launcher or bench
//! module and prints what comes back, for people or (`--json`) as one JSON
//! object per line.

mod bench;
mod cluster;
mod election;
mod groups;
pub use crate::render::render_matrix;
mod lease;
mod lifecycle;
mod status;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::client::Client;
use crate::config::{AgentConfig, DriverKind, ServerConfig};
use crate::pb::v1 as pb;
use crate::tls::config::Tls;
use crate::tls::transport::Transport;

/// The endpoints of `quorate local up` with its default ports.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";

/// quorate: a quorum-based failover coordinator.
#[derive(Debug, Parser)]
#[command(name = "quorate", version, about, long_about = None)]
pub struct Cli {
    /// Where the cluster is and how to reach it.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// How a command reaches the cluster: its endpoints and, for mutual TLS,
/// the CA, certificate and key.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Coordinator endpoints, HOST:PORT separated by commas.
    #[arg(
        long,
        global = true,
        env = "QUORATE_ENDPOINTS",
        default_value = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
    )]
    pub endpoints: String,
    /// The cluster CA's certificate (PEM). With --cert and --key, every
    /// call to the cluster is mutual TLS.
    #[arg(long, global = true, env = "QUORATE_CA")]
    pub ca: Option<PathBuf>,
    /// This caller's certificate (`quorate certs issue`).
    #[arg(long, global = true, env = "QUORATE_CERT")]
    pub cert: Option<PathBuf>,
    /// This caller's private key.
    #[arg(long, global = true, env = "QUORATE_KEY")]
    pub key: Option<PathBuf>,
    /// Plain text instead of mutual TLS, for a cluster that serves plain
    /// text (`quorate server --insecure`): anyone who can reach it can then
    /// do anything. With `server`, `agent`, `local up` and `demo` too.
    #[arg(long, global = true, env = "QUORATE_INSECURE")]
    pub insecure: bool,
}

/// The CLI's names for its TLS settings, for its errors.
const CLI_TLS_FLAGS: crate::config::TlsNames =
    crate::config::TlsNames { ca: "--ca", cert: "--cert", key: "--key", insecure: "--insecure", flags: "" };

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a coordinator node (Raft + gRPC API).
    Server(Box<ServerArgs>),
    /// Show the cluster: leader, term, every node's role and reachability.
    Status,
    /// The coordinators' membership: show it, add a node, remove one.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Read, take, hold and give up leases.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Stream every change of a group's lease until interrupted.
    Watch {
        /// The group to watch.
        group: String,
    },
    /// Create, change and read failover groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Show who sees whom in a group, and every member's verdict.
    Matrix {
        group: String,
        #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
        consistency: ConsistencyArg,
    },
    /// Explain one member's verdict: a sentence and the evidence under it.
    Explain { group: String, member: String },
    /// Run beside a member: publish its heartbeat, observe its peers, report,
    /// and (in a managed group) drive its role.
    Agent(AgentArgs),
    /// The primary changes of a managed group, with their reasons.
    History { group: String },
    /// A planned switchover: no acknowledged write lost.
    Switchover {
        group: String,
        /// The new primary (default: the best candidate).
        #[arg(long)]
        to: Option<String>,
        /// How long to wait for it to complete.
        #[arg(long, default_value_t = 30)]
        wait_s: u64,
    },
    /// Maintenance on or off: no automatic failover while on.
    Maintenance {
        group: String,
        #[arg(value_enum)]
        state: OnOff,
    },
    /// Who would be promoted now if these members were down, and why.
    Whatif {
        group: String,
        /// A member to treat as down (repeatable).
        #[arg(long, required = true)]
        down: Vec<String>,
    },
    /// Election status and operator actions of a managed group.
    #[command(subcommand)]
    Failover(FailoverCommand),
    /// Start or stop a local cluster of background processes.
    #[command(subcommand)]
    Local(LocalCommand),
    /// A cluster CA and the certificates it issues (see README: security).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The main job: a live local cluster doing real Redis failovers.
    Demo {
        /// Directory for data and logs.
        #[arg(long, default_value = ".quorate-demo")]
        dir: PathBuf,
        /// Ports: coordinators base..base+2, heartbeat stores base+100..,
        /// data Redis base+200..
        #[arg(long, default_value_t = 7101)]
        base_port: u16,
        /// Leave the cluster running afterwards.
        #[arg(long)]
        keep_running: bool,
    },
    /// Measure throughput and latency against a running cluster.
    Bench(BenchArgs),
    /// Backups of the cluster's state (restore with `quorate server --restore`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a consistent snapshot of the whole state, read on the leader, to
    /// FILE (written atomically; format version, length and SHA-256 in its
    /// header). Admin only.
    Save { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TOML file with any ServerConfig keys; flags override it. From the
    /// environment too, so that `quorate local up` passes one file to every
    /// node it starts.
    #[arg(long, env = "QUORATE_SERVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's Raft id (one of --peers).
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Address to bind, IP:PORT.
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory for the Raft log, vote and snapshots.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Every member: ID=HOST:PORT,ID=HOST:PORT,...
    #[arg(long)]
    pub peers: Option<String>,
    #[arg(long)]
    pub heartbeat_interval_ms: Option<u64>,
    #[arg(long)]
    pub election_timeout_min_ms: Option<u64>,
    #[arg(long)]
    pub election_timeout_max_ms: Option<u64>,
    #[arg(long)]
    pub min_lease_ttl_ms: Option<u64>,
    #[arg(long)]
    pub max_lease_ttl_ms: Option<u64>,
    #[arg(long)]
    pub max_clock_drift_ppm: Option<u64>,
    #[arg(long)]
    pub lease_margin_ms: Option<u64>,
    /// The most Watch streams this node serves at once.
    #[arg(long)]
    pub max_watch_streams: Option<u64>,
    /// The most Watch streams one client connection may hold open.
    #[arg(long)]
    pub max_watch_streams_per_connection: Option<u64>,
    /// The most reports a second per member identity (nodes are exempt).
    #[arg(long)]
    pub max_reports_per_s: Option<u64>,
    /// The cluster CA's certificate (PEM); with --tls-cert and --tls-key
    /// the node speaks mutual TLS only.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (`quorate certs issue --role node`).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// How this node reaches the heartbeat stores.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Plain-HTTP listener for /livez, /readyz, /leader and /metrics, IP:PORT.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Serve the Redis Sentinel-compatible discovery endpoint (RESP, plain
    /// text unless --sentinel-tls) on IP:PORT.
    #[arg(long)]
    pub sentinel_listen: Option<String>,
    /// Every node's Sentinel address, ID=HOST:PORT,... (default: each
    /// peer's host with this node's Sentinel port).
    #[arg(long)]
    pub sentinel_peers: Option<String>,
    /// A file holding the password Sentinel clients must AUTH with.
    #[arg(long)]
    pub sentinel_password_file: Option<PathBuf>,
    /// The most connections the Sentinel endpoint serves at once.
    #[arg(long)]
    pub sentinel_max_connections: Option<u64>,
    /// Serve the Sentinel endpoint over TLS only, with this node's
    /// certificate (clients use rediss:// and the cluster CA).
    #[arg(long)]
    pub sentinel_tls: bool,
    /// With --sentinel-tls: require a client certificate signed by the
    /// cluster CA (Redis's tls-auth-clients yes).
    #[arg(long)]
    pub sentinel_tls_client_auth: bool,
    /// Seed a new cluster from a backup (`quorate snapshot save`): only on
    /// the node with the lowest id, on an empty data directory, on its
    /// first start; the other nodes start empty.
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// How far a restore raises every epoch (default 1000000).
    #[arg(long)]
    pub restore_epoch_bump: Option<u64>,
    /// Print every config key with its default, as a commented TOML file, and exit.
    #[arg(long, conflicts_with = "check_config")]
    pub print_default_config: bool,
    /// Validate a config file (as --config would load it) and exit: 0 and
    /// one OK line, or non-zero naming the field at fault.
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,
    /// UNSAFE: grant leases without waiting for expiry. Only for the fault
    /// suite's negative control, which must detect the overlap.
    #[arg(long, hide = true)]
    pub test_only_skip_lease_wait: bool,
}

/// Credentials and TLS for every Redis connection of a server or agent
/// whose URL carries no credentials of its own (README: "Redis
/// credentials"). The password is read from a file or from
/// QUORATE_REDIS_PASSWORD, never from a flag.
#[derive(Debug, Clone, Default, Args)]
pub struct RedisArgs {
    /// The Redis ACL user to log in as (needs a password).
    #[arg(long)]
    pub redis_username: Option<String>,
    /// A file holding the Redis password (or set QUORATE_REDIS_PASSWORD; not both).
    #[arg(long)]
    pub redis_password_file: Option<PathBuf>,
    /// The Redis servers' CA (PEM); required for rediss:// URLs.
    #[arg(long)]
    pub redis_tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for Redis servers with tls-auth-clients.
    #[arg(long)]
    pub redis_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    pub redis_tls_key: Option<PathBuf>,
}

/// Sets each config field whose flag was given (`Some`): `flag` into the
/// field of the same name, or `flag => field.path` into another. The one
/// overlay of flags on a file that every process's arguments use (with
/// [`crate::config::load`]).
macro_rules! overlay {
    ($args:expr, $c:expr; $($flag:ident $(=> $($dst:ident).+)?),* $(,)?) => {
        $( overlay!(@one $args, $c, $flag $(=> $($dst).+)?); )*
    };
    (@one $args:expr, $c:expr, $flag:ident) => {
        if let Some(v) = &$args.$flag {
            $c.$flag = v.clone();
        }
    };
    (@one $args:expr, $c:expr, $flag:ident => $($dst:ident).+) => {
        if let Some(v) = &$args.$flag {
            $c.$($dst).+ = v.clone();
        }
    };
}

impl ServerArgs {
    /// Defaults, then the file, then flags. Not yet validated.
    /// `insecure` is the global `--insecure`.
    pub fn to_config(&self, insecure: bool) -> anyhow::Result<ServerConfig> {
        let c = crate::config::load(self.config.as_deref(), |c: &mut ServerConfig| {
            overlay!(self, c;
                node_id,
                listen,
                data_dir,
                peers,
                heartbeat_interval_ms,
                election_timeout_min_ms,
                election_timeout_max_ms,
                min_lease_ttl_ms,
                max_lease_ttl_ms,
                max_clock_drift_ppm,
                lease_margin_ms,
                max_watch_streams,
                max_watch_streams_per_connection,
                max_reports_per_s,
                tls_ca,
                tls_cert,
                tls_key,
                http_listen,
                sentinel_listen,
                sentinel_peers,
                sentinel_password_file,
                sentinel_max_connections,
                restore,
                restore_epoch_bump,
            );
            self.redis.overlay(c);
            // Switches: a flag turns one on, its absence leaves the file's.
            c.sentinel_tls |= self.sentinel_tls;
            c.sentinel_tls_client_auth |= self.sentinel_tls_client_auth;
            c.test_only_skip_lease_wait |= self.test_only_skip_lease_wait;
            c.insecure |= insecure;
        })?;
        if self.node_id.is_none() && self.config.is_none() {
            anyhow::bail!("node_id: missing: give --node-id N (one of the ids in --peers)");
        }
        Ok(c)
    }
}

impl RedisArgs {
    /// Sets the `redis_*` fields whose flags were given.
    fn overlay(&self, c: &mut ServerConfig) {
        overlay!(self, c; redis_username, redis_password_file, redis_tls_ca, redis_tls_cert, redis_tls_key);
    }

    /// The same for an agent.
    fn overlay_agent(&self, c: &mut AgentConfig) {
        overlay!(self, c; redis_username, redis_password_file, redis_tls_ca, redis_tls_cert, redis_tls_key);
    }
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Voters, learners, every node's address, role, last contact, and
    /// whether it is safe to take it down now (rolling restarts).
    Members,
    /// Add a coordinator (start it first, with --peers naming the running
    /// nodes and itself): a learner until it has caught up, then a voter.
    AddNode {
        /// Its node id: a new one, never one that was removed.
        #[arg(long)]
        id: u64,
        /// Its gRPC address, HOST:PORT, as the other nodes reach it.
        #[arg(long)]
        addr: String,
        /// How long to wait for it to catch up before promoting it.
        #[arg(long, default_value_t = 60)]
        wait_s: u64,
    },
    /// Remove a coordinator for good (refused if the rest could not form a
    /// quorum, or it is the only node up to date).
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum FailoverCommand {
    /// Designated primary, lease, maintenance, blocks, candidates, members.
    Status { group: String },
    /// Lift the min_failover_interval_ms block after a failover.
    Unblock { group: String },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA in DIR (ca.crt, ca.key); refuses to replace one.
    Init { dir: PathBuf },
    /// Issue DIR/NAME.crt and DIR/NAME.key, signed by the CA in DIR
    /// (re-issuing under the same name rotates them).
    Issue {
        dir: PathBuf,
        /// The identity's name; node-N for a node (N its Raft id).
        #[arg(long)]
        name: String,
        /// node, member, client, reader or admin.
        #[arg(long)]
        role: quorate_core::access::Role,
        /// A member's group; a client's groups (repeatable, '*' for all).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// A DNS name or IP the certificate serves as (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Days it is valid for.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create or change a group from a TOML file (see README: group spec).
    Apply { file: PathBuf },
    /// Delete a group: its spec, lease, views and history. Refused for a
    /// managed group whose primary holds a live lease, unless --force.
    Delete {
        name: String,
        /// Delete even with a live primary (its next renewal is refused and
        /// its agent fences).
        #[arg(long)]
        force: bool,
    },
    /// Show a group's spec.
    Get { name: String },
    /// List every group.
    List,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML file with `group`, `member`, `endpoints`; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The failover group.
    #[arg(long)]
    pub group: Option<String>,
    /// This member's id in the group.
    #[arg(long)]
    pub member: Option<String>,
    /// Role driver: auto (redis if the member has a data URL), redis, exec, none.
    #[arg(long)]
    pub driver: Option<DriverKind>,
    /// exec driver: command run on promotion (env: QUORATE_GROUP, QUORATE_MEMBER, QUORATE_EPOCH, QUORATE_ROLE).
    #[arg(long)]
    pub on_promote: Option<String>,
    /// exec driver: command run on demotion.
    #[arg(long)]
    pub on_demote: Option<String>,
    /// exec driver: command run to fence (stop acting as primary at once).
    #[arg(long)]
    pub on_fence: Option<String>,
    /// How the agent reaches its heartbeat stores and data service.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Plain-HTTP listener for /primary, /replica, /read-only, /health,
    /// /liveness, /readiness and /metrics, IP:PORT.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// UNSAFE, for the fault suite's negative control only: never fence the
    /// data service (at the lease deadline or on loss).
    #[arg(long, hide = true)]
    pub test_only_no_deadline_fence: bool,
}

impl AgentArgs {
    /// Defaults, then the file, then flags (the global `--endpoints` wins
    /// over the file only when given or set in the environment). Not yet
    /// validated.
    fn to_config(&self, cli: &ConnArgs) -> anyhow::Result<AgentConfig> {
        let endpoints = cli.endpoints.as_str();
        Ok(crate::config::load(self.config.as_deref(), |c: &mut AgentConfig| {
            overlay!(cli, c; ca => tls_ca, cert => tls_cert, key => tls_key);
            overlay!(self, c;
                group,
                member,
                driver,
                on_promote => hooks.promote,
                on_demote => hooks.demote,
                on_fence => hooks.fence,
                http_listen,
            );
            self.redis.overlay_agent(c);
            c.test_only_no_deadline_fence |= self.test_only_no_deadline_fence;
            c.insecure |= cli.insecure;
            if c.endpoints.is_empty()
                || std::env::var_os("QUORATE_ENDPOINTS").is_some()
                || endpoints != DEFAULT_ENDPOINTS
            {
                c.endpoints = endpoints.to_owned();
            }
        })?)
    }
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Show a group's lease.
    Get {
        group: String,
        #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
        consistency: ConsistencyArg,
    },
    /// Take a lease and hold it (renewing) until interrupted, printing each event.
    Acquire {
        group: String,
        /// Who holds it; unique per process.
        #[arg(long)]
        holder: String,
        /// Lease TTL in milliseconds.
        #[arg(long)]
        ttl_ms: u64,
        /// Wait for the lease when somebody else holds it.
        #[arg(long)]
        wait: bool,
    },
    /// Give a lease up.
    Release {
        group: String,
        #[arg(long)]
        holder: String,
        /// The epoch to release; default: the current epoch, if --holder holds it.
        #[arg(long)]
        epoch: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ConsistencyArg {
    /// The leader lease while a quorum acknowledged recently, else a quorum round.
    Linearizable,
    /// Always a quorum round (ReadIndex), whatever the clocks.
    ReadIndex,
    /// The leader lease or UNAVAILABLE.
    LeaseRead,
    /// Any node's local state.
    Stale,
}

impl ConsistencyArg {
    pub fn to_pb(self) -> pb::Consistency {
        match self {
            ConsistencyArg::Linearizable => pb::Consistency::Linearizable,
            ConsistencyArg::ReadIndex => pb::Consistency::ReadIndex,
            ConsistencyArg::LeaseRead => pb::Consistency::LeaseRead,
            ConsistencyArg::Stale => pb::Consistency::Stale,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Start a local cluster in DIR (or restart it on its old data).
    Up {
        /// Number of coordinator nodes (3 or 5 recommended).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Directory for data, logs and cluster.json.
        #[arg(long)]
        dir: PathBuf,
        /// Port of node 1; node N listens on base-port + N - 1 (its
        /// Sentinel-compatible endpoint on base-port + 500 + N - 1), and the
        /// heartbeat Redis of member K on base-port + 100 + K - 1. HTTP
        /// health and metrics: node N on base-port + 600 + N - 1, the agent
        /// of member K on base-port + 700 + K - 1.
        #[arg(long, default_value_t = 7101)]
        base_port: u16,
        /// Also create this failover group, with a heartbeat redis-server
        /// and an agent per member (members GROUP-1 .. GROUP-K).
        #[arg(long)]
        group: Option<String>,
        /// Number of members of --group.
        #[arg(long, default_value_t = 2, requires = "group")]
        members: u64,
        /// A managed Redis primary/replica pair named GROUP: members
        /// GROUP-1 (primary at start) and GROUP-2, each with a data
        /// redis-server (port base-port + 200 + K - 1), a heartbeat store
        /// and an agent.
        #[arg(long, conflicts_with = "group")]
        redis_pair: Option<String>,
        /// Seed the new cluster from a backup (`quorate snapshot save`):
        /// node 1 restores it, the others receive it by Raft. Only for a
        /// new DIR.
        #[arg(long)]
        restore: Option<PathBuf>,
    },
    /// Stop everything `local up` started in DIR (data is kept).
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Start the next node of the local cluster in DIR and add it (a
    /// learner, then a voter once caught up); updates cluster.json.
    AddNode {
        #[arg(long)]
        dir: PathBuf,
        /// How long to wait for it to catch up.
        #[arg(long, default_value_t = 60)]
        wait_s: u64,
    },
    /// Remove node ID from the local cluster in DIR for good, then stop it;
    /// updates cluster.json (its data directory is left in place).
    RemoveNode {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: u64,
    },
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub kind: crate::bench::BenchKind,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Read consistency for lease-get.
    #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
    pub consistency: ConsistencyArg,
    /// groups: number of groups to create.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// ingest: number of simulated members.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// ingest: members per group.
    #[arg(long, default_value_t = 2)]
    pub group_size: usize,
    /// ingest: seconds before measuring.
    #[arg(long, default_value_t = 5)]
    pub warmup_s: u64,
    /// ingest: an existing heartbeat Redis (default: start a redis-server).
    #[arg(long)]
    pub heartbeat_url: Option<String>,
    /// The system to drive: lease-get, acquire-renew, read-gap and leader
    /// also run against etcd (the anchor of the README's comparison).
    #[arg(long, value_enum, default_value_t = crate::bench::etcd::Target::Quorate)]
    pub target: crate::bench::etcd::Target,
    /// With --target etcd: etcd's client endpoints, HOST:PORT,... (plain text).
    #[arg(long, env = "ETCD_ENDPOINTS", default_value = "127.0.0.1:2379")]
    pub etcd_endpoints: String,
    /// read-gap: time between the starts of two reads, in ms.
    #[arg(long, default_value_t = 1)]
    pub interval_ms: u64,
    /// read-gap: the bound on one call, in ms (quorate's client default).
    #[arg(long, default_value_t = crate::client::DEFAULT_CALL_TIMEOUT.as_millis() as u64)]
    pub call_timeout_ms: u64,
    /// read-gap against quorate: the group whose lease is read.
    #[arg(long, default_value = "bench")]
    pub group: String,
    #[command(flatten)]
    pub probe: crate::bench::failover::ProbeArgs,
}

/// Prints a line: the JSON value with `--json`, else the text.
pub fn emit(json_mode: bool, value: &serde_json::Value, text: impl FnOnce() -> String) {
    if json_mode {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

/// Runs a parsed command line. Errors bubble up to `main`.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let json_mode = cli.json;
    match cli.command {
        Command::Server(args) => server(&args, cli.conn.insecure, json_mode).await,
        Command::Status => status::run(&client(&cli.conn)?, json_mode).await,
        Command::Cluster(cmd) => cluster_command(&client(&cli.conn)?, cmd, json_mode).await,
        Command::Lease(cmd) => lease::run(client(&cli.conn)?, cmd, json_mode).await,
        Command::Watch { group } => lease::watch(client(&cli.conn)?, &group, json_mode).await,
        Command::Group(cmd) => group_command(&client(&cli.conn)?, cmd, json_mode).await,
        Command::Snapshot(SnapshotCommand::Save { file }) => {
            lifecycle::save_snapshot(&client(&cli.conn)?, &file, json_mode).await
        }
        Command::Matrix { group, consistency } => {
            groups::matrix(&client(&cli.conn)?, &group, consistency.to_pb(), json_mode).await
        }
        Command::Explain { group, member } => groups::explain(&client(&cli.conn)?, &group, &member, json_mode).await,
        Command::History { group } => election::history(&client(&cli.conn)?, &group, json_mode).await,
        Command::Switchover { group, to, wait_s } => {
            election::switchover(&client(&cli.conn)?, &group, to.as_deref(), Duration::from_secs(wait_s), json_mode)
                .await
        }
        Command::Maintenance { group, state } => {
            election::maintenance(&client(&cli.conn)?, &group, matches!(state, OnOff::On), json_mode).await
        }
        Command::Whatif { group, down } => election::whatif(&client(&cli.conn)?, &group, &down, json_mode).await,
        Command::Failover(FailoverCommand::Status { group }) => {
            election::status(&client(&cli.conn)?, &group, json_mode).await
        }
        Command::Failover(FailoverCommand::Unblock { group }) => {
            election::unblock(&client(&cli.conn)?, &group, json_mode).await
        }
        Command::Agent(args) => {
            let config = args.to_config(&cli.conn)?;
            crate::agent::run(config, shutdown_signal()).await?;
            Ok(())
        }
        Command::Local(cmd) => local(cmd, cli.conn.insecure, json_mode).await,
        Command::Certs(cmd) => certs(cmd, json_mode),
        Command::Demo { dir, base_port, keep_running } => {
            let narrate = !json_mode;
            let opts =
                crate::local::demo::DemoOptions { dir, base_port, keep_running, narrate, insecure: cli.conn.insecure };
            demo(&opts).await
        }
        Command::Bench(args) => bench(&cli.conn, args, json_mode).await,
    }
}

/// `quorate cluster members|add-node|remove-node`.
async fn cluster_command(c: &Client, cmd: ClusterCommand, json_mode: bool) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Members => cluster::members(c, json_mode).await,
        ClusterCommand::AddNode { id, addr, wait_s } => {
            cluster::add_node(c, id, &addr, Duration::from_secs(wait_s), json_mode).await
        }
        ClusterCommand::RemoveNode { id } => cluster::remove_node(c, id, json_mode).await,
    }
}

/// `quorate group apply|delete|get|list`.
async fn group_command(c: &Client, cmd: GroupCommand, json_mode: bool) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Apply { file } => groups::apply(c, &file, json_mode).await,
        GroupCommand::Delete { name, force } => lifecycle::delete_group(c, &name, force, json_mode).await,
        GroupCommand::Get { name } => groups::get(c, &name, json_mode).await,
        GroupCommand::List => groups::list(c, json_mode).await,
    }
}

/// `quorate server`: run a node, or print the default config, or check one.
async fn server(args: &ServerArgs, insecure: bool, json_mode: bool) -> anyhow::Result<()> {
    if args.print_default_config {
        print!("{}", ServerConfig::default_toml());
        return Ok(());
    }
    if let Some(file) = &args.check_config {
        return lifecycle::check_config(file, json_mode);
    }
    let config = args.to_config(insecure)?;
    crate::server::run(config, shutdown_signal()).await?;
    Ok(())
}

/// `quorate local up|down`.
async fn local(cmd: LocalCommand, insecure: bool, json_mode: bool) -> anyhow::Result<()> {
    match cmd {
        LocalCommand::Up { nodes, dir, base_port, group, members, redis_pair, restore } => {
            let data = redis_pair.is_some();
            let group = redis_pair.map(|g| (g, 2)).or(group.map(|g| (g, members)));
            let opts = crate::local::UpOptions { nodes, dir, base_port, group, data, insecure, restore };
            let file = crate::local::up(&opts).await?;
            let value = serde_json::to_value(&file)?;
            emit(json_mode, &value, || {
                let mut out = format!("local cluster up: {} nodes", file.nodes.len());
                for n in &file.nodes {
                    out.push_str(&format!("\n  node {} pid {} at {} (data {})", n.id, n.pid, n.addr, n.data_dir));
                    if let Some(h) = &n.http_addr {
                        out.push_str(&format!(", health and metrics http://{h}/"));
                    }
                }
                for m in &file.members {
                    out.push_str(&format!(
                        "\n  member {}: agent pid {}, heartbeat redis pid {} at {}",
                        m.id, m.agent_pid, m.heartbeat_redis_pid, m.heartbeat_redis_addr
                    ));
                    if let (Some(pid), Some(addr)) = (m.data_redis_pid, &m.data_redis_addr) {
                        out.push_str(&format!(", data redis pid {pid} at {addr}"));
                    }
                    if let Some(h) = &m.agent_http_addr {
                        out.push_str(&format!(", agent health and metrics http://{h}/"));
                    }
                }
                out.push_str(&format!("\nto use it:\n{}", file.usage()));
                out
            });
            Ok(())
        }
        LocalCommand::Down { dir } => {
            let stopped = crate::local::down(&dir).await?;
            emit(json_mode, &json!({ "stopped": stopped }), || format!("stopped {} processes", stopped.len()));
            Ok(())
        }
        LocalCommand::AddNode { dir, wait_s } => {
            let (node, added) = crate::local::add_node(&dir, Duration::from_secs(wait_s)).await?;
            let value = json!({"added": node.id, "pid": node.pid, "addr": node.addr, "data_dir": node.data_dir,
                               "caught_up_ms": added.caught_up_ms, "took_ms": added.took_ms});
            emit(json_mode, &value, || {
                format!(
                    "node {} pid {} at {} (data {}) is a voter after {} ms; cluster.json updated",
                    node.id, node.pid, node.addr, node.data_dir, added.took_ms
                )
            });
            Ok(())
        }
        LocalCommand::RemoveNode { dir, id } => {
            let node = crate::local::remove_node(&dir, id).await?;
            let value = json!({"removed": id, "data_dir": node.data_dir});
            emit(json_mode, &value, || {
                format!("node {id} removed and stopped; cluster.json updated (its data is left in {})", node.data_dir)
            });
            Ok(())
        }
    }
}

/// `quorate demo`: fails when a scenario did not go as expected.
async fn demo(opts: &crate::local::demo::DemoOptions) -> anyhow::Result<()> {
    let summary = crate::local::demo::run(opts).await?;
    if !opts.narrate {
        println!("{}", serde_json::to_string(&summary)?);
    }
    if summary.acked_writes_lost > 0 || summary.scenarios.iter().any(|s| !s.ok) {
        anyhow::bail!("the demo did not go as expected (see the summary)");
    }
    Ok(())
}

/// `quorate bench`: the groups and ingest benchmarks have options of their
/// own; the others are closed loops of one kind of call.
async fn bench(conn: &ConnArgs, args: BenchArgs, json_mode: bool) -> anyhow::Result<()> {
    if bench::is_theirs(&args) {
        return bench::run(conn, &args, json_mode).await;
    }
    let client = client(conn)?;
    match args.kind {
        crate::bench::BenchKind::Groups => {
            let opts = crate::bench::groups::GroupsOptions {
                count: args.count,
                clients: args.clients,
                duration: Duration::from_secs(args.duration_s),
                heartbeat_url: args.heartbeat_url,
            };
            let report = crate::bench::groups::run(&client, &opts).await?;
            emit(json_mode, &serde_json::to_value(&report)?, || report.to_string());
            Ok(())
        }
        crate::bench::BenchKind::Ingest => {
            let opts = crate::bench::ingest::IngestOptions {
                members: args.members,
                group_size: args.group_size,
                duration: Duration::from_secs(args.duration_s),
                warmup: Duration::from_secs(args.warmup_s),
                heartbeat_url: args.heartbeat_url,
            };
            let report = crate::bench::ingest::run(&client, &opts).await?;
            emit(json_mode, &serde_json::to_value(&report)?, || report.to_string());
            Ok(())
        }
        crate::bench::BenchKind::FailoverProbe => {
            let report = crate::bench::failover::run(&client, &args.probe).await?;
            emit(json_mode, &serde_json::to_value(&report)?, || report.to_string());
            Ok(())
        }
        kind => {
            let report = crate::bench::run(
                &client,
                kind,
                args.clients,
                Duration::from_secs(args.duration_s),
                args.consistency.to_pb(),
            )
            .await?;
            emit(json_mode, &serde_json::to_value(&report)?, || report.to_string());
            Ok(())
        }
    }
}

/// The transport the global `--ca/--cert/--key` ask for: mutual TLS with
/// all three, plain text only with `--insecure`.
fn transport(cli: &ConnArgs) -> anyhow::Result<Transport> {
    let path = |p: &Option<PathBuf>| p.clone().unwrap_or_default();
    let files =
        crate::config::tls_files(&path(&cli.ca), &path(&cli.cert), &path(&cli.key), cli.insecure, CLI_TLS_FLAGS)
            .map_err(|e| match e {
                // The CLI's flags have an environment too.
                crate::config::ConfigError::Invalid { message, .. } if message.starts_with("missing") => {
                    anyhow::anyhow!(
                        "{message} (or set QUORATE_CA, QUORATE_CERT, QUORATE_KEY; `quorate local up` prints them)"
                    )
                }
                e => e.into(),
            })?;
    Ok(match files {
        Some(files) => Transport::Tls(Tls::load(files)?),
        None => Transport::Insecure,
    })
}

fn client(cli: &ConnArgs) -> anyhow::Result<Client> {
    let endpoints: Vec<String> = cli.endpoints.split(',').map(str::to_owned).collect();
    Client::new_with(&endpoints, transport(cli)?).context("cannot create a client")
}

pub use crate::shutdown::signal as shutdown_signal;

fn certs(cmd: CertsCommand, json_mode: bool) -> anyhow::Result<()> {
    use crate::tls::certs::{self as c, IssueRequest};
    match cmd {
        CertsCommand::Init { dir } => {
            let ca = c::init(&dir)?;
            if json_mode {
                println!("{}", json!({ "ca": ca }));
            } else {
                println!("created a CA: {} (keep {} secret)", ca.display(), dir.join(c::CA_KEY).display());
            }
        }
        CertsCommand::Issue { dir, name, role, groups, sans, days } => {
            let mut req = IssueRequest::new(&name, role);
            req.not_after = req.not_before + time::Duration::days(i64::from(days));
            req.groups = groups;
            req.sans = sans;
            let identity = req.identity()?;
            let (cert, key) = c::issue(&dir, &req)?;
            if json_mode {
                println!("{}", json!({ "cert": cert, "key": key, "identity": identity.uri() }));
            } else {
                println!("issued {} ({identity}, {}) and {}", cert.display(), identity.uri(), key.display());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_flags_reach_both_configs() {
        let flags = [
            "--redis-username",
            "hb",
            "--redis-password-file",
            "/run/pw",
            "--redis-tls-ca",
            "ca.pem",
            "--redis-tls-cert",
            "c.pem",
            "--redis-tls-key",
            "k.pem",
        ];
        let check = |u: &str, p: &std::path::Path, ca: &std::path::Path, cert: &std::path::Path| {
            assert_eq!(
                (u, p.to_str(), ca.to_str(), cert.to_str()),
                ("hb", Some("/run/pw"), Some("ca.pem"), Some("c.pem"))
            );
        };
        let server = Cli::try_parse_from(["quorate", "server", "--node-id", "1"].into_iter().chain(flags)).unwrap();
        let Command::Server(args) = server.command else { panic!("not a server") };
        let c = args.to_config(false).unwrap();
        check(&c.redis_username, &c.redis_password_file, &c.redis_tls_ca, &c.redis_tls_cert);
        assert_eq!(c.redis_tls_key.to_str(), Some("k.pem"));
        let agent = Cli::try_parse_from(["quorate", "agent", "--group", "g"].into_iter().chain(flags)).unwrap();
        let Command::Agent(args) = agent.command else { panic!("not an agent") };
        let c = args.to_config(&agent.conn).unwrap();
        check(&c.redis_username, &c.redis_password_file, &c.redis_tls_ca, &c.redis_tls_cert);
        assert_eq!(c.redis_tls_key.to_str(), Some("k.pem"));
    }
}

//! The local launcher: `quorate local up|down|add-node|remove-node`.
//!
//! `up` starts a cluster of `quorate server` processes in the background, each
//! in its own process group (so a Ctrl-C in the terminal does not reach them),
//! with logs under DIR, records them in `DIR/cluster.json`, and returns once a
//! leader exists. Run again on the same DIR, it restarts whatever is not
//! running on its old ports and data. `down` stops what `up` started: SIGTERM,
//! then SIGKILL after a grace period. Data is kept. `add-node` starts the
//! next node (next id, its ports by the same rule) and adds it to the
//! cluster; `remove-node` removes one and stops it; both keep
//! `cluster.json` in step (removed ids are recorded and never reused).
//!
//! Secure by default, like a real deployment: `up` issues a CA and a
//! certificate per identity under `DIR/tls/` ([`LocalPki`]), starts every
//! node and agent on mutual TLS, and writes the paths into `cluster.json`.
//! `--insecure` keeps everything plain text (the benchmarks compare both).
//! The Redis servers stay plain text on loopback, and so does each node's
//! Sentinel-compatible endpoint (node port + 500, `nodes[].sentinel_addr`).

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub mod demo;

use crate::client::Client;
use crate::tls::certs::{LOCAL_ADMIN, LOCAL_CLIENT, LOCAL_READER, LocalPki};
use crate::tls::config::TlsFiles;
use crate::tls::transport::Transport;

/// How long `up` waits for a leader.
const LEADER_WAIT: Duration = Duration::from_secs(30);
/// How long `down` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `DIR/cluster.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The value for `--endpoints` / `QUORATE_ENDPOINTS`.
    pub endpoints: String,
    pub nodes: Vec<NodeEntry>,
    /// The failover group started with `--group`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Its members: a heartbeat redis-server and an agent each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberEntry>,
    /// The certificates, unless the cluster was started `--insecure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTls>,
    /// Node ids `remove-node` took out: never used again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_ids: Vec<u64>,
    /// `add-node` or `remove-node` changed the nodes since `up` made them,
    /// so `up` on this directory no longer checks `--nodes`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub membership_changed: bool,
}

/// Where `up` put the certificates (every node's and member's are named
/// in its own entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTls {
    /// `DIR/tls`: the CA (`ca.crt`, `ca.key`) and every certificate.
    pub dir: String,
    /// The CA certificate every process trusts (`QUORATE_CA`).
    pub ca: String,
    /// An admin identity: everything (`QUORATE_CERT`, `QUORATE_KEY`).
    pub admin_cert: String,
    pub admin_key: String,
    /// A reader identity: reads only.
    pub reader_cert: String,
    pub reader_key: String,
    /// A client identity: leases of any group, as `client` or
    /// `client@INSTANCE`.
    pub client_cert: String,
    pub client_key: String,
}

impl ClusterFile {
    /// How a client reaches this cluster: as its admin over mutual TLS, or
    /// plain text for an `--insecure` cluster.
    pub fn admin_transport(&self) -> Result<Transport, LocalError> {
        match &self.tls {
            None => Ok(Transport::Insecure),
            Some(t) => {
                let files = TlsFiles {
                    ca: t.ca.clone().into(),
                    cert: t.admin_cert.clone().into(),
                    key: t.admin_key.clone().into(),
                };
                crate::tls::config::Tls::load(files)
                    .map(Transport::Tls)
                    .map_err(|e| LocalError::Invalid(format!("the admin certificate of {}: {e}", t.dir)))
            }
        }
    }

    /// The shell lines that point the CLI at this cluster, as its admin.
    pub fn usage(&self) -> String {
        let mut out = format!("  export QUORATE_ENDPOINTS={}", self.endpoints);
        let sentinels: Vec<&str> = self.nodes.iter().filter_map(|n| n.sentinel_addr.as_deref()).collect();
        if !sentinels.is_empty() && self.members.iter().any(|m| m.data_redis_addr.is_some()) {
            out.push_str(&format!(
                "\n  Redis Sentinel clients: sentinels {}, master name {}",
                sentinels.join(","),
                self.group.as_deref().unwrap_or_default()
            ));
        }
        match &self.tls {
            Some(t) => out.push_str(&format!(
                "\n  export QUORATE_CA={} QUORATE_CERT={} QUORATE_KEY={}\n  \
                 (the admin identity; in {} reader.crt/.key only reads, client.crt/.key holds leases as client \
                 or client@INSTANCE, and each member's agent has its own)",
                t.ca, t.admin_cert, t.admin_key, t.dir
            )),
            None => out.push_str("\n  export QUORATE_INSECURE=true   (this cluster serves plain text)"),
        }
        out
    }

    /// A client of this cluster as its admin.
    pub fn admin_client(&self) -> Result<Client, LocalError> {
        let endpoints: Vec<String> = self.endpoints.split(',').map(str::to_owned).collect();
        Client::new_with(&endpoints, self.admin_transport()?).map_err(|e| LocalError::Invalid(e.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// The member id, `GROUP-K`.
    pub id: String,
    /// The agent's process id; 0 when stopped.
    pub agent_pid: u32,
    /// The heartbeat redis-server's process id; 0 when stopped.
    pub heartbeat_redis_pid: u32,
    pub heartbeat_redis_addr: String,
    /// With `--redis-pair`: the member's data redis-server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_redis_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_redis_addr: Option<String>,
    /// The agent's certificate and key (a member identity of the group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    /// The agent's plain-HTTP health and metrics listener (`/primary`,
    /// `/replica`, `/metrics`, ...): `127.0.0.1:BASE+700+K-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_http_addr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u64,
    /// The process id; 0 when stopped.
    pub pid: u32,
    pub addr: String,
    pub data_dir: String,
    /// The node's certificate (`node-N`, valid for its address) and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    /// The node's plain-HTTP health and metrics listener (`/livez`,
    /// `/readyz`, `/leader`, `/metrics`): `127.0.0.1:BASE+600+N-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// The node's Sentinel-compatible endpoint (plain text, loopback):
    /// base-port + 500 + N - 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_addr: Option<String>,
}

/// The offset of the Sentinel ports from the base port.
pub const SENTINEL_PORT_OFFSET: u16 = 500;

/// Options of `local up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: u64,
    pub dir: PathBuf,
    pub base_port: u16,
    /// A failover group and its number of members.
    pub group: Option<(String, u64)>,
    /// Give every member a data redis-server too, and manage the group
    /// (`--redis-pair`).
    pub data: bool,
    /// Plain text everywhere instead of mutual TLS (`--insecure`).
    pub insecure: bool,
    /// A backup to seed the new cluster from (`--restore`): node 1 restores
    /// it, the others receive it by Raft. Only for a new directory.
    pub restore: Option<PathBuf>,
}

/// Why the launcher failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("cluster.json in {path} is unreadable: {message}")]
    BadFile { path: String, message: String },
    #[error("no leader within {waited:?}; see the logs in {dir}")]
    NoLeader { waited: Duration, dir: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + use<> {
    let path = path.display().to_string();
    move |source| LocalError::Io { what, path, source }
}

fn file_path(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

/// Reads `DIR/cluster.json`, if there is one.
pub fn read_cluster_file(dir: &Path) -> Result<Option<ClusterFile>, LocalError> {
    let path = file_path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| LocalError::BadFile { path: path.display().to_string(), message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("cannot read", &path)(e)),
    }
}

fn write_cluster_file(dir: &Path, file: &ClusterFile) -> Result<(), LocalError> {
    let path = file_path(dir);
    let tmp = dir.join("cluster.json.tmp");
    let bytes = serde_json::to_vec_pretty(file).map_err(|e| LocalError::Invalid(e.to_string()))?;
    std::fs::write(&tmp, bytes).map_err(io("cannot write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot write", &path))
}

/// The command line of a live process (empty for a zombie or no process).
fn cmdline(pid: u32) -> Vec<String> {
    if pid == 0 {
        return Vec::new();
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmd| {
            cmd.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is a live `quorate <subcommand>` process (not a recycled pid).
fn is_quorate(pid: u32, subcommand: &str) -> bool {
    let args = cmdline(pid);
    args.first().is_some_and(|a| a.ends_with("quorate")) && args.iter().any(|a| a == subcommand)
}

/// Whether `pid` is a live `quorate server` process.
pub fn is_our_server(pid: u32) -> bool {
    is_quorate(pid, "server")
}

/// Whether `pid` is a live `quorate agent` process.
pub fn is_our_agent(pid: u32) -> bool {
    is_quorate(pid, "agent")
}

/// Whether `pid` is a live redis-server (it rewrites its title, so match the
/// first argument's prefix).
pub fn is_redis(pid: u32) -> bool {
    cmdline(pid).first().is_some_and(|a| a.contains("redis-server"))
}

/// Finds `redis-server` on PATH.
pub fn find_redis_server() -> Result<PathBuf, LocalError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("redis-server")).find(|p| p.is_file()).ok_or_else(|| {
        LocalError::Invalid(
            "redis-server not found on PATH; install it (Debian/Ubuntu: `sudo apt-get install redis-server`, \
             macOS: `brew install redis`) or add its directory to PATH"
                .into(),
        )
    })
}

fn log_file(dir: &Path, name: &str) -> Result<(File, File), LocalError> {
    let path = dir.join(name);
    let log = File::options().create(true).append(true).open(&path).map_err(io("cannot open log", &path))?;
    let err = log.try_clone().map_err(io("cannot open log", &path))?;
    Ok((log, err))
}

/// Starts a redis-server on `addr` (`127.0.0.1:PORT`), named `name` for its
/// directory and log. No persistence: the local topology is for trying things.
pub fn spawn_redis(dir: &Path, name: &str, addr: &str) -> Result<u32, LocalError> {
    spawn_redis_as(dir, name, addr, None)
}

/// [`spawn_redis`], started as a replica of `replica_of` (`HOST:PORT`) when
/// given: a data Redis always starts so (README: managed groups), so that
/// one that restarts refuses writes until its agent has decided.
pub fn spawn_redis_as(dir: &Path, name: &str, addr: &str, replica_of: Option<&str>) -> Result<u32, LocalError> {
    let redis = find_redis_server()?;
    let port = addr.rsplit_once(':').map_or("", |(_, p)| p);
    let data = dir.join(name);
    std::fs::create_dir_all(&data).map_err(io("cannot create", &data))?;
    let (log, err) = log_file(dir, &format!("{name}.log"))?;
    let child = std::process::Command::new(redis)
        .args(["--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--repl-diskless-sync-delay", "0"])
        .args(replica_of.and_then(|a| a.rsplit_once(':')).map(|(h, p)| ["--replicaof", h, p]).into_iter().flatten())
        .arg("--dir")
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(io("cannot start redis-server for", dir))?;
    Ok(child.id())
}

/// The TLS flags of a spawned process (`--tls-ca` for a server, `--ca` for
/// an agent): its certificate in a TLS cluster, `--insecure` in a plain one.
fn tls_args(
    prefix: &str,
    tls: Option<&ClusterTls>,
    cert: Option<&String>,
    key: Option<&String>,
) -> Result<Vec<String>, LocalError> {
    match (tls, cert, key) {
        (None, _, _) => Ok(vec!["--insecure".into()]),
        (Some(t), Some(cert), Some(key)) => Ok(vec![
            format!("--{prefix}ca"),
            t.ca.clone(),
            format!("--{prefix}cert"),
            cert.clone(),
            format!("--{prefix}key"),
            key.clone(),
        ]),
        (Some(t), _, _) => Err(LocalError::Invalid(format!(
            "cluster.json names the certificates in {} but not this process's; use another --dir",
            t.dir
        ))),
    }
}

fn spawn_agent(dir: &Path, file: &ClusterFile, member: &MemberEntry) -> Result<u32, LocalError> {
    let group = file.group.as_deref().unwrap_or_default();
    let exe = std::env::current_exe().map_err(io("cannot find the quorate binary", Path::new("current_exe")))?;
    let (log, err) = log_file(dir, &format!("{}-agent.log", member.id))?;
    let child = std::process::Command::new(exe)
        .args(["agent", "--group", group, "--member", &member.id, "--endpoints", &file.endpoints])
        .args(tls_args("", file.tls.as_ref(), member.tls_cert.as_ref(), member.tls_key.as_ref())?)
        .args(member.agent_http_addr.iter().flat_map(|a| ["--http-listen", a.as_str()]))
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(io("cannot start agent for", dir))?;
    Ok(child.id())
}

/// The spec `local up --group` applies: members GROUP-1..K, each with its
/// own heartbeat store, default policy.
pub fn local_group_spec(group: &str, members: &[MemberEntry]) -> quorate_core::group::GroupSpec {
    quorate_core::group::GroupSpec {
        name: group.to_owned(),
        members: members
            .iter()
            .map(|m| quorate_core::group::MemberSpec {
                id: m.id.clone(),
                heartbeat: format!("redis://{}", m.heartbeat_redis_addr),
                priority: 100,
                data: m.data_redis_addr.as_ref().map(|a| format!("redis://{a}")),
                announce: None,
            })
            .collect(),
        policy: quorate_core::group::Policy::default(),
        // With data services, the group is managed; the first member starts
        // as primary.
        failover: members.iter().all(|m| m.data_redis_addr.is_some()).then(|| quorate_core::group::FailoverPolicy {
            initial_primary: members.first().map(|m| m.id.clone()),
            ..Default::default()
        }),
    }
}

/// Starts every node that is not running; node 1 (the lowest id, which
/// forms the cluster) with `--restore FILE` when `restore` is given.
fn start_nodes(dir: &Path, file: &mut ClusterFile, restore: Option<&Path>) -> Result<(), LocalError> {
    let peers: String = file.nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect::<Vec<_>>().join(",");
    assign_sentinel_addrs(&mut file.nodes)?;
    let sentinels: String = file
        .nodes
        .iter()
        .filter_map(|n| n.sentinel_addr.as_ref().map(|a| format!("{}={a}", n.id)))
        .collect::<Vec<_>>()
        .join(",");
    for node in &mut file.nodes {
        if is_our_server(node.pid) {
            continue;
        }
        std::fs::create_dir_all(&node.data_dir).map_err(io("cannot create", Path::new(&node.data_dir)))?;
        let restore = restore.filter(|_| node.id == 1);
        node.pid = spawn_node(dir, node, &peers, &sentinels, file.tls.as_ref(), restore)?;
    }
    Ok(())
}

/// Gives every node its Sentinel address (node port + 500), also a node of
/// a `cluster.json` written before there was one.
fn assign_sentinel_addrs(nodes: &mut [NodeEntry]) -> Result<(), LocalError> {
    for n in nodes.iter_mut().filter(|n| n.sentinel_addr.is_none()) {
        let (host, port) = n.addr.rsplit_once(':').unwrap_or((n.addr.as_str(), ""));
        let port = port
            .parse::<u16>()
            .ok()
            .and_then(|p| p.checked_add(SENTINEL_PORT_OFFSET))
            .ok_or_else(|| LocalError::Invalid(format!("node {}: no Sentinel port for {}", n.id, n.addr)))?;
        n.sentinel_addr = Some(format!("{host}:{port}"));
    }
    Ok(())
}

fn spawn_node(
    dir: &Path,
    node: &NodeEntry,
    peers: &str,
    sentinels: &str,
    tls: Option<&ClusterTls>,
    restore: Option<&Path>,
) -> Result<u32, LocalError> {
    let exe = std::env::current_exe().map_err(io("cannot find the quorate binary", Path::new("current_exe")))?;
    let log_path = dir.join(format!("node-{}.log", node.id));
    let log = File::options().create(true).append(true).open(&log_path).map_err(io("cannot open log", &log_path))?;
    let err_log = log.try_clone().map_err(io("cannot open log", &log_path))?;
    let child = std::process::Command::new(exe)
        .args(["server", "--node-id", &node.id.to_string(), "--listen", &node.addr, "--peers", peers])
        .arg("--data-dir")
        .arg(&node.data_dir)
        .args(tls_args("tls-", tls, node.tls_cert.as_ref(), node.tls_key.as_ref())?)
        .args(node.http_addr.iter().flat_map(|a| ["--http-listen", a.as_str()]))
        .args(
            node.sentinel_addr
                .as_ref()
                .map(|a| ["--sentinel-listen", a.as_str(), "--sentinel-peers", sentinels])
                .into_iter()
                .flatten(),
        )
        .args(restore.iter().flat_map(|r| [std::ffi::OsStr::new("--restore"), r.as_os_str()]))
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .process_group(0)
        .spawn()
        .map_err(io("cannot start node for", dir))?;
    Ok(child.id())
}

/// `quorate local up`.
pub async fn up(opts: &UpOptions) -> Result<ClusterFile, LocalError> {
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    let dir = dir.canonicalize().map_err(io("cannot resolve", dir))?;
    if opts.group.is_some() {
        find_redis_server()?;
    }
    let restore = opts.restore.as_deref().map(checked_backup).transpose()?;
    let mut file = match read_cluster_file(&dir)? {
        Some(_) if restore.is_some() => {
            return Err(LocalError::Invalid(format!(
                "--restore seeds a new cluster, and {} already holds one; use another --dir",
                dir.display()
            )));
        }
        Some(f) => {
            if f.group.as_deref() != opts.group.as_ref().map(|(g, _)| g.as_str())
                || f.members.len() as u64 != opts.group.as_ref().map_or(0, |(_, k)| *k)
                || f.members.iter().any(|m| m.data_redis_addr.is_some() != opts.data)
            {
                return Err(LocalError::Invalid(format!(
                    "the cluster in {} was started with a different --group/--members; use another --dir",
                    dir.display()
                )));
            }
            if f.tls.is_none() != opts.insecure {
                let (was, asked) = if opts.insecure { ("mutual TLS", "--insecure") } else { ("--insecure", "TLS") };
                return Err(LocalError::Invalid(format!(
                    "the cluster in {} was started with {was}, not {asked}; give the same options or use another --dir",
                    dir.display()
                )));
            }
            if f.nodes.len() as u64 != opts.nodes && !f.membership_changed {
                return Err(LocalError::Invalid(format!(
                    "the cluster in {} has {} nodes, not {}; run `quorate local down --dir {0}` and use another --dir",
                    dir.display(),
                    f.nodes.len(),
                    opts.nodes
                )));
            }
            f
        }
        None => new_cluster(&dir, opts)?,
    };
    start_nodes(&dir, &mut file, restore.as_deref())?;
    let data_addrs: Vec<String> = file.members.iter().filter_map(|m| m.data_redis_addr.clone()).collect();
    for m in &mut file.members {
        if !is_redis(m.heartbeat_redis_pid) {
            m.heartbeat_redis_pid = spawn_redis(&dir, &format!("{}-heartbeat-redis", m.id), &m.heartbeat_redis_addr)?;
        }
        if let Some(addr) = &m.data_redis_addr
            && !m.data_redis_pid.is_some_and(is_redis)
        {
            // A replica of the next member's data Redis.
            let peer = data_addrs.iter().position(|a| a == addr).map(|i| &data_addrs[(i + 1) % data_addrs.len()]);
            let peer = peer.filter(|p| *p != addr).map(String::as_str);
            m.data_redis_pid = Some(spawn_redis_as(&dir, &format!("{}-data-redis", m.id), addr, peer)?);
        }
    }
    write_cluster_file(&dir, &file)?;
    wait_for_leader(&file, &dir).await?;
    if let Some(group) = file.group.clone() {
        let client = file.admin_client()?;
        let spec = local_group_spec(&group, &file.members);
        let current = client.get_group(&group, crate::pb::v1::Consistency::Linearizable).await;
        let same = current.ok().and_then(|r| r.spec).map(crate::wire::convert::spec_from_pb).as_ref() == Some(&spec);
        if !same {
            client
                .apply_group(crate::wire::convert::spec_pb(&spec))
                .await
                .map_err(|e| LocalError::Invalid(format!("cannot create group {group}: {e}")))?;
        }
        for i in 0..file.members.len() {
            if !is_our_agent(file.members[i].agent_pid) {
                file.members[i].agent_pid = spawn_agent(&dir, &file, &file.members[i])?;
            }
        }
        write_cluster_file(&dir, &file)?;
    }
    Ok(file)
}

/// The backup `--restore` names, as an absolute path, once it checks out:
/// a bad file is refused here, with what is wrong with it, before any
/// process starts.
fn checked_backup(path: &Path) -> Result<PathBuf, LocalError> {
    let path = path.canonicalize().map_err(io("cannot find the backup", path))?;
    crate::backup::read_file(&path)
        .map_err(|e| LocalError::Invalid(format!("--restore {}: {e}; nothing was started", path.display())))?;
    Ok(path)
}

fn new_cluster(dir: &Path, opts: &UpOptions) -> Result<ClusterFile, LocalError> {
    if opts.nodes == 0 || opts.nodes > 9 {
        return Err(LocalError::Invalid(format!("--nodes {} is out of range (1 to 9; use 3 or 5)", opts.nodes)));
    }
    let mut nodes = Vec::new();
    for id in 1..=opts.nodes {
        let port = u64::from(opts.base_port) + id - 1;
        let port = u16::try_from(port).map_err(|_| LocalError::Invalid(format!("port {port} is out of range")))?;
        let addr = format!("127.0.0.1:{port}");
        if TcpListener::bind(&addr).is_err() {
            return Err(LocalError::Invalid(format!(
                "port {port} (node {id}) is in use; pick other ports with --base-port"
            )));
        }
        let sentinel = port.checked_add(SENTINEL_PORT_OFFSET).map(|p| format!("127.0.0.1:{p}"));
        if sentinel.as_ref().is_none_or(|a| TcpListener::bind(a).is_err()) {
            return Err(LocalError::Invalid(format!(
                "port {port} + {SENTINEL_PORT_OFFSET} (the Sentinel endpoint of node {id}) is in use or out of range; \
                 pick other ports with --base-port"
            )));
        }
        let data_dir = dir.join(format!("node-{id}")).display().to_string();
        let http_addr = Some(free_local_port(opts.base_port, 600 + id - 1, &format!("HTTP of node {id}"))?);
        let (tls_cert, tls_key, sentinel_addr) = (None, None, sentinel);
        nodes.push(NodeEntry { id, pid: 0, addr, data_dir, tls_cert, tls_key, http_addr, sentinel_addr });
    }
    let endpoints = nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
    let mut members = Vec::new();
    if let Some((group, k)) = &opts.group {
        quorate_core::names::validate(quorate_core::names::NameKind::Group, group)
            .map_err(|e| LocalError::Invalid(format!("--group: {e}")))?;
        if *k == 0 || *k > 16 {
            return Err(LocalError::Invalid(format!("--members {k} is out of range (1 to 16)")));
        }
        for i in 1..=*k {
            let port = u64::from(opts.base_port) + 100 + i - 1;
            let port = u16::try_from(port).map_err(|_| LocalError::Invalid(format!("port {port} is out of range")))?;
            let addr = format!("127.0.0.1:{port}");
            if TcpListener::bind(&addr).is_err() {
                return Err(LocalError::Invalid(format!(
                    "port {port} (heartbeat redis of {group}-{i}) is in use; pick other ports with --base-port"
                )));
            }
            let data_redis_addr = if opts.data {
                let port = u64::from(opts.base_port) + 200 + i - 1;
                let port =
                    u16::try_from(port).map_err(|_| LocalError::Invalid(format!("port {port} is out of range")))?;
                let data = format!("127.0.0.1:{port}");
                if TcpListener::bind(&data).is_err() {
                    return Err(LocalError::Invalid(format!(
                        "port {port} (data redis of {group}-{i}) is in use; pick other ports with --base-port"
                    )));
                }
                Some(data)
            } else {
                None
            };
            members.push(MemberEntry {
                id: format!("{group}-{i}"),
                agent_pid: 0,
                heartbeat_redis_pid: 0,
                heartbeat_redis_addr: addr,
                data_redis_pid: data_redis_addr.as_ref().map(|_| 0),
                data_redis_addr,
                tls_cert: None,
                tls_key: None,
                agent_http_addr: Some(free_local_port(
                    opts.base_port,
                    700 + i - 1,
                    &format!("HTTP of the agent of {group}-{i}"),
                )?),
            });
        }
    }
    let group = opts.group.as_ref().map(|(g, _)| g.clone());
    let mut file =
        ClusterFile { endpoints, nodes, group, members, tls: None, removed_ids: Vec::new(), membership_changed: false };
    if !opts.insecure {
        issue_certs(dir, &mut file)?;
    }
    Ok(file)
}

/// `127.0.0.1:PORT` with PORT = `base + offset`, if it is free; `what`
/// names it in the error.
fn free_local_port(base: u16, offset: u64, what: &str) -> Result<String, LocalError> {
    let port = u64::from(base) + offset;
    let port = u16::try_from(port).map_err(|_| LocalError::Invalid(format!("port {port} is out of range")))?;
    let addr = format!("127.0.0.1:{port}");
    if TcpListener::bind(&addr).is_err() {
        return Err(LocalError::Invalid(format!("port {port} ({what}) is in use; pick other ports with --base-port")));
    }
    Ok(addr)
}

/// Issues the cluster's certificates under `DIR/tls/` (see the module
/// header) and records their paths in `file`.
fn issue_certs(dir: &Path, file: &mut ClusterFile) -> Result<(), LocalError> {
    let tls_dir = dir.join("tls");
    let hosts: Vec<(u64, String)> = file
        .nodes
        .iter()
        .map(|n| (n.id, n.addr.rsplit_once(':').map_or(n.addr.clone(), |(h, _)| h.to_owned())))
        .collect();
    let group = file.group.clone().unwrap_or_default();
    let members: Vec<(String, String)> = file.members.iter().map(|m| (group.clone(), m.id.clone())).collect();
    let pki = LocalPki::ensure(&tls_dir, &hosts, &members)
        .map_err(|e| LocalError::Invalid(format!("cannot issue certificates in {}: {e}", tls_dir.display())))?;
    let show = |p: &Path| p.display().to_string();
    let (admin, reader, client) = (pki.files(LOCAL_ADMIN), pki.files(LOCAL_READER), pki.files(LOCAL_CLIENT));
    file.tls = Some(ClusterTls {
        dir: show(&tls_dir),
        ca: show(&admin.ca),
        admin_cert: show(&admin.cert),
        admin_key: show(&admin.key),
        reader_cert: show(&reader.cert),
        reader_key: show(&reader.key),
        client_cert: show(&client.cert),
        client_key: show(&client.key),
    });
    for n in &mut file.nodes {
        let f = pki.node(n.id);
        (n.tls_cert, n.tls_key) = (Some(show(&f.cert)), Some(show(&f.key)));
    }
    for m in &mut file.members {
        let f = pki.files(&m.id);
        (m.tls_cert, m.tls_key) = (Some(show(&f.cert)), Some(show(&f.key)));
    }
    Ok(())
}

async fn wait_for_leader(file: &ClusterFile, dir: &Path) -> Result<(), LocalError> {
    let client = file.admin_client()?;
    let started = Instant::now();
    while started.elapsed() < LEADER_WAIT {
        let view = crate::client::cluster::cluster_view(&client).await;
        if view.leader.is_some() {
            return Ok(());
        }
        for n in &file.nodes {
            if !is_our_server(n.pid) {
                return Err(LocalError::Invalid(format!(
                    "node {} exited; see {}",
                    n.id,
                    dir.join(format!("node-{}.log", n.id)).display()
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(LocalError::NoLeader { waited: LEADER_WAIT, dir: dir.display().to_string() })
}

/// `quorate local down`: returns the pids it stopped.
pub async fn down(dir: &Path) -> Result<Vec<u32>, LocalError> {
    let Some(mut file) = read_cluster_file(dir)? else {
        return Err(LocalError::Invalid(format!("no cluster.json in {}; nothing to stop", dir.display())));
    };
    // Agents first (they would report their stores down), then the
    // heartbeat stores, then the coordinators.
    let agents: Vec<u32> = file.members.iter().map(|m| m.agent_pid).filter(|p| is_our_agent(*p)).collect();
    stop_pids(&agents, is_our_agent).await;
    let redis: Vec<u32> = file
        .members
        .iter()
        .flat_map(|m| [Some(m.heartbeat_redis_pid), m.data_redis_pid])
        .flatten()
        .filter(|p| is_redis(*p))
        .collect();
    stop_pids(&redis, is_redis).await;
    let servers: Vec<u32> = file.nodes.iter().map(|n| n.pid).filter(|p| is_our_server(*p)).collect();
    stop_pids(&servers, is_our_server).await;
    for n in &mut file.nodes {
        n.pid = 0;
    }
    for m in &mut file.members {
        m.agent_pid = 0;
        m.heartbeat_redis_pid = 0;
        m.data_redis_pid = m.data_redis_pid.map(|_| 0);
    }
    let running = [agents, redis, servers].concat();
    write_cluster_file(dir, &file)?;
    Ok(running)
}

/// SIGTERM, wait up to the grace period, then SIGKILL what is left (only
/// while `alive` still recognizes the process, so a recycled pid is spared).
pub async fn stop_pids(pids: &[u32], alive: fn(u32) -> bool) {
    let signal_all = |sig: Signal| {
        for pid in pids.iter().filter(|p| alive(**p)) {
            if let Ok(p) = i32::try_from(*pid) {
                let _ = kill(Pid::from_raw(p), sig);
            }
        }
    };
    signal_all(Signal::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < STOP_GRACE && pids.iter().any(|p| alive(*p)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_all(Signal::SIGKILL);
}

/// `quorate local add-node`: starts the next node (the next id never used,
/// its ports by `up`'s rule from the cluster's base port), records it in
/// `cluster.json`, and adds it to the cluster (a learner, then a voter once
/// caught up, within `wait`).
pub async fn add_node(dir: &Path, wait: Duration) -> Result<(NodeEntry, crate::pb::v1::AddNodeResponse), LocalError> {
    let dir = dir.canonicalize().map_err(io("cannot resolve", dir))?;
    let Some(mut file) = read_cluster_file(&dir)? else {
        return Err(LocalError::Invalid(format!("no cluster.json in {}; run `quorate local up` first", dir.display())));
    };
    let client = file.admin_client()?;
    // Ids the cluster removed count too: cluster.json may be older.
    let removed = client.cluster_members().await.map(|m| m.removed).unwrap_or_default();
    let used = file.nodes.iter().map(|n| n.id).chain(file.removed_ids.iter().copied()).chain(removed);
    let id = used.max().unwrap_or(0) + 1;
    let base = base_port(&file)?;
    let port = u16::try_from(u64::from(base) + id - 1)
        .map_err(|_| LocalError::Invalid(format!("no port for node {id} from base port {base}")))?;
    let addr = format!("127.0.0.1:{port}");
    if TcpListener::bind(&addr).is_err() {
        return Err(LocalError::Invalid(format!("port {port} (node {id}) is in use")));
    }
    let http_addr = Some(free_local_port(base, 600 + id - 1, &format!("HTTP of node {id}"))?);
    let data_dir = dir.join(format!("node-{id}"));
    if data_dir.exists() {
        return Err(LocalError::Invalid(format!(
            "{} exists: a node with id {id} ran here before; remove the directory first",
            data_dir.display()
        )));
    }
    let data_dir = data_dir.display().to_string();
    file.nodes.push(NodeEntry {
        id,
        pid: 0,
        addr: addr.clone(),
        data_dir,
        tls_cert: None,
        tls_key: None,
        http_addr,
        sentinel_addr: None,
    });
    if file.tls.is_some() {
        // Issues node-N for the new node (the others exist already).
        issue_certs(&dir, &mut file)?;
    }
    file.endpoints = file.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
    file.membership_changed = true;
    // The other nodes run: this starts only the new one.
    start_nodes(&dir, &mut file, None)?;
    write_cluster_file(&dir, &file)?;
    let added = client
        .add_node(id, &addr, wait)
        .await
        .map_err(|e| LocalError::Invalid(format!("node {id} started at {addr} but was not added: {e}")))?;
    let node = file.nodes.iter().find(|n| n.id == id).cloned().expect("just added");
    Ok((node, added))
}

/// `quorate local remove-node`: removes node `id` from the cluster for
/// good, then stops its process and takes it out of `cluster.json`
/// (recording the id as removed). Its data directory is left in place.
pub async fn remove_node(dir: &Path, id: u64) -> Result<NodeEntry, LocalError> {
    let dir = dir.canonicalize().map_err(io("cannot resolve", dir))?;
    let Some(mut file) = read_cluster_file(&dir)? else {
        return Err(LocalError::Invalid(format!("no cluster.json in {}", dir.display())));
    };
    let Some(pos) = file.nodes.iter().position(|n| n.id == id) else {
        return Err(LocalError::Invalid(format!("node {id} is not in {}", file_path(&dir).display())));
    };
    file.admin_client()?
        .remove_node(id)
        .await
        .map_err(|e| LocalError::Invalid(format!("node {id} was not removed: {e}")))?;
    let node = file.nodes.remove(pos);
    if is_our_server(node.pid) {
        stop_pids(&[node.pid], is_our_server).await;
    }
    file.removed_ids.push(id);
    file.endpoints = file.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
    file.membership_changed = true;
    write_cluster_file(&dir, &file)?;
    Ok(node)
}

/// The base port `up` laid the nodes out from: node N listens on base + N - 1.
fn base_port(file: &ClusterFile) -> Result<u16, LocalError> {
    let first = file.nodes.iter().min_by_key(|n| n.id).ok_or_else(|| LocalError::Invalid("no nodes".into()))?;
    let port = first.addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u64>().ok());
    port.and_then(|p| p.checked_sub(first.id - 1)).and_then(|p| u16::try_from(p).ok()).ok_or_else(|| {
        LocalError::Invalid(format!("cannot tell the base port from node {} at {}", first.id, first.addr))
    })
}

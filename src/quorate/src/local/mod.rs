//! The local launcher: `quorate local up|down`.
//!
//! `up` starts a cluster of `quorate server` processes in the background, each
//! in its own process group (so a Ctrl-C in the terminal does not reach them),
//! with logs under DIR, records them in `DIR/cluster.json`, and returns once a
//! leader exists. Run again on the same DIR, it restarts whatever is not
//! running on its old ports and data. `down` stops what `up` started: SIGTERM,
//! then SIGKILL after a grace period. Data is kept.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::client::Client;

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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u64,
    /// The process id; 0 when stopped.
    pub pid: u32,
    pub addr: String,
    pub data_dir: String,
}

/// Options of `local up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: u64,
    pub dir: PathBuf,
    pub base_port: u16,
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

/// Whether `pid` is a live `quorate server` process (not a recycled pid).
pub fn is_our_server(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.iter().any(|a| a.ends_with(b"quorate")) && args.iter().any(|a| *a == b"server")
        }
        Err(_) => false,
    }
}

fn spawn_node(dir: &Path, node: &NodeEntry, peers: &str) -> Result<u32, LocalError> {
    let exe = std::env::current_exe().map_err(io("cannot find the quorate binary", Path::new("current_exe")))?;
    let log_path = dir.join(format!("node-{}.log", node.id));
    let log = File::options().create(true).append(true).open(&log_path).map_err(io("cannot open log", &log_path))?;
    let err_log = log.try_clone().map_err(io("cannot open log", &log_path))?;
    let child = std::process::Command::new(exe)
        .args(["server", "--node-id", &node.id.to_string(), "--listen", &node.addr, "--peers", peers])
        .arg("--data-dir")
        .arg(&node.data_dir)
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
    let mut file = match read_cluster_file(&dir)? {
        Some(f) => {
            if f.nodes.len() as u64 != opts.nodes {
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
    let peers: String = file.nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect::<Vec<_>>().join(",");
    for node in &mut file.nodes {
        if is_our_server(node.pid) {
            continue;
        }
        std::fs::create_dir_all(&node.data_dir).map_err(io("cannot create", Path::new(&node.data_dir)))?;
        node.pid = spawn_node(&dir, node, &peers)?;
    }
    write_cluster_file(&dir, &file)?;
    wait_for_leader(&file, &dir).await?;
    Ok(file)
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
        let data_dir = dir.join(format!("node-{id}")).display().to_string();
        nodes.push(NodeEntry { id, pid: 0, addr, data_dir });
    }
    let endpoints = nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
    Ok(ClusterFile { endpoints, nodes })
}

async fn wait_for_leader(file: &ClusterFile, dir: &Path) -> Result<(), LocalError> {
    let client = Client::from_list(&file.endpoints).map_err(|e| LocalError::Invalid(e.to_string()))?;
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
    let running: Vec<u32> = file.nodes.iter().map(|n| n.pid).filter(|p| is_our_server(*p)).collect();
    stop_pids(&running).await;
    for n in &mut file.nodes {
        n.pid = 0;
    }
    write_cluster_file(dir, &file)?;
    Ok(running)
}

/// SIGTERM, wait up to the grace period, then SIGKILL what is left.
pub async fn stop_pids(pids: &[u32]) {
    let signal_all = |sig: Signal| {
        for pid in pids {
            if let Ok(p) = i32::try_from(*pid) {
                let _ = kill(Pid::from_raw(p), sig);
            }
        }
    };
    signal_all(Signal::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < STOP_GRACE && pids.iter().any(|p| is_our_server(*p)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_all(Signal::SIGKILL);
}

//! Test harness: real `quorate server` processes on free ports, one temp
//! directory per test, every process killed when the harness is dropped
//! (also when the test fails), node logs printed on failure.
//!
//! Everything runs on mutual TLS, as a deployment does: each cluster has a
//! CA and certificates under `DIR/tls/` (the layout `quorate local up`
//! writes), and every client, CLI run and agent presents one of them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use quorate::client::Client;
use quorate::pb::v1 as pb;
use quorate::tls::certs::{self, IssueRequest, LocalPki};
use quorate::tls::config::{Tls, TlsFiles};
use quorate::tls::transport::Transport;
use quorate_core::access::{ANY_GROUP, Role};

pub const QUORATE: &str = env!("CARGO_BIN_EXE_quorate");

/// Cluster tests run one at a time: several 3-node clusters at once on a
/// 2-core machine would turn timing bounds into a lottery.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A free TCP port on 127.0.0.1 (bound and released; the OS hands out
/// ephemeral ports at random, so a clash with another test is unlikely).
///
/// Never the same port twice in one test process: the OS may hand a port
/// just released to the next `bind(0)`, and two nodes of one cluster given
/// one address cannot both start (CI once saw it).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> = Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1_000 {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no port not already handed out in 1000 tries");
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub proc: Option<Proc>,
    /// `--http-listen` (health endpoints, metrics), when started with one.
    pub http_addr: Option<String>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    pub peers: String,
    config: Option<PathBuf>,
    /// The CA and certificates (`DIR/tls/`).
    pub pki: LocalPki,
    /// Extra flags of each node (by id), for settings that differ per node.
    pub node_args: std::collections::BTreeMap<u64, Vec<String>>,
    /// Extra environment of each node (by id), e.g. systemd's NOTIFY_SOCKET.
    pub node_env: std::collections::BTreeMap<u64, Vec<(String, String)>>,
    /// Each node's Sentinel endpoint, in id order (see [`Cluster::start_with_sentinels`]).
    pub sentinel_addrs: Vec<String>,
}

/// How a CLI process reaches a cluster: the endpoints (none for `local
/// up|down`) and the identity it presents, or plain text.
#[derive(Debug, Clone, Default)]
pub struct Conn {
    pub endpoints: String,
    pub tls: Option<TlsFiles>,
    pub insecure: bool,
}

impl Conn {
    /// No cluster: for `local up|down`, `certs`.
    pub fn none() -> Self {
        Conn::default()
    }

    /// The cluster `quorate local up` started in `dir`, as `name` (one of
    /// the identities it issued: admin, reader, client, a member).
    pub fn local(dir: &Path, name: &str) -> Self {
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
        let endpoints = file["endpoints"].as_str().unwrap().to_owned();
        match file["tls"]["dir"].as_str() {
            Some(tls) => Conn { endpoints, tls: Some(TlsFiles::named(Path::new(tls), name)), insecure: false },
            None => Conn { endpoints, tls: None, insecure: true },
        }
    }

    /// The same cluster as another identity of the same CA directory.
    pub fn as_identity(&self, name: &str) -> Self {
        let tls = self.tls.as_ref().map(|t| TlsFiles::named(t.ca.parent().unwrap(), name));
        Conn { tls, ..self.clone() }
    }

    /// Sets the environment of `cmd` (a CLI run or an agent) to reach the
    /// cluster this way.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env_remove("QUORATE_CA").env_remove("QUORATE_CERT").env_remove("QUORATE_KEY");
        cmd.env_remove("QUORATE_INSECURE").env_remove("QUORATE_ENDPOINTS");
        if !self.endpoints.is_empty() {
            cmd.env("QUORATE_ENDPOINTS", &self.endpoints);
        }
        if let Some(t) = &self.tls {
            cmd.env("QUORATE_CA", &t.ca).env("QUORATE_CERT", &t.cert).env("QUORATE_KEY", &t.key);
        }
        if self.insecure {
            cmd.env("QUORATE_INSECURE", "true");
        }
    }
}

/// Issues `name` in the CA directory `dir` unless it is there: `admin`,
/// `reader`, `node-N` have those roles, a name given a group is a member
/// of it, anything else is a client of every group.
pub fn ensure_cert(dir: &Path, name: &str, group: Option<&str>) -> TlsFiles {
    let files = TlsFiles::named(dir, name);
    if files.cert.exists() {
        return files;
    }
    let role = match (name, group) {
        (_, Some(_)) => Role::Member,
        ("admin", _) => Role::Admin,
        ("reader", _) => Role::Reader,
        (n, _) if n.starts_with("node-") => Role::Node,
        _ => Role::Client,
    };
    let mut req = IssueRequest::new(name, role);
    req.groups = match (role, group) {
        (Role::Member, Some(g)) => vec![g.to_owned()],
        (Role::Client, _) => vec![ANY_GROUP.to_owned()],
        _ => Vec::new(),
    };
    certs::issue(dir, &req).unwrap();
    files
}

/// The transport of `files`.
pub fn transport(files: TlsFiles) -> Transport {
    Transport::Tls(Tls::load(files).unwrap())
}

impl Cluster {
    /// Starts `n` nodes with default settings.
    pub fn start(n: u64) -> Self {
        Self::start_with(n, None)
    }

    /// Starts `n` nodes, each with an HTTP health and metrics listener on a
    /// free port (`NodeProc::http_addr`).
    pub fn start_with_http(n: u64) -> Self {
        let mut c = Self::prepare(n, None, tempfile::tempdir().unwrap());
        for node in &mut c.nodes {
            node.http_addr = Some(format!("127.0.0.1:{}", free_port()));
        }
        for id in 1..=n {
            c.start_node(id);
        }
        c
    }

    /// Starts `n` nodes with extra `ServerConfig` keys in TOML.
    pub fn start_with(n: u64, extra_toml: Option<&str>) -> Self {
        let mut c = Self::prepare(n, extra_toml, tempfile::tempdir().unwrap());
        for id in 1..=n {
            c.start_node(id);
        }
        c
    }

    /// Starts `n` nodes, each with a Sentinel-compatible endpoint on a free
    /// port of its own (`sentinel_addrs`) and `extra` flags.
    pub fn start_with_sentinels(n: u64, extra: &[String]) -> Self {
        let mut c = Self::prepare_with_sentinels(n, extra);
        for id in 1..=n {
            c.start_node(id);
        }
        c
    }

    /// [`Self::start_with_sentinels`] without starting any node, so that a
    /// test can give some nodes flags of their own (`node_args`) first.
    pub fn prepare_with_sentinels(n: u64, extra: &[String]) -> Self {
        let mut c = Self::prepare(n, None, tempfile::tempdir().unwrap());
        c.sentinel_addrs = (1..=n).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let peers: Vec<String> = c.sentinel_addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect();
        for id in 1..=n {
            let mut args = vec![
                "--sentinel-listen".to_owned(),
                c.sentinel_addrs[id as usize - 1].clone(),
                "--sentinel-peers".to_owned(),
                peers.join(","),
            ];
            args.extend(extra.iter().cloned());
            c.node_args.insert(id, args);
        }
        c
    }

    /// Lays out `n` nodes in `dir` without starting any.
    pub fn prepare(n: u64, extra_toml: Option<&str>, dir: tempfile::TempDir) -> Self {
        let config = extra_toml.map(|t| {
            let p = dir.path().join("extra.toml");
            std::fs::write(&p, t).unwrap();
            p
        });
        let nodes: Vec<NodeProc> = (1..=n)
            .map(|id| NodeProc {
                id,
                addr: format!("127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("node-{id}")),
                log: dir.path().join(format!("node-{id}.log")),
                proc: None,
                http_addr: None,
            })
            .collect();
        let peers = nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect::<Vec<_>>().join(",");
        let hosts: Vec<(u64, String)> = nodes.iter().map(|n| (n.id, "127.0.0.1".to_owned())).collect();
        let pki = LocalPki::ensure(&dir.path().join("tls"), &hosts, &[]).unwrap();
        Cluster {
            dir,
            nodes,
            peers,
            config,
            pki,
            node_args: Default::default(),
            node_env: Default::default(),
            sentinel_addrs: Vec::new(),
        }
    }

    /// Whether node `id`'s process has exited, and how.
    pub fn try_wait(&mut self, id: u64) -> std::io::Result<Option<std::process::ExitStatus>> {
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        match n.proc.as_mut() {
            Some(p) => p.child.try_wait(),
            None => Ok(None),
        }
    }

    pub fn endpoints(&self) -> String {
        self.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",")
    }

    /// A client as the cluster's admin (groups, switchover, reads).
    pub fn client(&self) -> Client {
        self.client_as("admin")
    }

    /// A client as `name` (see [`ensure_cert`]): a holder of leases is a
    /// client identity, and holds as `name` or `name@INSTANCE`.
    pub fn client_as(&self, name: &str) -> Client {
        self.client_of(&self.endpoints(), name)
    }

    /// A client of only `endpoints`, as `name`.
    pub fn client_of(&self, endpoints: &str, name: &str) -> Client {
        let files = ensure_cert(self.pki.dir(), name, None);
        let eps: Vec<String> = endpoints.split(',').map(str::to_owned).collect();
        Client::new_with(&eps, transport(files)).unwrap()
    }

    /// The TLS files of identity `name`, issued if need be (a member when
    /// `group` is given).
    pub fn cert(&self, name: &str, group: Option<&str>) -> TlsFiles {
        ensure_cert(self.pki.dir(), name, group)
    }

    /// How the CLI reaches this cluster as `name`.
    pub fn conn_as(&self, name: &str) -> Conn {
        Conn { endpoints: self.endpoints(), tls: Some(self.cert(name, None)), insecure: false }
    }

    /// How the CLI reaches this cluster as its admin.
    pub fn conn(&self) -> Conn {
        self.conn_as("admin")
    }

    pub fn node(&self, id: u64) -> &NodeProc {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    pub fn start_node(&mut self, id: u64) {
        let config = self.config.clone();
        let peers = self.peers.clone();
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        let log = std::fs::File::options().create(true).append(true).open(&n.log).unwrap();
        let mut cmd = Command::new(QUORATE);
        let tls = self.pki.node(id);
        cmd.args(["server", "--node-id", &id.to_string(), "--listen", &n.addr, "--peers", &peers])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--tls-ca")
            .arg(&tls.ca)
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        if let Some(h) = &n.http_addr {
            cmd.arg("--http-listen").arg(h);
        }
        cmd.args(self.node_args.get(&id).into_iter().flatten());
        // A test runner started by systemd must not lend its own notify
        // socket to the nodes it starts; tests that want one set it.
        cmd.env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
        cmd.envs(self.node_env.get(&id).into_iter().flatten().map(|(k, v)| (k, v)));
        n.proc = Some(Proc { child: cmd.spawn().unwrap(), name: format!("node-{id}") });
    }

    /// Lays out one more node (the next id, a free port, its `node-N`
    /// certificate) without starting it; every node's `--peers` then names
    /// it, as an operator's configuration would. Returns its id.
    pub fn add_node_slot(&mut self) -> u64 {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let dir = self.dir.path();
        LocalPki::ensure(&dir.join("tls"), &[(id, "127.0.0.1".to_owned())], &[]).unwrap();
        self.nodes.push(NodeProc {
            id,
            addr: format!("127.0.0.1:{}", free_port()),
            data_dir: dir.join(format!("node-{id}")),
            log: dir.join(format!("node-{id}.log")),
            proc: None,
            http_addr: None,
        });
        self.reset_peers();
        id
    }

    /// Forgets node `id` (killed first, if it runs): its slot leaves
    /// `nodes` and every node's `--peers`; its log stays in the directory.
    pub fn forget_node(&mut self, id: u64) -> NodeProc {
        self.kill(id);
        let pos = self.nodes.iter().position(|n| n.id == id).unwrap();
        let n = self.nodes.remove(pos);
        self.reset_peers();
        n
    }

    fn reset_peers(&mut self) {
        self.peers = self.nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect::<Vec<_>>().join(",");
    }

    /// A graceful stop of one node (SIGTERM, then wait for it to exit);
    /// returns how long it took.
    pub fn stop(&mut self, id: u64) -> Duration {
        let started = Instant::now();
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        if let Some(mut p) = n.proc.take() {
            signal(p.pid(), nix::sys::signal::Signal::SIGTERM);
            while p.child.try_wait().unwrap().is_none() {
                assert!(started.elapsed() < Duration::from_secs(20), "node {id} did not stop within 20 s of SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        started.elapsed()
    }

    /// kill -9 of one node.
    pub fn kill(&mut self, id: u64) {
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        if let Some(mut p) = n.proc.take() {
            p.kill();
        }
    }

    /// One node's own status, or None if it does not answer.
    pub async fn status_of(&self, id: u64) -> Option<pb::StatusResponse> {
        let client = self.client_of(&self.node(id).addr, "reader");
        let mut raw = client.raw(&self.node(id).addr).ok()?;
        let fut = raw.status(pb::StatusRequest {});
        Some(tokio::time::timeout(Duration::from_secs(1), fut).await.ok()?.ok()?.into_inner())
    }

    /// Waits until a running node reports itself leader; returns its id.
    pub async fn wait_for_leader(&self, within: Duration) -> u64 {
        let start = Instant::now();
        while start.elapsed() < within {
            for n in self.nodes.iter().filter(|n| n.proc.is_some()) {
                if let Some(s) = self.status_of(n.id).await
                    && s.role == "leader"
                {
                    return n.id;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no leader within {within:?}");
    }

    pub fn print_logs(&self) {
        for n in &self.nodes {
            print_tail(&n.log, 40);
        }
    }

    /// Prints the tails of the first `agents` agent logs in this cluster's
    /// directory (`agent-1.log`, ...), for failing tests.
    pub fn print_agent_logs(&self, agents: usize, lines: usize) {
        for i in 1..=agents {
            print_tail(&self.dir.path().join(format!("agent-{i}.log")), lines);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        for n in &mut self.nodes {
            if let Some(mut p) = n.proc.take() {
                p.kill();
            }
        }
        keep_logs(self.dir.path());
    }
}

/// With `QUORATE_TEST_KEEP_LOGS=<dir>` set, a fixture's logs are copied to
/// a directory of their own under `<dir>` before its temporary directory
/// goes, so a run that passed can be read as closely as one that failed.
fn keep_logs(from: &Path) {
    let Some(to) = std::env::var_os("QUORATE_TEST_KEEP_LOGS") else { return };
    let name = from.file_name().map_or_else(|| "fixture".into(), |n| n.to_string_lossy().into_owned());
    let to = PathBuf::from(to).join(name.trim_start_matches('.'));
    let Ok(entries) = std::fs::read_dir(from) else { return };
    let _ = std::fs::create_dir_all(&to);
    for e in entries.flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
        }
    }
}

/// A CLI process whose stdout lines arrive on a channel, with the instant
/// each was read.
pub struct CliProc {
    pub proc: Proc,
    pub lines: mpsc::Receiver<(Instant, String)>,
}

impl CliProc {
    pub fn spawn(name: &str, args: &[&str], conn: &Conn, dir: &Path) -> Self {
        let stderr = std::fs::File::create(dir.join(format!("{name}.stderr"))).unwrap();
        let mut cmd = Command::new(QUORATE);
        conn.apply(&mut cmd);
        let mut child = cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        CliProc { proc: Proc { child, name: name.into() }, lines: rx }
    }

    /// The next JSON line within `within`.
    pub fn next_json(&self, within: Duration) -> Option<(Instant, serde_json::Value)> {
        let (at, line) = self.lines.recv_timeout(within).ok()?;
        Some((at, serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"))))
    }
}

/// Runs the CLI to completion; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], conn: &Conn) -> (i32, String, String) {
    let mut cmd = Command::new(QUORATE);
    conn.apply(&mut cmd);
    let out = cmd.args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Prints the last `n` lines of a log file (for failing tests).
pub fn print_tail(path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    eprintln!("----- {} (last {n} lines) -----", path.display());
    for l in text.lines().rev().take(n).collect::<Vec<_>>().iter().rev() {
        eprintln!("{l}");
    }
}

/// A redis-server on a free port, killed on drop.
pub struct Redis {
    pub port: u16,
    pub proc: Option<Proc>,
    dir: PathBuf,
}

impl Redis {
    pub fn start(dir: &Path, name: &str) -> Self {
        let mut r = Redis { port: free_port(), proc: None, dir: dir.join(name) };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (deploy/test.sh installs it)");
        self.proc = Some(Proc { child, name: format!("redis:{}", self.port) });
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "redis-server did not start on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// A 3-node cluster plus a group of `k` members, each with its own
/// heartbeat redis-server and a `quorate agent`.
pub struct GroupFixture {
    pub cluster: Cluster,
    pub group: String,
    pub redis: Vec<Redis>,
    pub agents: Vec<Option<Proc>>,
}

impl GroupFixture {
    pub async fn start(k: usize) -> Self {
        let cluster = Cluster::start(3);
        cluster.wait_for_leader(Duration::from_secs(20)).await;
        let redis: Vec<Redis> = (1..=k).map(|i| Redis::start(cluster.dir.path(), &format!("redis-{i}"))).collect();
        let group = "cache".to_owned();
        let spec = pb::GroupSpec {
            name: group.clone(),
            members: redis
                .iter()
                .enumerate()
                .map(|(i, r)| pb::MemberSpec {
                    id: format!("cache-{}", i + 1),
                    heartbeat: r.url(),
                    priority: 100,
                    data: String::new(),
                    announce: String::new(),
                })
                .collect(),
            policy: None,
            failover: None,
        };
        cluster.client().apply_group(spec).await.unwrap();
        let mut f = GroupFixture { cluster, group, redis, agents: (0..k).map(|_| None).collect() };
        for i in 0..k {
            f.start_agent(i);
        }
        f
    }

    pub fn member(&self, i: usize) -> String {
        format!("cache-{}", i + 1)
    }

    pub fn start_agent(&mut self, i: usize) {
        let log = self.cluster.dir.path().join(format!("agent-{}.log", i + 1));
        let log = std::fs::File::options().create(true).append(true).open(log).unwrap();
        let mut cmd = Command::new(QUORATE);
        Conn { tls: Some(self.cluster.cert(&self.member(i), Some(&self.group))), ..self.cluster.conn() }
            .apply(&mut cmd);
        let child = cmd
            .args(["agent", "--group", &self.group, "--member", &self.member(i)])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents[i] = Some(Proc { child, name: format!("agent-{}", i + 1) });
    }

    pub fn agent_pid(&self, i: usize) -> u32 {
        self.agents[i].as_ref().unwrap().pid()
    }

    pub async fn matrix(&self) -> Option<pb::Matrix> {
        self.cluster.client().get_matrix(&self.group, pb::Consistency::Linearizable).await.ok()
    }

    /// Member id -> verdict name, from the current matrix.
    pub async fn verdicts(&self) -> Option<std::collections::BTreeMap<String, pb::VerdictState>> {
        let m = self.matrix().await?;
        Some(m.verdicts.iter().map(|v| (v.member.clone(), pb::VerdictState::try_from(v.state).unwrap())).collect())
    }

    /// Waits until `member`'s verdict is `want`; returns how long it took.
    pub async fn wait_verdict(&self, member: &str, want: pb::VerdictState, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if let Some(v) = self.verdicts().await
                && v.get(member) == Some(&want)
            {
                return start.elapsed();
            }
            assert!(start.elapsed() < within, "{member} not {want:?} within {within:?}: {:?}", self.verdicts().await);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for GroupFixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.cluster.print_agent_logs(self.agents.len(), 30);
        }
        // Agents first, then stores; the cluster drops last.
        for a in &mut self.agents {
            if let Some(mut p) = a.take() {
                p.kill();
            }
        }
        for r in &mut self.redis {
            r.kill();
        }
    }
}

/// One member of a managed pair: heartbeat store, data Redis, agent.
pub struct PairMember {
    pub id: String,
    pub heartbeat: Redis,
    pub data: Redis,
    pub agent: Option<Proc>,
    /// The agent's `--http-listen`, when started with one.
    pub agent_http: Option<String>,
}

/// A 3-node cluster and a managed Redis pair `db` (db-1 primary at start).
pub struct PairFixture {
    pub cluster: Cluster,
    pub members: Vec<PairMember>,
}

/// The group name of [`PairFixture`].
pub const PAIR: &str = "db";

impl PairFixture {
    pub async fn start() -> Self {
        Self::start_on(Cluster::start(3)).await
    }

    /// [`Self::start`] with HTTP health and metrics listeners on every node
    /// and agent (`NodeProc::http_addr`, `PairMember::agent_http`).
    pub async fn start_with_http() -> Self {
        Self::start_on(Cluster::start_with_http(3)).await
    }

    /// The pair on a cluster the caller started (3 nodes); its agents get
    /// HTTP listeners when its nodes have them.
    pub async fn start_on(cluster: Cluster) -> Self {
        let http = cluster.nodes.iter().any(|n| n.http_addr.is_some());
        cluster.wait_for_leader(Duration::from_secs(20)).await;
        let dir = cluster.dir.path().to_owned();
        let members: Vec<PairMember> = (1..=2)
            .map(|i| PairMember {
                id: format!("db-{i}"),
                heartbeat: Redis::start(&dir, &format!("hb-{i}")),
                data: Redis::start(&dir, &format!("data-{i}")),
                agent: None,
                agent_http: http.then(|| format!("127.0.0.1:{}", free_port())),
            })
            .collect();
        let spec = pb::GroupSpec {
            name: PAIR.into(),
            members: members
                .iter()
                .map(|m| pb::MemberSpec {
                    id: m.id.clone(),
                    heartbeat: m.heartbeat.url(),
                    priority: 100,
                    data: m.data.url(),
                    announce: String::new(),
                })
                .collect(),
            policy: None,
            failover: Some(pb::FailoverPolicy { initial_primary: "db-1".into(), ..Default::default() }),
        };
        cluster.client().apply_group(spec).await.unwrap();
        let mut f = PairFixture { cluster, members };
        for i in 0..2 {
            f.start_agent(i);
        }
        f
    }

    pub fn start_agent(&mut self, i: usize) {
        let log = self.cluster.dir.path().join(format!("agent-{}.log", i + 1));
        let log = std::fs::File::options().create(true).append(true).open(log).unwrap();
        let mut cmd = Command::new(QUORATE);
        Conn { tls: Some(self.cluster.cert(&self.members[i].id, Some(PAIR))), ..self.cluster.conn() }.apply(&mut cmd);
        cmd.args(["agent", "--group", PAIR, "--member", &self.members[i].id]);
        if let Some(h) = &self.members[i].agent_http {
            cmd.arg("--http-listen").arg(h);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.members[i].agent = Some(Proc { child, name: format!("agent-{}", i + 1) });
    }

    pub fn agent_pid(&self, i: usize) -> u32 {
        self.members[i].agent.as_ref().unwrap().pid()
    }

    /// kill -9 of a member's data Redis, heartbeat store and agent together.
    pub fn crash(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(mut a) = m.agent.take() {
            a.kill();
        }
        m.heartbeat.kill();
        m.data.kill();
    }

    /// Restarts a crashed member (its data Redis comes back empty).
    pub fn restart(&mut self, i: usize) {
        self.members[i].heartbeat.restart();
        self.members[i].data.restart();
        self.start_agent(i);
    }

    pub async fn election(&self) -> Option<pb::ElectionStatus> {
        self.cluster.client().get_election(PAIR, pb::Consistency::Linearizable).await.ok()
    }

    /// The lease holder and epoch.
    pub async fn primary(&self) -> Option<(String, u64)> {
        let l = self.cluster.client().get_lease(PAIR, pb::Consistency::Linearizable).await.ok()?.lease?;
        (!l.holder.is_empty()).then_some((l.holder, l.epoch))
    }

    /// Waits until db-1 holds the lease and db-2 has synced from it under
    /// that epoch; returns the epoch. It is 1 unless db-1's first lease
    /// lapsed and db-1 took it again (a busy machine can do that; it is not
    /// a failover), so tests compare later epochs with this one.
    pub async fn wait_ready(&self) -> u64 {
        let start = Instant::now();
        loop {
            if let Some(e) = self.election().await {
                let epoch = e.lease.as_ref().filter(|l| l.holder == "db-1").map(|l| l.epoch);
                let synced = e.members.iter().any(|m| {
                    m.member == "db-2" && m.status.as_ref().is_some_and(|s| s.link_up && s.synced_epoch == epoch)
                });
                if let (Some(epoch), true) = (epoch, synced) {
                    if epoch > 1 {
                        eprintln!("db-1 is primary at epoch {epoch}: its first lease lapsed while the pair started");
                    }
                    return epoch;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(30), "pair never got ready: {:?}", self.election().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn data_port(&self, member: &str) -> u16 {
        self.members.iter().find(|m| m.id == member).unwrap().data.port
    }
}

impl Drop for PairFixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.cluster.print_agent_logs(self.members.len(), 40);
        }
        for m in &mut self.members {
            if let Some(mut a) = m.agent.take() {
                a.kill();
            }
            m.heartbeat.kill();
            m.data.kill();
        }
    }
}

/// A connection to a data Redis.
/// The acknowledged keys (each written with itself as its value) missing
/// on the data Redis at `port`.
pub async fn missing_on(port: u16, keys: &[String]) -> Vec<String> {
    let mut conn = redis_conn(port).await.expect("the data Redis answers");
    let mut missing = Vec::new();
    for k in keys {
        let v: Option<String> = redis::cmd("GET").arg(k).query_async(&mut conn).await.unwrap();
        if v.as_deref() != Some(k.as_str()) {
            missing.push(k.clone());
        }
    }
    missing
}

pub async fn redis_conn(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(300)))
        .set_response_timeout(Some(Duration::from_millis(500)));
    c.get_multiplexed_async_connection_with_config(&config).await.ok()
}

/// The fenced write of deploy/redis/fenced_set.lua.
pub async fn fenced_set(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    value: &str,
    epoch: u64,
) -> Result<(), String> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(quorate::local::demo::FENCED_SET_LUA)
        .arg(2)
        .arg(key)
        .arg(quorate::wire::keys::lease_key(PAIR))
        .arg(value)
        .arg(epoch);
    cmd.query_async::<()>(conn).await.map_err(|e| e.to_string())
}

/// `WAIT 1 timeout`: replicas that acknowledged.
pub async fn wait_one(conn: &mut redis::aio::MultiplexedConnection, timeout_ms: u64) -> i64 {
    redis::cmd("WAIT").arg(1).arg(timeout_ms).query_async(conn).await.unwrap_or(0)
}

/// `role:` of a data Redis, if it answers.
pub async fn role_of(port: u16) -> Option<String> {
    let mut c = redis_conn(port).await?;
    let info: String = redis::cmd("INFO").arg("replication").query_async(&mut c).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix("role:")).map(|r| r.trim().to_owned())
}

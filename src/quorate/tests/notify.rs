//! systemd's notify protocol against a real `NOTIFY_SOCKET`: a unix
//! datagram socket bound by the test, as systemd binds its own, and real
//! `quorate server` and `quorate agent` processes sending to it.
//!
//! - a server sends `READY=1` only once it knows a Raft leader (never while
//!   it is alone of three), `WATCHDOG=1` every half `WATCHDOG_USEC`, and
//!   `STOPPING=1` on SIGTERM, then exits 0;
//! - an agent sends `READY=1` only once it reached the cluster and its role
//!   loop runs on the group's election (not while its group does not exist
//!   yet), then keep-alives, then `STOPPING=1` on SIGTERM.

// Each test holds the process-wide `serial()` guard for its whole run, on
// purpose: it serializes tests that each run on their own runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Cluster, Conn, Proc, QUORATE, Redis, print_tail, serial, signal};
use quorate::pb::v1 as pb;

/// `WATCHDOG_USEC` the processes get: keep-alives every 200 ms.
const WATCHDOG_USEC: &str = "400000";

/// The socket systemd would bind: every datagram that arrives, with the
/// instant it was read, on a channel. The reader thread ends on drop.
struct NotifySocket {
    path: PathBuf,
    rx: mpsc::Receiver<(Instant, String)>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl NotifySocket {
    fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).unwrap();
        // Short, so that the thread sees `stop` soon after the test ends.
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let _ = tx.send((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
        });
        NotifySocket { path: path.to_owned(), rx, stop, reader: Some(reader) }
    }

    /// Every datagram that arrives within `d`.
    fn collect_for(&self, d: Duration) -> Vec<String> {
        let until = Instant::now() + d;
        let mut out = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok((_, m)) => out.push(m),
                Err(_) => break,
            }
        }
        out
    }

    /// The first datagram within `within` that carries `line`, and every
    /// datagram read before it.
    fn wait_for(&self, line: &str, within: Duration) -> (Option<(Instant, String)>, Vec<String>) {
        let until = Instant::now() + within;
        let mut before = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok((at, m)) if has_line(&m, line) => return (Some((at, m)), before),
                Ok((_, m)) => before.push(m),
                Err(_) => break,
            }
        }
        (None, before)
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn has_line(datagram: &str, line: &str) -> bool {
    datagram.lines().any(|l| l == line)
}

fn count(datagrams: &[String], line: &str) -> usize {
    datagrams.iter().filter(|m| has_line(m, line)).count()
}

/// The environment systemd gives a `Type=notify` unit with `WatchdogSec=`.
fn notify_env(socket: &NotifySocket) -> Vec<(String, String)> {
    vec![
        ("NOTIFY_SOCKET".to_owned(), socket.path.display().to_string()),
        ("WATCHDOG_USEC".to_owned(), WATCHDOG_USEC.to_owned()),
    ]
}

/// Waits for `proc` to exit; its exit code.
fn wait_exit(proc: &mut Proc, within: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(status) = proc.child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_is_ready_once_it_knows_a_leader_pings_the_watchdog_and_says_when_it_stops() {
    let _serial = serial();
    let mut c = Cluster::prepare(3, None, tempfile::tempdir().unwrap());
    let socket = NotifySocket::bind(&c.dir.path().join("notify.sock"));
    c.node_env.insert(1, notify_env(&socket));
    c.start_node(1);

    // Alone of three, node 1 cannot know a leader: keep-alives, no READY=1.
    let (first, early) = socket.wait_for("WATCHDOG=1", Duration::from_secs(15));
    assert!(first.is_some(), "no WATCHDOG=1 from a server started with WATCHDOG_USEC: {early:?}");
    let mut alone = socket.collect_for(Duration::from_secs(2));
    let pings = count(&alone, "WATCHDOG=1");
    alone.extend(early);
    assert_eq!(count(&alone, "READY=1"), 0, "READY=1 from a node that cannot know a leader: {alone:?}");
    // Every 200 ms: about 10 in 2 s; a busy machine may delay a few.
    assert!(pings >= 3, "too few keep-alives in 2 s: {alone:?}");
    let status = c.status_of(1).await.expect("node 1 answers");
    assert_eq!(status.leader_id, None, "node 1 alone should know no leader: {status:?}");

    c.start_node(2);
    c.start_node(3);
    let (ready, before) = socket.wait_for("READY=1", Duration::from_secs(30));
    let (_, ready) = ready.unwrap_or_else(|| panic!("no READY=1 within 30 s of the cluster forming: {before:?}"));
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=node 1 caught up; Raft leader ")),
        "READY=1 should say which leader it knows: {ready:?}"
    );
    // It said so because it knows a leader and has caught up.
    let status = c.status_of(1).await.expect("node 1 answers");
    assert!(status.leader_id.is_some() && status.caught_up, "READY=1 before a leader and catch-up: {status:?}");
    let running = socket.collect_for(Duration::from_secs(1));
    assert!(count(&running, "WATCHDOG=1") >= 2, "keep-alives stopped after READY=1: {running:?}");

    let pid = c.node(1).proc.as_ref().unwrap().pid();
    signal(pid, nix::sys::signal::Signal::SIGTERM);
    let (stopping, before) = socket.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(stopping.is_some(), "no STOPPING=1 within 10 s of SIGTERM: {before:?}");
    let n1 = c.nodes.iter_mut().find(|n| n.id == 1).unwrap();
    let code = wait_exit(n1.proc.as_mut().unwrap(), Duration::from_secs(20));
    assert_eq!(code, Some(0), "a server stopped by SIGTERM should exit 0");
    let all: Vec<String> = before.into_iter().chain(running).collect();
    assert_eq!(count(&all, "READY=1"), 0, "READY=1 sent twice: {all:?}");
}

/// The processes of the agent test, killed (agents first) on drop, their
/// logs printed when the test fails.
struct Members {
    dir: PathBuf,
    agents: Vec<Proc>,
    redis: Vec<Redis>,
}

impl Members {
    fn spawn_agent(&mut self, c: &Cluster, member: &str, env: &[(String, String)]) -> usize {
        let log = std::fs::File::create(self.dir.join(format!("agent-{member}.log"))).unwrap();
        let mut cmd = Command::new(QUORATE);
        Conn { tls: Some(c.cert(member, Some("db"))), ..c.conn() }.apply(&mut cmd);
        cmd.env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
        let child = cmd
            .args(["agent", "--group", "db", "--member", member])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push(Proc { child, name: format!("agent {member}") });
        self.agents.len() - 1
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for m in ["db-1", "db-2"] {
                print_tail(&self.dir.join(format!("agent-{m}.log")), 40);
            }
        }
        for a in &mut self.agents {
            a.kill();
        }
        for r in &mut self.redis {
            r.kill();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_ready_once_its_role_loop_runs_on_the_cluster_and_says_when_it_stops() {
    let _serial = serial();
    let c = Cluster::start(3);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let dir = c.dir.path().to_owned();
    let socket = NotifySocket::bind(&dir.join("notify.sock"));
    let mut m = Members { dir: dir.clone(), agents: Vec::new(), redis: Vec::new() };
    for i in 1..=2 {
        m.redis.push(Redis::start(&dir, &format!("hb-{i}")));
        m.redis.push(Redis::start(&dir, &format!("data-{i}")));
    }

    // The group does not exist yet: the agent waits for it, and is not ready.
    let agent = m.spawn_agent(&c, "db-2", &notify_env(&socket));
    let waiting = socket.collect_for(Duration::from_secs(2));
    assert_eq!(count(&waiting, "READY=1"), 0, "READY=1 before the agent's group exists: {waiting:?}");

    let spec = pb::GroupSpec {
        name: "db".into(),
        members: (1..=2)
            .map(|i| pb::MemberSpec {
                id: format!("db-{i}"),
                heartbeat: m.redis[2 * (i - 1)].url(),
                priority: 100,
                data: m.redis[2 * (i - 1) + 1].url(),
                announce: String::new(),
            })
            .collect(),
        policy: None,
        failover: Some(pb::FailoverPolicy { initial_primary: "db-1".into(), ..Default::default() }),
    };
    c.client().apply_group(spec).await.unwrap();
    let applied = Instant::now();
    m.spawn_agent(&c, "db-1", &[]);

    let (ready, before) = socket.wait_for("READY=1", Duration::from_secs(30));
    let (at, ready) = ready.unwrap_or_else(|| panic!("no READY=1 within 30 s of the group's creation: {before:?}"));
    assert!(at > applied, "READY=1 came before the group existed");
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=member db-2: role loop running; lease holder ")),
        "READY=1 should say what the role loop knows: {ready:?}"
    );
    let running = socket.collect_for(Duration::from_secs(1));
    assert!(count(&running, "WATCHDOG=1") >= 2, "no keep-alives from a running agent: {running:?}");

    signal(m.agents[agent].pid(), nix::sys::signal::Signal::SIGTERM);
    let (stopping, before) = socket.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(stopping.is_some(), "no STOPPING=1 within 10 s of SIGTERM: {before:?}");
    let code = wait_exit(&mut m.agents[agent], Duration::from_secs(20));
    assert_eq!(code, Some(0), "an agent stopped by SIGTERM should exit 0");
}

//! The system under test, on real processes in namespaces:
//!
//! - `c1`..`c3`: one `quorate server` each;
//! - `m1`, `m2`: a member host each: data Redis (:6379), heartbeat Redis
//!   (:6380), `quorate agent` of the managed pair `db`;
//! - `cl`: the clients (a worker process) and the fenced register (:6390).
//!
//! Every connection to the coordinators is mutual TLS, as in a deployment:
//! the system issues a CA and certificates under `DIR/tls/` (the layout of
//! `quorate local up`: node-N, each member, admin, reader, client) and
//! every process presents its own.
//!
//! Every process is recorded with its command, so a nemesis can kill,
//! pause, resume or restart it; all are killed when the system is dropped.
//! Each writes its stdout and stderr to `<name>.log` in the scenario's
//! directory (`m1-agent.log`, `c2.log`, ...), appending across restarts.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use quorate::client::Client;
use quorate::pb::v1 as pb;
use quorate::tls::certs::LocalPki;
use quorate::tls::config::{Tls, TlsFiles};
use quorate::tls::transport::Transport;

use crate::net::Net;

pub const COORDINATORS: [&str; 3] = ["c1", "c2", "c3"];
pub const MEMBERS: [&str; 2] = ["m1", "m2"];
pub const CLIENT: &str = "cl";
pub const PAIR: &str = "db";
pub const LEASE_GROUP: &str = "jl";
pub const API_PORT: u16 = 7101;
pub const DATA_PORT: u16 = 6379;
pub const HEARTBEAT_PORT: u16 = 6380;
pub const REGISTER_PORT: u16 = 6390;

/// Options that change how the system runs.
#[derive(Debug, Clone, Default)]
pub struct SystemOptions {
    /// Start the coordinators with `--test-only-skip-lease-wait` (negative
    /// control).
    pub skip_lease_wait: bool,
    /// Start the agents with `--test-only-no-deadline-fence`: they do not
    /// fence their data Redis at their lease deadline, so a primary cut off
    /// from the coordinators keeps taking writes after the failover
    /// (negative control).
    pub no_deadline_fence: bool,
}

struct Managed {
    host: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

/// The running system.
pub struct System {
    pub net: Arc<Net>,
    pub dir: PathBuf,
    /// The CA and every identity's certificate.
    pub pki: LocalPki,
    procs: BTreeMap<String, Managed>,
}

/// `--PREFIXca FILE --PREFIXcert FILE --PREFIXkey FILE`.
fn tls_args(prefix: &str, f: &TlsFiles) -> Vec<String> {
    [("ca", &f.ca), ("cert", &f.cert), ("key", &f.key)]
        .iter()
        .flat_map(|(k, p)| [format!("--{prefix}{k}"), p.display().to_string()])
        .collect()
}

/// A client of `endpoints` as the identity whose files these are.
pub fn client_with(endpoints: &str, files: TlsFiles) -> anyhow::Result<Client> {
    let eps: Vec<String> = endpoints.split(',').map(str::to_owned).collect();
    Ok(Client::new_with(&eps, Transport::Tls(Tls::load(files)?))?)
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System").field("dir", &self.dir).field("procs", &self.procs.keys()).finish()
    }
}

/// A redis-server with no persistence, in its own directory (a replica
/// receiving a full sync writes an RDB file there; it must never be found
/// by another run).
fn redis_args(port: u16, dir: &Path) -> Vec<String> {
    let _ = std::fs::create_dir_all(dir);
    ["--port", &port.to_string(), "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain(["--repl-diskless-sync-delay".into(), "0".into(), "--dir".into(), dir.display().to_string()])
        .collect()
}

impl System {
    pub fn endpoints(&self) -> String {
        COORDINATORS.iter().map(|c| format!("{}:{API_PORT}", self.net.host(c).ip)).collect::<Vec<_>>().join(",")
    }

    /// A client of every coordinator as identity `name` (admin, reader,
    /// client, a member, node-N).
    pub fn client(&self, name: &str) -> anyhow::Result<Client> {
        self.client_of(&self.endpoints(), name)
    }

    /// A client of only `endpoints` as `name`.
    pub fn client_of(&self, endpoints: &str, name: &str) -> anyhow::Result<Client> {
        client_with(endpoints, self.pki.files(name))
    }

    pub fn data_addr(&self, member: &str) -> String {
        format!("{}:{DATA_PORT}", self.net.host(member).ip)
    }

    pub fn register_addr(&self) -> String {
        format!("{}:{REGISTER_PORT}", self.net.host(CLIENT).ip)
    }

    /// Every host of the topology.
    pub fn host_names() -> Vec<&'static str> {
        COORDINATORS.iter().chain(MEMBERS.iter()).chain([CLIENT].iter()).copied().collect()
    }

    /// Starts everything (fresh data under `dir`) on the run's network.
    pub async fn start(net: Arc<Net>, dir: &Path, quorate: &Path, opts: &SystemOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        net.heal()?;
        let hosts: Vec<(u64, String)> =
            COORDINATORS.iter().enumerate().map(|(i, c)| (i as u64 + 1, net.host(c).ip.clone())).collect();
        let members: Vec<(String, String)> = MEMBERS.iter().map(|m| (PAIR.to_owned(), (*m).to_owned())).collect();
        let pki = LocalPki::ensure(&dir.join("tls"), &hosts, &members).context("issuing the certificates")?;
        let mut sys = System { net, dir: dir.to_owned(), pki, procs: BTreeMap::new() };
        let peers = COORDINATORS
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{}={}:{API_PORT}", i + 1, sys.net.host(c).ip))
            .collect::<Vec<_>>()
            .join(",");
        for (i, c) in COORDINATORS.iter().enumerate() {
            let ip = sys.net.host(c).ip.clone();
            let mut args: Vec<String> = vec![
                "server".into(),
                "--node-id".into(),
                (i + 1).to_string(),
                "--listen".into(),
                format!("{ip}:{API_PORT}"),
                "--peers".into(),
                peers.clone(),
                "--data-dir".into(),
                dir.join(format!("{c}-data")).display().to_string(),
            ];
            args.extend(tls_args("tls-", &sys.pki.node(i as u64 + 1)));
            if opts.skip_lease_wait {
                args.push("--test-only-skip-lease-wait".into());
            }
            sys.add(c, c, quorate, args)?;
        }
        for m in MEMBERS {
            // Every data Redis starts as a replica of its peer, as the README
            // asks of a deployment: a restarted node then refuses writes
            // (READONLY) until its agent has decided, instead of taking
            // them as an empty master next to the real primary. The agent
            // promotes the primary at run time only.
            let peer = MEMBERS.iter().find(|p| **p != m).expect("two members");
            let mut args = redis_args(DATA_PORT, &dir.join(format!("{m}-data-dir")));
            args.extend(["--replicaof".into(), sys.net.host(peer).ip.clone(), DATA_PORT.to_string()]);
            sys.add(&format!("{m}-data"), m, Path::new("redis-server"), args)?;
            sys.add(
                &format!("{m}-heartbeat"),
                m,
                Path::new("redis-server"),
                redis_args(HEARTBEAT_PORT, &dir.join(format!("{m}-hb-dir"))),
            )?;
        }
        sys.add("register", CLIENT, Path::new("redis-server"), redis_args(REGISTER_PORT, &dir.join("register-dir")))?;

        let client = sys.client("admin")?;
        wait_leader(&client).await?;
        let member = |m: &str, i: usize| pb::MemberSpec {
            id: m.to_owned(),
            heartbeat: format!("redis://{}:{HEARTBEAT_PORT}", sys.net.host(m).ip),
            priority: 100 - i as u32,
            data: format!("redis://{}", sys.data_addr(m)),
            announce: String::new(),
        };
        let pair = pb::GroupSpec {
            name: PAIR.into(),
            members: MEMBERS.iter().enumerate().map(|(i, m)| member(m, i)).collect(),
            policy: None,
            // A failover must be possible again within one scenario.
            failover: Some(pb::FailoverPolicy {
                initial_primary: "m1".into(),
                min_failover_interval_ms: 1_000,
                ..Default::default()
            }),
        };
        client.apply_group(pair).await.context("applying the pair's spec")?;
        for m in MEMBERS {
            let mut args: Vec<String> = ["agent", "--group", PAIR, "--member", m, "--endpoints", &sys.endpoints()]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            args.extend(tls_args("", &sys.pki.files(m)));
            if opts.no_deadline_fence {
                args.push("--test-only-no-deadline-fence".into());
            }
            sys.add(&format!("{m}-agent"), m, quorate, args)?;
        }
        Ok(sys)
    }

    fn add(&mut self, name: &str, host: &str, program: &Path, args: Vec<String>) -> anyhow::Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        self.procs.insert(
            name.to_owned(),
            Managed { host: host.to_owned(), program: program.to_owned(), args, log, child: None },
        );
        self.start_proc(name)
    }

    /// (Re)starts a recorded process.
    pub fn start_proc(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.procs.get(name).with_context(|| format!("no process {name}"))?;
        let log = std::fs::File::options().create(true).append(true).open(&p.log)?;
        let child = self
            .net
            .command(&p.host, &p.program.display().to_string())
            .args(&p.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.procs.get_mut(name).expect("present").child = Some(child);
        Ok(())
    }

    fn pid(&self, name: &str) -> Option<Pid> {
        let c = self.procs.get(name)?.child.as_ref()?;
        i32::try_from(c.id()).ok().map(Pid::from_raw)
    }

    /// kill -9, and reap.
    pub fn kill(&mut self, name: &str) {
        if let Some(p) = self.procs.get_mut(name)
            && let Some(mut c) = p.child.take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pause(&self, name: &str) {
        if let Some(pid) = self.pid(name) {
            let _ = kill(pid, Signal::SIGSTOP);
        }
    }

    pub fn resume(&self, name: &str) {
        if let Some(pid) = self.pid(name) {
            let _ = kill(pid, Signal::SIGCONT);
        }
    }

    /// Where a process's output goes (see the module header).
    pub fn log_path(&self, name: &str) -> Option<PathBuf> {
        self.procs.get(name).map(|p| p.log.clone())
    }

    /// Processes of a host.
    pub fn procs_of(&self, host: &str) -> Vec<String> {
        self.procs.iter().filter(|(_, p)| p.host == host).map(|(n, _)| n.clone()).collect()
    }

    /// The id of the coordinator that leads now, if any.
    pub async fn leader(&self) -> Option<String> {
        let client = self.client("reader").ok()?;
        let v = quorate::client::cluster::cluster_view(&client).await;
        let id = v.leader?;
        COORDINATORS.get(usize::try_from(id).ok()?.checked_sub(1)?).map(|s| (*s).to_owned())
    }

    /// Spawns the worker in the client namespace.
    pub fn spawn_worker(&self, exe: &Path, args: &[String]) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.dir.join("worker.log"))?;
        Ok(self
            .net
            .command(CLIENT, &exe.display().to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?)
    }

    /// Stops every process (SIGCONT first, so paused ones can die).
    pub fn stop_all(&mut self) {
        let names: Vec<String> = self.procs.keys().cloned().collect();
        for n in &names {
            self.resume(n);
            self.kill(n);
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.stop_all();
    }
}

async fn wait_leader(client: &Client) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if quorate::client::cluster::cluster_view(client).await.leader.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no Raft leader within 30 s")
}

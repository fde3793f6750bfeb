//! The `quorate` command line: argument definitions and output. No logic of
//! its own: each subcommand calls the server, client, launcher or bench
//! module and prints what comes back, for people or (`--json`) as one JSON
//! object per line.

mod lease;
mod status;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::client::Client;
use crate::config::ServerConfig;
use crate::pb::v1 as pb;

/// quorate: a quorum-based failover coordinator.
#[derive(Debug, Parser)]
#[command(name = "quorate", version, about, long_about = None)]
pub struct Cli {
    /// Coordinator endpoints, HOST:PORT separated by commas.
    #[arg(
        long,
        global = true,
        env = "QUORATE_ENDPOINTS",
        default_value = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
    )]
    pub endpoints: String,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a coordinator node (Raft + gRPC API).
    Server(ServerArgs),
    /// Show the cluster: leader, term, every node's role and reachability.
    Status,
    /// Read, take, hold and give up leases.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Stream every change of a group's lease until interrupted.
    Watch {
        /// The group to watch.
        group: String,
    },
    /// Start or stop a local cluster of background processes.
    #[command(subcommand)]
    Local(LocalCommand),
    /// Measure throughput and latency against a running cluster.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TOML file with any ServerConfig keys; flags override it.
    #[arg(long)]
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
}

impl ServerArgs {
    /// Defaults, then the file, then flags. Not yet validated.
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let mut c = match &self.config {
            Some(p) => ServerConfig::from_file(p)?,
            None => ServerConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
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
            lease_margin_ms
        );
        if self.node_id.is_none() && self.config.is_none() {
            anyhow::bail!("node_id: missing: give --node-id N (one of the ids in --peers)");
        }
        Ok(c)
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
    Linearizable,
    LeaseRead,
    Stale,
}

impl ConsistencyArg {
    pub fn to_pb(self) -> pb::Consistency {
        match self {
            ConsistencyArg::Linearizable => pb::Consistency::Linearizable,
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
        /// Port of node 1; node N listens on base-port + N - 1.
        #[arg(long, default_value_t = 7101)]
        base_port: u16,
    },
    /// Stop everything `local up` started in DIR (data is kept).
    Down {
        #[arg(long)]
        dir: PathBuf,
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
        Command::Server(args) => {
            let config = args.to_config()?;
            crate::server::run(config, shutdown_signal()).await?;
            Ok(())
        }
        Command::Status => status::run(&cli.endpoints, json_mode).await,
        Command::Lease(cmd) => lease::run(client(&cli.endpoints)?, cmd, json_mode).await,
        Command::Watch { group } => lease::watch(client(&cli.endpoints)?, &group, json_mode).await,
        Command::Local(LocalCommand::Up { nodes, dir, base_port }) => {
            let file = crate::local::up(&crate::local::UpOptions { nodes, dir, base_port }).await?;
            let value = serde_json::to_value(&file)?;
            emit(json_mode, &value, || {
                let mut out = format!("local cluster up: {} nodes", file.nodes.len());
                for n in &file.nodes {
                    out.push_str(&format!("\n  node {} pid {} at {} (data {})", n.id, n.pid, n.addr, n.data_dir));
                }
                out.push_str(&format!("\nexport QUORATE_ENDPOINTS={}", file.endpoints));
                out
            });
            Ok(())
        }
        Command::Local(LocalCommand::Down { dir }) => {
            let stopped = crate::local::down(&dir).await?;
            emit(json_mode, &json!({ "stopped": stopped }), || format!("stopped {} processes", stopped.len()));
            Ok(())
        }
        Command::Bench(args) => {
            let client = client(&cli.endpoints)?;
            let report = crate::bench::run(
                &client,
                args.kind,
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

fn client(endpoints: &str) -> anyhow::Result<Client> {
    Client::from_list(endpoints).context("cannot create a client")
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

//! quorate's Jepsen-style fault suite.
//!
//! Real `quorate` binaries and `redis-server`s, each host in its own network
//! namespace on a bridge this run creates; faults injected by the kernel
//! (iptables drops, one-way grudges, random loss) and by signals (kill -9,
//! SIGSTOP); workloads recorded as a Jepsen-style history on the host's
//! monotonic clock; checkers as pure functions of the history; negative
//! controls that the checkers must flag.
//!
//! ```text
//! cargo run --release -p jepsen-style-tests -- run --profile quick [--seed N] [--scenario NAME] --out DIR
//! ```
//!
//! Needs root, `ip`, `iptables` and `redis-server`. Everything a run creates
//! is removed on exit, on failure and on Ctrl-C; leftovers of a killed run
//! are removed at the next start.

mod checkers;
mod history;
mod net;
mod scenarios;
mod system;
mod worker;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "jepsen-style-tests", about = "quorate's fault suite")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a profile (or one scenario of it).
    Run {
        /// quick (CI, under 20 min) or full.
        #[arg(long, default_value = "quick")]
        profile: String,
        /// Seed for every random choice (default: from the clock, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Run only this scenario.
        #[arg(long)]
        scenario: Option<String>,
        /// Where histories, logs and summary.json go.
        #[arg(long)]
        out: PathBuf,
        /// The quorate binary (default: next to this one, built if missing).
        #[arg(long)]
        quorate: Option<PathBuf>,
    },
    /// Delete namespaces and processes left by a killed run.
    Clean,
    /// Internal: the client workloads, run inside the client namespace.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        endpoints: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value_t = 0)]
        skew_ppm: u64,
        #[arg(long)]
        register: String,
        /// member=HOST:PORT,...
        #[arg(long)]
        data: String,
    },
}

/// The quorate binary: given, or built next to this one.
fn quorate_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    let sibling = me.with_file_name("quorate");
    // Under `cargo run`, make sure the sibling is built from this source.
    if let Ok(cargo) = std::env::var("CARGO") {
        let profile =
            if me.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "release") { "--release" } else { "" };
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-p", "quorate", "--bin", "quorate"]);
        if !profile.is_empty() {
            cmd.arg(profile);
        }
        let status = cmd.status().context("building quorate")?;
        anyhow::ensure!(status.success(), "building quorate failed");
    }
    anyhow::ensure!(
        sibling.exists(),
        "no quorate binary at {}; build it (cargo build --release -p quorate) or pass --quorate",
        sibling.display()
    );
    Ok(sibling)
}

/// Everything a run needs before its async part: preflight, cleanup, the
/// binary, the network. The calling thread ends up in the client namespace.
fn prepare(
    seed: Option<u64>,
    out: &std::path::Path,
    quorate: Option<PathBuf>,
) -> anyhow::Result<(u64, PathBuf, PathBuf, std::sync::Arc<net::Net>)> {
    net::preflight()?;
    let stale = net::clean_stale()?;
    if stale > 0 {
        eprintln!("removed {stale} namespaces left by an earlier run");
    }
    let seed = seed.unwrap_or_else(|| history::now_ns() % 1_000_000_007);
    let quorate = quorate_binary(quorate)?;
    std::fs::create_dir_all(out)?;
    let out = out.canonicalize()?;
    let net = net::Net::create(&format!("{:x}", seed % 0xffff), &system::System::host_names())?;
    net.enter(system::CLIENT)?;
    Ok((seed, out, quorate, std::sync::Arc::new(net)))
}

async fn run(
    profile: String,
    seed: u64,
    only: Option<String>,
    out: PathBuf,
    quorate: PathBuf,
    net: std::sync::Arc<net::Net>,
) -> anyhow::Result<bool> {
    let mut list = scenarios::profile(&profile, seed)?;
    if let Some(name) = &only {
        list.retain(|s| &s.name == name);
        anyhow::ensure!(!list.is_empty(), "no scenario {name:?} in profile {profile}");
    }
    let ctx = scenarios::RunContext {
        net,
        out: out.clone(),
        quorate,
        me: std::env::current_exe()?,
        seed,
        timing: if profile == "full" { scenarios::Timing::full() } else { scenarios::Timing::quick() },
    };
    println!("seed {seed}, profile {profile}, {} scenarios, output in {}", list.len(), out.display());
    let started = Instant::now();
    let mut reports = Vec::new();
    for (i, sc) in list.iter().enumerate() {
        let t0 = Instant::now();
        println!("[{:>4}s] {} ...", started.elapsed().as_secs(), sc.name);
        let r = scenarios::run_one(&ctx, sc, i).await;
        let status = if r.ok() { "ok" } else { "FAILED" };
        println!("[{:>4}s] {} {status} ({} s)", started.elapsed().as_secs(), sc.name, t0.elapsed().as_secs());
        reports.push(r);
    }
    let (controls, regular): (Vec<_>, Vec<_>) = reports.iter().partition(|r| r.control.is_some());
    let summary = json!({
        "seed": seed,
        "profile": profile,
        "scenarios": regular,
        "negative_controls": controls.iter().map(|r| json!({"name": r.name, "flagged": r.flagged == Some(true), "checks": r.checks, "error": r.error})).collect::<Vec<_>>(),
        "took_s": started.elapsed().as_secs(),
    });
    std::fs::write(out.join("summary.json"), serde_json::to_vec_pretty(&summary)?)?;
    print_table(&reports);
    let all_ok = reports.iter().all(scenarios::ScenarioReport::ok);
    for r in reports.iter().filter(|r| !r.ok()) {
        let why = match (&r.control, &r.error) {
            (_, Some(e)) => e.clone(),
            (Some(_), None) => "negative control NOT flagged: the checkers missed a known bug".into(),
            (None, None) => r
                .checks
                .iter()
                .filter(|(_, v)| v.starts_with("fail"))
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; "),
        };
        println!("\nFAILED {}: {why}", r.name);
        println!(
            "  reproduce: cargo run --release -p jepsen-style-tests -- run --profile {profile} --seed {seed} --scenario {} --out {}",
            r.name,
            out.display()
        );
        println!("  history, logs and report: {}", out.join(&r.name).display());
    }
    println!("\nsummary: {}", out.join("summary.json").display());
    Ok(all_ok)
}

fn print_table(reports: &[scenarios::ScenarioReport]) {
    let checks: Vec<String> = reports
        .iter()
        .flat_map(|r| r.checks.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    println!("\n{:<28} {:<8} {:<16} CHECKS", "SCENARIO", "RESULT", "FAILOVER MS");
    for r in reports {
        let result = match (r.control, r.ok()) {
            (Some(_), true) => "flagged",
            (Some(_), false) => "MISSED",
            (None, true) => "pass",
            (None, false) => "FAIL",
        };
        let fo = if r.failover_ms.is_empty() { "-".into() } else { format!("{:?}", r.failover_ms) };
        let marks: Vec<String> = checks
            .iter()
            .filter_map(|c| {
                r.checks.get(c).map(|v| {
                    format!(
                        "{}={}",
                        short(c),
                        if v == "pass" {
                            "ok"
                        } else if v == "n/a" {
                            "-"
                        } else {
                            "FAIL"
                        }
                    )
                })
            })
            .collect();
        println!("{:<28} {:<8} {:<16} {}", r.name, result, fo, marks.join(" "));
        if let Some(e) = &r.error {
            println!("{:<28} error: {e}", "");
        }
    }
    println!(
        "\nchecks: overlap=no_overlapping_leases epochs=epochs_unique_and_increasing register=fenced_register_accepts_only_newest \
         reads=client_epochs_monotonic acked=no_acked_write_lost heal=single_primary_after_heal bound=failover_within_bound stay=no_failover"
    );
}

fn short(check: &str) -> &'static str {
    match check {
        "no_overlapping_leases" => "overlap",
        "epochs_unique_and_increasing" => "epochs",
        "fenced_register_accepts_only_newest" => "register",
        "client_epochs_monotonic" => "reads",
        "no_acked_write_lost" => "acked",
        "single_primary_after_heal" => "heal",
        "failover_within_bound" => "bound",
        "no_failover" => "stay",
        _ => "?",
    }
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    // The network is made before the runtime, and this thread moves into the
    // client namespace, so every runtime thread starts there.
    let prepared = match &cli.command {
        Cmd::Run { seed, out, quorate, .. } => match prepare(*seed, out, quorate.clone()) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("error: {e:#}");
                let _ = net::clean_stale();
                std::process::exit(2);
            }
        },
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = rt.block_on(async {
        match cli.command {
            Cmd::Clean => match net::clean_stale() {
                Ok(n) => {
                    println!("removed {n} namespaces");
                    0
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            },
            Cmd::Worker { endpoints, out, duration_ms, seed, skew_ppm, register, data } => {
                let data = data
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                let opts = worker::WorkerOptions {
                    endpoints,
                    out,
                    duration: Duration::from_millis(duration_ms),
                    seed,
                    lease_clients: 3,
                    skew_ppm,
                    register,
                    data,
                };
                match worker::run(opts).await {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("worker: {e:#}");
                        1
                    }
                }
            }
            Cmd::Run { profile, scenario, .. } => {
                let (seed, out, quorate, net) = prepared.expect("prepared above");
                // Ctrl-C or SIGTERM (`timeout`, a CI runner giving up) drops
                // the run: every System and the Net clean up.
                let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("error: cannot listen for SIGTERM: {e}");
                        return 2;
                    }
                };
                tokio::select! {
                    res = run(profile, seed, scenario, out, quorate, net) => match res {
                        Ok(true) => 0,
                        Ok(false) => 1,
                        Err(e) => {
                            eprintln!("error: {e:#}");
                            2
                        }
                    },
                    _ = tokio::signal::ctrl_c() => {
                        eprintln!("interrupted: cleaning up");
                        130
                    }
                    _ = term.recv() => {
                        eprintln!("terminated: cleaning up");
                        143
                    }
                }
            }
        }
    });
    drop(rt);
    if code != 0 {
        let _ = net::clean_stale();
    }
    std::process::exit(code);
}

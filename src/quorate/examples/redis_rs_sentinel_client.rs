//! Writes in a loop through redis-rs's Sentinel client (crate `redis`, feature
//! `sentinel`, unmodified), as an application would: a `SentinelClient` for
//! the group's master, one multiplexed connection kept while it works, and a
//! new lookup through the Sentinels after any failed write.
//!
//! usage: redis_rs_sentinel_client --sentinels HOST:PORT,HOST:PORT,... --group NAME
//!                                 [--password-file FILE] [--duration-s N]
//!        redis_rs_sentinel_client --lib-version
//!
//! Prints one JSON line per write, like deploy/sentinel-clients/redis_py_client.py:
//! {"client": "redis-rs", "t": <unix s>, "ok": true|false, "master": "HOST:PORT"
//! (ok) | "error": "..." (failed)}. deploy/test-sentinel-clients.sh runs it
//! beside redis-py and ioredis, against quorate and against real Sentinel.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, ConnectionAddr};

/// The pause between writes, as in the redis-py and ioredis writers.
const PAUSE: Duration = Duration::from_millis(20);
/// The master connection's timeouts, those of the redis-py writer: a dead or
/// frozen primary costs a write at most this, not the library's defaults.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// One whole lookup (the Sentinels' `SENTINEL masters`, then `ROLE` on the
/// named master). The library's own connections to them have its default
/// timeouts (1 s to connect, 500 ms per reply), and redis-py gives up on a
/// Sentinel after 300 ms, three of them in turn: about the same bound.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
struct Args {
    /// The Sentinels (or quorate's Sentinel-compatible endpoints).
    #[arg(long, value_delimiter = ',', required_unless_present = "lib_version")]
    sentinels: Vec<String>,
    /// The master name (for quorate, the managed group's name).
    #[arg(long, required_unless_present = "lib_version")]
    group: Option<String>,
    /// A file holding the Sentinels' password.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// How long to write, in seconds.
    #[arg(long, default_value_t = 120.0)]
    duration_s: f64,
    /// Print the redis crate's version and exit (for the script's version line).
    #[arg(long)]
    lib_version: bool,
}

/// The redis crate's version, from the workspace's Cargo.lock at build time:
/// the crate keeps its own version private, and with `--locked` the lock is
/// exactly what was compiled.
fn redis_crate_version() -> &'static str {
    let lock = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock"));
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"redis\"" {
            let version = lines.next().unwrap_or_default();
            return version.trim_start_matches("version = \"").trim_end_matches('"');
        }
    }
    "unknown"
}

fn sentinel_client(args: &Args) -> anyhow::Result<SentinelClient> {
    let mut addrs = Vec::new();
    for a in &args.sentinels {
        let (host, port) = a.rsplit_once(':').with_context(|| format!("{a}: not HOST:PORT"))?;
        addrs.push(ConnectionAddr::Tcp(host.to_owned(), port.parse().with_context(|| format!("{a}: port"))?));
    }
    let group = args.group.as_deref().context("--group")?;
    let mut builder = SentinelClientBuilder::new(addrs, group, SentinelServerType::Master)?;
    if let Some(f) = &args.password_file {
        let pw = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        builder = builder.set_client_to_sentinel_password(pw.trim());
    }
    Ok(builder.build()?)
}

/// A connection to the master the Sentinels named, and its address.
struct Master {
    conn: MultiplexedConnection,
    addr: String,
}

/// Asks the Sentinels for the master (the library checks its `ROLE`) and
/// connects to it.
async fn find_master(sentinel: &mut SentinelClient, config: &AsyncConnectionConfig) -> Result<Master, String> {
    let client = tokio::time::timeout(LOOKUP_TIMEOUT, sentinel.async_get_client())
        .await
        .map_err(|_| format!("master lookup timed out after {LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| format!("master lookup: {e}"))?;
    let addr = client.get_connection_info().addr().to_string();
    let conn = client
        .get_multiplexed_async_connection_with_config(config)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    Ok(Master { conn, addr })
}

/// One write: through the kept connection, or a new lookup's. A connection
/// whose write failed is dropped, whatever the error (a broken connection,
/// a timeout, `READONLY` from a demoted primary): each means the master may
/// have moved, so the next write looks it up again.
async fn write_once(
    sentinel: &mut SentinelClient,
    config: &AsyncConnectionConfig,
    kept: &mut Option<Master>,
    i: u64,
) -> Result<String, String> {
    let mut m = match kept.take() {
        Some(m) => m,
        None => find_master(sentinel, config).await?,
    };
    match redis::cmd("SET").arg("sentinel-client:redis-rs").arg(i).query_async::<()>(&mut m.conn).await {
        Ok(()) => {
            let addr = m.addr.clone();
            *kept = Some(m);
            Ok(addr)
        }
        Err(e) => Err(format!("{} ({e})", m.addr)),
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let version = redis_crate_version();
    if args.lib_version {
        println!("{version}");
        return Ok(());
    }
    eprintln!("redis_rs_sentinel_client: redis crate {version} (redis-rs), features sentinel + tokio-comp");
    let mut sentinel = sentinel_client(&args)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let end = Instant::now() + Duration::try_from_secs_f64(args.duration_s).context("--duration-s")?;
    let mut kept = None;
    let mut i = 0u64;
    // Bounded by --duration-s; each turn takes at most a lookup, a connect
    // and a reply timeout.
    while Instant::now() < end {
        i += 1;
        let line = match write_once(&mut sentinel, &config, &mut kept, i).await {
            Ok(master) => serde_json::json!({"client": "redis-rs", "ok": true, "master": master, "t": unix_now()}),
            Err(e) => {
                let error: String = e.chars().take(200).collect();
                serde_json::json!({"client": "redis-rs", "ok": false, "error": error, "t": unix_now()})
            }
        };
        // stdout is line-buffered: each line reaches the script as written.
        // Without a reader (a closed pipe) there is nothing left to report.
        if writeln!(std::io::stdout(), "{line}").is_err() {
            break;
        }
        tokio::time::sleep(PAUSE).await;
    }
    Ok(())
}

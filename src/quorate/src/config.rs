//! The configuration of each process: [`ServerConfig`] for `quorate server`,
//! [`AgentConfig`] for `quorate agent`. One struct per process, validated at
//! start-up, units in every name.
//!
//! Sources, lowest precedence first: built-in defaults, the TOML file given
//! with `--config`, command-line flags; [`load`] is the one merge both
//! processes use. `validate` checks each value (and, for the server, the
//! timing relationships between them) and names the field in every error.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use quorate_core::LeaseTiming;
use quorate_core::names::{self, NameKind};
use serde::de::DeserializeOwned;

use crate::redis_access::{PASSWORD_ENV, RedisAccess, RedisTls, Secret};
use crate::tls::config::TlsFiles;
use serde::{Deserialize, Serialize};

mod default_toml;

/// Everything a coordinator node needs to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// This node's Raft id; must be one of `peers`.
    pub node_id: u64,
    /// The address the gRPC server (API and Raft) binds, HOST:PORT.
    pub listen: String,
    /// Where the Raft log, vote and snapshots are kept.
    pub data_dir: PathBuf,
    /// Every cluster member, `ID=HOST:PORT` separated by commas. The address
    /// is what the other nodes and clients dial.
    pub peers: String,
    /// How often the Raft leader sends heartbeats.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time in
    /// [min, max) starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Shortest lease TTL clients may ask for. Must exceed
    /// `election_timeout_max_ms`: a shorter lease would lapse during every
    /// leader change.
    pub min_lease_ttl_ms: u64,
    /// Longest lease TTL clients may ask for.
    pub max_lease_ttl_ms: u64,
    /// Write every renewal to the Raft log before answering it (one
    /// durable write each). Off by default: the leader confirms a renewal
    /// with a quorum round started after its receipt and logs renewals in
    /// batches (README: "Renewals without a log write each"); grants and
    /// releases are always logged.
    pub durable_renewals: bool,
    /// How often the leader logs the renewals it confirmed since the last
    /// batch, so that followers, watchers and elections see leases kept
    /// up. At most a quarter of `min_lease_ttl_ms`.
    pub renewal_flush_interval_ms: u64,
    /// The largest rate difference between any two clocks, in parts per
    /// million. Leases are only safe while real drift stays below this.
    pub max_clock_drift_ppm: u64,
    /// Safety margin added to every lease wait and subtracted from every
    /// holder's validity.
    pub lease_margin_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries...
    pub snapshot_every_entries: u64,
    /// ... or once the entries since the last snapshot hold this many bytes...
    pub snapshot_max_log_bytes: u64,
    /// ... or when this long has passed since the last one and anything was
    /// applied since. The three bound the log on disk and what a restart
    /// or a follower that fell behind must replay.
    pub snapshot_every_ms: u64,
    /// The most groups this cluster holds; creating one more is refused
    /// with RESOURCE_EXHAUSTED (every coordinator observes every group, so
    /// this bounds the work of each round and the replicated state).
    pub max_groups: u64,
    /// The most Watch streams this node serves at once; one more is refused
    /// with RESOURCE_EXHAUSTED (each holds a task and a buffer of events).
    pub max_watch_streams: u64,
    /// The most Watch streams one client connection may hold open at once,
    /// so one client cannot take every stream of `max_watch_streams`.
    pub max_watch_streams_per_connection: u64,
    /// The most reports a second one member identity may send (with a
    /// burst of as many); beyond it a report is refused with
    /// RESOURCE_EXHAUSTED. Coordinator nodes are exempt.
    pub max_reports_per_s: u64,
    /// The cluster CA's certificate (PEM): every client and peer must
    /// present a certificate it signed. With `tls_cert` and `tls_key`;
    /// required unless `insecure`.
    pub tls_ca: PathBuf,
    /// This node's certificate (PEM, `quorate certs issue --role node`),
    /// valid for its listen address.
    pub tls_cert: PathBuf,
    /// This node's private key (PEM).
    pub tls_key: PathBuf,
    /// Serve plain text, without TLS: anyone who can reach the port can
    /// then report, take leases and switch over. Refused together with the
    /// `tls_*` files; without either, the node refuses to start.
    pub insecure: bool,
    /// The user this node's Redis connections (heartbeat stores) log in as
    /// (Redis ACL); needs a password. Empty: the `default` user.
    pub redis_username: String,
    /// A file holding the password of those connections (one line; a
    /// trailing newline is dropped). Or `QUORATE_REDIS_PASSWORD`, not both.
    /// Only for URLs that carry no credentials of their own.
    pub redis_password_file: PathBuf,
    /// The CA (PEM) of the Redis servers; required for `rediss://` URLs.
    pub redis_tls_ca: PathBuf,
    /// A client certificate (PEM) for Redis servers that ask for one
    /// (`tls-auth-clients yes`), with `redis_tls_key`.
    pub redis_tls_cert: PathBuf,
    /// Its private key (PEM).
    pub redis_tls_key: PathBuf,
    /// The plain-HTTP listener of the health endpoints (`/livez`,
    /// `/readyz`, `/leader`) and `/metrics`, IP:PORT; empty: none. Apart
    /// from the gRPC port so load balancers and Prometheus need no client
    /// certificate; it only reads.
    pub http_listen: String,
    /// The Redis Sentinel-compatible discovery endpoint (RESP over plain
    /// TCP, or TLS with `sentinel_tls`; see `sentinel`) binds this IP:PORT;
    /// empty: off.
    pub sentinel_listen: String,
    /// Every coordinator's Sentinel address as clients reach it,
    /// `ID=HOST:PORT,...` (the ids of `peers`), for `SENTINEL sentinels`.
    /// Empty: each peer's host (from `peers`) with this node's
    /// `sentinel_listen` port.
    pub sentinel_peers: String,
    /// A file holding the password Sentinel clients must give (`AUTH pass`,
    /// requirepass-style; one line, a trailing newline is dropped). Empty:
    /// no password.
    pub sentinel_password_file: PathBuf,
    /// The most client connections the Sentinel endpoint serves at once;
    /// one more is told so and closed.
    pub sentinel_max_connections: u64,
    /// Serve the Sentinel endpoint over TLS only (as Redis's `tls-port`),
    /// with this node's `tls_cert` and `tls_key`: clients connect with
    /// `rediss://` and verify it against `tls_ca`. Needs `sentinel_listen`
    /// and the node's certificates (not `insecure`).
    pub sentinel_tls: bool,
    /// With `sentinel_tls`: require a client certificate signed by
    /// `tls_ca` (Redis's `tls-auth-clients yes`). Off, a client may
    /// present none, since Redis clients usually authenticate with the
    /// password; one it does present is still verified.
    pub sentinel_tls_client_auth: bool,
    /// How far a restore (`restore`) raises every group's epoch: each lease
    /// starts free at its backed-up epoch plus this, so that a fencing
    /// token the old cluster handed out after the backup is never handed
    /// out again (as long as it granted fewer than this many after it).
    pub restore_epoch_bump: u64,
    /// A backup file (`quorate snapshot save`) to seed a new cluster from,
    /// given to the node with the lowest id on its first start, on an empty
    /// `data_dir`. A flag only (`--restore`), never a file key: it is done
    /// once, and a restarted node must not try it again.
    #[serde(skip)]
    pub restore: PathBuf,
    /// UNSAFE, for the fault suite's negative control only: grant leases
    /// without waiting for the previous holder's to expire.
    pub test_only_skip_lease_wait: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let timing = LeaseTiming::default();
        Self {
            node_id: 0,
            listen: String::new(),
            data_dir: PathBuf::new(),
            peers: String::new(),
            // The default 600 ms group lease must survive a leader change:
            // its holder has about 370 ms after its last renewal before it
            // must fence (README: "The budget of a leader change").
            // Followers grant a (pre-)vote only once their leader lease,
            // which openraft sets to election_timeout_max_ms, has run out,
            // and a follower's timer fires election_timeout (sampled in
            // [min, max)) after that lease: an election starts 210-300 ms
            // after the last heartbeat and the first pre-vote succeeds
            // (measured with deploy/bench/leader-change.sh: 270 ms median
            // read gap; it was 420 ms with 150-200). The lease still spans
            // three heartbeats, so two lost ones never let an election
            // through. Shorter heartbeats would also shorten openraft's
            // append deadline (3/4 of the heartbeat), and 40 ms heartbeats
            // made replication under 20% packet loss stall far more often.
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 60,
            election_timeout_max_ms: 150,
            min_lease_ttl_ms: 500,
            max_lease_ttl_ms: 300_000,
            durable_renewals: false,
            renewal_flush_interval_ms: 100,
            max_clock_drift_ppm: timing.max_clock_drift_ppm,
            lease_margin_ms: timing.lease_margin_ms,
            snapshot_every_entries: 5_000,
            snapshot_max_log_bytes: 64 << 20,
            snapshot_every_ms: 300_000,
            max_groups: DEFAULT_MAX_GROUPS,
            // About 50 agents' watches (election and lease) beside the CLI's,
            // on each of the nodes they spread over, with room to spare.
            max_watch_streams: 1024,
            // An agent holds one or two; a process with many leases one each.
            max_watch_streams_per_connection: 64,
            // A member reports at most once per read round (the heartbeat
            // interval, at least 10 ms: 100 a second) when an observation
            // changes, plus its refresh and retries: twice that worst case.
            max_reports_per_s: DEFAULT_MAX_REPORTS_PER_S,
            tls_ca: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            insecure: false,
            redis_username: String::new(),
            redis_password_file: PathBuf::new(),
            redis_tls_ca: PathBuf::new(),
            redis_tls_cert: PathBuf::new(),
            redis_tls_key: PathBuf::new(),
            http_listen: String::new(),
            sentinel_listen: String::new(),
            sentinel_peers: String::new(),
            sentinel_password_file: PathBuf::new(),
            sentinel_max_connections: DEFAULT_SENTINEL_MAX_CONNECTIONS,
            sentinel_tls: false,
            sentinel_tls_client_auth: false,
            restore_epoch_bump: DEFAULT_RESTORE_EPOCH_BUMP,
            restore: PathBuf::new(),
            test_only_skip_lease_wait: false,
        }
    }
}

/// The default epoch bump of a restore, as `etcdutl snapshot restore
/// --bump-revision` suggests it: far more grants than any group makes
/// between a backup and its restore, far below the 2^64 epochs there are.
pub const DEFAULT_RESTORE_EPOCH_BUMP: u64 = 1_000_000;
/// The largest bump: 2^62 leaves every restored epoch room to grow.
const MAX_RESTORE_EPOCH_BUMP: u64 = 1 << 62;

/// The default bound on Sentinel endpoint connections, and its largest value.
pub const DEFAULT_SENTINEL_MAX_CONNECTIONS: u64 = 1024;
const MAX_SENTINEL_CONNECTIONS: u64 = 65_536;

/// Bounds of the snapshot settings: a log of millions of entries or GBs
/// would make restarts and catch-up take minutes.
const MAX_SNAPSHOT_EVERY_ENTRIES: u64 = 1_000_000;
const MIN_SNAPSHOT_LOG_BYTES: u64 = 1 << 20;
const MAX_SNAPSHOT_LOG_BYTES: u64 = 4 << 30;
const MIN_SNAPSHOT_EVERY_MS: u64 = 1_000;
const MAX_SNAPSHOT_EVERY_MS: u64 = 86_400_000;

/// The default bound on the number of groups.
pub const DEFAULT_MAX_GROUPS: u64 = 2048;

/// The default bound on reports per member identity and second.
pub const DEFAULT_MAX_REPORTS_PER_S: u64 = 200;

/// Upper bounds of the request limits: beyond them a limit bounds nothing.
const MAX_WATCH_STREAMS: u64 = 65_536;
const MAX_REPORTS_PER_S: u64 = 100_000;

/// A configuration that cannot be used, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

/// Parses `1=HOST:PORT,2=HOST:PORT,...`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) =
            part.split_once('=').ok_or_else(|| invalid("peers", format!("{part:?} is not ID=HOST:PORT")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| invalid("peers", format!("{id:?} in {part:?} is not a node id (a non-negative integer)")))?;
        let addr = addr.trim();
        check_host_port("peers", addr)?;
        if peers.insert(id, addr.to_owned()).is_some() {
            return Err(invalid("peers", format!("node id {id} is listed twice")));
        }
    }
    Ok(peers)
}

/// `http_listen`: empty (no listener) or an IP:PORT to bind.
fn check_http_listen(addr: &str) -> Result<(), ConfigError> {
    if addr.is_empty() || addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    Err(invalid("http_listen", format!("{addr:?} is not an IP:PORT to bind")))
}

pub fn check_host_port(field: &'static str, addr: &str) -> Result<(), ConfigError> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| invalid(field, format!("{addr:?} is not HOST:PORT")))?;
    if host.is_empty() {
        return Err(invalid(field, format!("{addr:?} has no host")));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(invalid(field, format!("{addr:?} has no valid port (1-65535)"))),
    }
}

/// The names a process gives its TLS settings, for its errors: the config
/// keys or flags of the CA, certificate and key, and of plain text.
#[derive(Debug, Clone, Copy)]
pub struct TlsNames {
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
    pub insecure: &'static str,
    /// The flags that set them, when the names are config keys.
    pub flags: &'static str,
}

/// The server's config keys.
pub const SERVER_TLS_KEYS: TlsNames = TlsNames {
    ca: "tls_ca",
    cert: "tls_cert",
    key: "tls_key",
    insecure: "insecure",
    flags: " (flags --tls-ca, --tls-cert, --tls-key, --insecure)",
};

/// The agent's config keys.
pub const AGENT_TLS_KEYS: TlsNames = TlsNames {
    ca: "tls_ca",
    cert: "tls_cert",
    key: "tls_key",
    insecure: "insecure",
    flags: " (flags --ca, --cert, --key, --insecure)",
};

/// The TLS files of a process: `Some` with all three paths for mutual TLS,
/// `None` when plain text was asked for (`insecure`). Plain text is never
/// a default: without the files and without `insecure` this is an error,
/// and so is asking for both.
pub fn tls_files(
    ca: &Path,
    cert: &Path,
    key: &Path,
    insecure: bool,
    names: TlsNames,
) -> Result<Option<TlsFiles>, ConfigError> {
    let given = [(names.ca, ca), (names.cert, cert), (names.key, key)];
    let missing: Vec<&str> = given.iter().filter(|(_, p)| p.as_os_str().is_empty()).map(|(f, _)| *f).collect();
    match (missing.len(), insecure) {
        (3, true) => Ok(None),
        (3, false) => Err(invalid(
            names.ca,
            format!(
                "missing: every connection is mutual TLS unless {insecure} is given: give {ca}, {cert} and {key} \
                 (`quorate certs init` and `quorate certs issue` make them), or {insecure} for plain text, which \
                 lets anyone who can reach the cluster steer its failovers{flags}",
                flags = names.flags,
                ca = names.ca,
                cert = names.cert,
                key = names.key,
                insecure = names.insecure,
            ),
        )),
        (0, false) => Ok(Some(TlsFiles { ca: ca.to_owned(), cert: cert.to_owned(), key: key.to_owned() })),
        (_, true) => Err(invalid(
            names.insecure,
            format!(
                "conflicts with {}: plain text and TLS at once; drop one",
                given.iter().filter(|(_, p)| !p.as_os_str().is_empty()).map(|(f, _)| *f).collect::<Vec<_>>().join(", ")
            ),
        )),
        (_, false) => Err(invalid(
            missing[0],
            format!(
                "missing: TLS needs all of {}, {}, {} (missing: {})",
                names.ca,
                names.cert,
                names.key,
                missing.join(", ")
            ),
        )),
    }
}

/// How a process reaches Redis: the `redis_*` fields of its config (the
/// same in both). Every path and the username may be empty (not given).
#[derive(Debug, Clone, Copy)]
pub struct RedisOptions<'a> {
    pub username: &'a str,
    pub password_file: &'a Path,
    pub tls_ca: &'a Path,
    pub tls_cert: &'a Path,
    pub tls_key: &'a Path,
}

fn given(p: &Path) -> bool {
    !p.as_os_str().is_empty()
}

/// Reads one PEM file of the `redis_tls_*` fields.
fn read_redis_file(field: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))
}

/// The certificates in a PEM file; at least one.
fn check_certs(field: &'static str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field, format!("{}: not a PEM certificate: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(field, format!("{}: holds no PEM certificate", path.display())));
    }
    Ok(())
}

impl RedisOptions<'_> {
    /// What can be checked without reading anything: a client certificate
    /// comes with its key, and with the CA (it is only used over TLS).
    pub fn check(&self) -> Result<(), ConfigError> {
        match (given(self.tls_cert), given(self.tls_key)) {
            (true, false) => return Err(invalid("redis_tls_key", "missing: redis_tls_cert needs its key")),
            (false, true) => return Err(invalid("redis_tls_cert", "missing: redis_tls_key needs its certificate")),
            _ => {}
        }
        if given(self.tls_cert) && !given(self.tls_ca) {
            return Err(invalid(
                "redis_tls_ca",
                "missing: a client certificate (redis_tls_cert) is only used over rediss://, which needs the CA",
            ));
        }
        if self.username.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("redis_username", "must not contain spaces or control characters"));
        }
        Ok(())
    }

    /// Reads the password and the TLS files, once at start: the access
    /// every Redis connection of the process uses. `env_password` is the
    /// value of `QUORATE_REDIS_PASSWORD` ([`Self::load_from_env`]). Errors
    /// name the field and the file, never what it holds.
    pub fn load(&self, env_password: Option<OsString>) -> Result<RedisAccess, ConfigError> {
        self.check()?;
        let password = self.password(env_password)?;
        if !self.username.is_empty() && password.is_none() {
            return Err(invalid(
                "redis_username",
                format!("needs a password: give redis_password_file or {PASSWORD_ENV}"),
            ));
        }
        let username = (!self.username.is_empty()).then(|| self.username.to_owned());
        Ok(RedisAccess::new(username, password, self.tls()?))
    }

    /// [`Self::load`] with the process's environment.
    pub fn load_from_env(&self) -> Result<RedisAccess, ConfigError> {
        self.load(std::env::var_os(PASSWORD_ENV))
    }

    /// The password, from the file or the environment (one of them at
    /// most); never empty.
    fn password(&self, env: Option<OsString>) -> Result<Option<Secret>, ConfigError> {
        let text = match (given(self.password_file), env) {
            (true, Some(_)) => {
                return Err(invalid(
                    "redis_password_file",
                    format!("given together with {PASSWORD_ENV}: give the password one way only"),
                ));
            }
            (true, None) => {
                let path = self.password_file;
                let raw = std::fs::read_to_string(path)
                    .map_err(|e| invalid("redis_password_file", format!("cannot read {}: {e}", path.display())))?;
                let line = raw.strip_suffix('\n').map_or(raw.as_str(), |l| l.strip_suffix('\r').unwrap_or(l));
                if line.is_empty() {
                    return Err(invalid("redis_password_file", format!("{} is empty", path.display())));
                }
                line.to_owned()
            }
            (false, Some(v)) => {
                let v = v.into_string().map_err(|_| invalid(PASSWORD_ENV, "is not UTF-8"))?;
                if v.is_empty() {
                    return Err(invalid(PASSWORD_ENV, "is set but empty"));
                }
                v
            }
            (false, None) => return Ok(None),
        };
        Ok(Some(Secret::new(text)))
    }

    /// The CA and the client certificate, read and parsed.
    fn tls(&self) -> Result<Option<RedisTls>, ConfigError> {
        if !given(self.tls_ca) {
            return Ok(None);
        }
        let ca = read_redis_file("redis_tls_ca", self.tls_ca)?;
        check_certs("redis_tls_ca", self.tls_ca, &ca)?;
        let client = if given(self.tls_cert) {
            let cert = read_redis_file("redis_tls_cert", self.tls_cert)?;
            check_certs("redis_tls_cert", self.tls_cert, &cert)?;
            let key = read_redis_file("redis_tls_key", self.tls_key)?;
            {
                use rustls_pki_types::PrivateKeyDer;
                use rustls_pki_types::pem::PemObject as _;
                // The parser's error is not shown: it may quote the file.
                PrivateKeyDer::from_pem_slice(&key).map_err(|_| {
                    invalid("redis_tls_key", format!("{}: holds no PEM private key", self.tls_key.display()))
                })?;
            }
            Some((cert, key))
        } else {
            None
        };
        Ok(Some(RedisTls { ca, client }))
    }
}

/// Reads a TOML file (every key optional; unknown keys are an error).
pub fn from_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.display().to_string(), message: e.to_string() })
}

/// The one merge of a process's sources: the defaults, overlaid by the TOML
/// file when one is given, overlaid by `flags` (which sets only the flags the
/// user gave). Not yet validated: the caller validates the result once.
pub fn load<T: Default + DeserializeOwned>(file: Option<&Path>, flags: impl FnOnce(&mut T)) -> Result<T, ConfigError> {
    let mut config = match file {
        Some(p) => from_file(p)?,
        None => T::default(),
    };
    flags(&mut config);
    Ok(config)
}

impl ServerConfig {
    /// Reads a TOML file (every key optional; unknown keys are an error).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        from_file(path)
    }

    /// The TLS files, when all three are given; an error naming the missing
    /// ones when only some are.
    pub fn tls_files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        tls_files(&self.tls_ca, &self.tls_cert, &self.tls_key, self.insecure, SERVER_TLS_KEYS)
    }

    /// The `redis_*` fields.
    pub fn redis_options(&self) -> RedisOptions<'_> {
        RedisOptions {
            username: &self.redis_username,
            password_file: &self.redis_password_file,
            tls_ca: &self.redis_tls_ca,
            tls_cert: &self.redis_tls_cert,
            tls_key: &self.redis_tls_key,
        }
    }

    /// The parsed peer map. Only valid after [`Self::validate`].
    pub fn peer_map(&self) -> BTreeMap<u64, String> {
        parse_peers(&self.peers).unwrap_or_default()
    }

    /// This node's own advertised address.
    pub fn advertised_addr(&self) -> String {
        self.peer_map().get(&self.node_id).cloned().unwrap_or_default()
    }

    /// The lease timing this node stamps on its commands.
    pub fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            max_clock_drift_ppm: self.max_clock_drift_ppm,
            lease_margin_ms: self.lease_margin_ms,
            test_only_skip_wait: self.test_only_skip_lease_wait,
        }
    }

    /// Checks every field and the timing relationships.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_addresses()?;
        check_http_listen(&self.http_listen)?;
        self.tls_files()?;
        self.redis_options().check()?;
        if self.max_groups == 0 {
            return Err(invalid("max_groups", "must be at least 1"));
        }
        self.validate_request_limits()?;
        self.validate_sentinel()?;
        self.validate_raft_timing()?;
        self.validate_lease_timing()?;
        self.validate_snapshots()?;
        self.validate_restore()
    }

    /// The epoch bump, and a restore only where it forms the cluster: the
    /// node with the lowest id (the one that would initialize it).
    fn validate_restore(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_RESTORE_EPOCH_BUMP).contains(&self.restore_epoch_bump) {
            return Err(invalid(
                "restore_epoch_bump",
                format!(
                    "{} is outside 1..={MAX_RESTORE_EPOCH_BUMP}: a restore must raise every epoch",
                    self.restore_epoch_bump
                ),
            ));
        }
        if self.restore.as_os_str().is_empty() {
            return Ok(());
        }
        let lowest = parse_peers(&self.peers)?.keys().next().copied();
        if lowest != Some(self.node_id) {
            return Err(invalid(
                "restore",
                format!(
                    "give --restore to the node that forms the cluster, node {} (the lowest id in peers), not node {}; \
                     the others start empty and receive the state from it",
                    lowest.unwrap_or(0),
                    self.node_id
                ),
            ));
        }
        Ok(())
    }

    /// Where to keep data, what to bind, and a peer list naming this node
    /// once, every address used by one node only.
    fn validate_addresses(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "missing: give --data-dir DIR"));
        }
        if self.listen.is_empty() {
            return Err(invalid("listen", "missing: give --listen HOST:PORT"));
        }
        self.listen
            .parse::<SocketAddr>()
            .map_err(|_| invalid("listen", format!("{:?} is not an IP:PORT to bind", self.listen)))?;
        if self.peers.trim().is_empty() {
            return Err(invalid("peers", "missing: give --peers 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT"));
        }
        let peers = parse_peers(&self.peers)?;
        if !peers.contains_key(&self.node_id) {
            let ids: Vec<String> = peers.keys().map(u64::to_string).collect();
            return Err(invalid(
                "node_id",
                format!("node id {} is not among the peers ({})", self.node_id, ids.join(", ")),
            ));
        }
        let mut seen = BTreeSet::new();
        for (id, addr) in &peers {
            if !seen.insert(addr.as_str()) {
                return Err(invalid(
                    "peers",
                    format!("address {addr} is used by more than one node (again by node {id})"),
                ));
            }
        }
        Ok(())
    }

    /// The Sentinel endpoint: its own address, peers among `peers`, the
    /// password file, TLS (on the node's certificates) and the connection
    /// bound only with an address.
    fn validate_sentinel(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_SENTINEL_CONNECTIONS).contains(&self.sentinel_max_connections) {
            return Err(invalid(
                "sentinel_max_connections",
                format!("{} is outside 1..={MAX_SENTINEL_CONNECTIONS}", self.sentinel_max_connections),
            ));
        }
        if self.sentinel_tls_client_auth && !self.sentinel_tls {
            return Err(invalid(
                "sentinel_tls_client_auth",
                "given without sentinel_tls: client certificates are only asked for over TLS",
            ));
        }
        if self.sentinel_listen.is_empty() {
            for (field, given) in [
                ("sentinel_peers", !self.sentinel_peers.trim().is_empty()),
                ("sentinel_password_file", !self.sentinel_password_file.as_os_str().is_empty()),
                ("sentinel_tls", self.sentinel_tls),
            ] {
                if given {
                    return Err(invalid(field, "given without sentinel_listen (the Sentinel endpoint is off)"));
                }
            }
            return Ok(());
        }
        if self.sentinel_tls && self.insecure {
            return Err(invalid(
                "sentinel_tls",
                "needs this node's certificate and key (tls_cert, tls_key), and insecure runs without them",
            ));
        }
        let addr: SocketAddr = self
            .sentinel_listen
            .parse()
            .map_err(|_| invalid("sentinel_listen", format!("{:?} is not an IP:PORT to bind", self.sentinel_listen)))?;
        if self.listen.parse::<SocketAddr>().is_ok_and(|l| l == addr) {
            return Err(invalid("sentinel_listen", "is the same address as listen: give it a port of its own"));
        }
        let peers = parse_peers(&self.peers)?;
        let sentinels = parse_peers(&self.sentinel_peers).map_err(|e| match e {
            ConfigError::Invalid { message, .. } => invalid("sentinel_peers", message),
            other => other,
        })?;
        if let Some(id) = sentinels.keys().find(|id| !peers.contains_key(id)) {
            return Err(invalid("sentinel_peers", format!("node id {id} is not among the peers")));
        }
        if !sentinels.is_empty() && sentinels.len() != peers.len() {
            return Err(invalid("sentinel_peers", "must name every node of peers, or be empty"));
        }
        Ok(())
    }

    /// Every coordinator's Sentinel address (node id to HOST:PORT), this
    /// node's included: `sentinel_peers`, or each peer's host with this
    /// node's Sentinel port. Empty when the endpoint is off. Only valid
    /// after [`Self::validate`].
    pub fn sentinel_peer_map(&self) -> BTreeMap<u64, String> {
        if self.sentinel_listen.is_empty() {
            return BTreeMap::new();
        }
        let given = parse_peers(&self.sentinel_peers).unwrap_or_default();
        if !given.is_empty() {
            return given;
        }
        let port = self.sentinel_listen.rsplit_once(':').map_or("", |(_, p)| p).to_owned();
        self.peer_map()
            .into_iter()
            .map(|(id, addr)| {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h).to_owned();
                (id, format!("{host}:{port}"))
            })
            .collect()
    }

    /// [`Self::sentinel_peer_map`] for the membership `members` (node id to
    /// gRPC address): its nodes only, a node missing from the map at its
    /// gRPC host with this node's Sentinel port. An empty membership (not
    /// learned yet) gives the configured map.
    pub fn sentinel_peers_of(&self, members: &BTreeMap<u64, String>) -> BTreeMap<u64, String> {
        let configured = self.sentinel_peer_map();
        if members.is_empty() || self.sentinel_listen.is_empty() {
            return configured;
        }
        let port = self.sentinel_listen.rsplit_once(':').map_or("", |(_, p)| p);
        members
            .iter()
            .map(|(id, addr)| {
                let derived = || format!("{}:{port}", addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h));
                (*id, configured.get(id).cloned().unwrap_or_else(derived))
            })
            .collect()
    }

    /// Reads the Sentinel password file, once at start (None: no password).
    /// Errors name the field and the file, never what it holds.
    pub fn sentinel_password(&self) -> Result<Option<String>, ConfigError> {
        let path = &self.sentinel_password_file;
        if path.as_os_str().is_empty() {
            return Ok(None);
        }
        let raw = std::fs::read_to_string(path)
            .map_err(|e| invalid("sentinel_password_file", format!("cannot read {}: {e}", path.display())))?;
        let line = raw.strip_suffix('\n').map_or(raw.as_str(), |l| l.strip_suffix('\r').unwrap_or(l));
        if line.is_empty() || line.contains(['\r', '\n']) {
            return Err(invalid("sentinel_password_file", format!("{} must hold one non-empty line", path.display())));
        }
        Ok(Some(line.to_owned()))
    }

    /// Heartbeats, elections and the lease bounds: an election must not start
    /// on two lost heartbeats, nor a lease lapse during every leader change.
    fn validate_raft_timing(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval_ms == 0 {
            return Err(invalid("heartbeat_interval_ms", "must be positive"));
        }
        // What keeps a working leader in office is not the election timer
        // but the leader lease, election_timeout_max_ms: a follower refuses
        // every (pre-)vote until that long after it last heard the leader,
        // and every election starts with a pre-vote (raft::node). So the
        // lease must outlast lost heartbeats, while the timer's minimum only
        // sets how soon a follower asks again once the lease has run out.
        if self.election_timeout_max_ms < 3 * self.heartbeat_interval_ms {
            return Err(invalid(
                "election_timeout_max_ms",
                format!(
                    "{} ms is less than 3 x heartbeat_interval_ms ({} ms): two lost heartbeats would let an election through",
                    self.election_timeout_max_ms, self.heartbeat_interval_ms
                ),
            ));
        }
        if self.election_timeout_min_ms <= self.heartbeat_interval_ms {
            return Err(invalid(
                "election_timeout_min_ms",
                format!(
                    "{} ms must be above heartbeat_interval_ms ({} ms)",
                    self.election_timeout_min_ms, self.heartbeat_interval_ms
                ),
            ));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(invalid(
                "election_timeout_max_ms",
                format!(
                    "{} ms must be above election_timeout_min_ms ({} ms)",
                    self.election_timeout_max_ms, self.election_timeout_min_ms
                ),
            ));
        }
        if self.min_lease_ttl_ms <= self.election_timeout_max_ms {
            return Err(invalid(
                "min_lease_ttl_ms",
                format!(
                    "{} ms must be above election_timeout_max_ms ({} ms): a shorter lease would lapse during every Raft leader change",
                    self.min_lease_ttl_ms, self.election_timeout_max_ms
                ),
            ));
        }
        if self.renewal_flush_interval_ms == 0 || self.renewal_flush_interval_ms > self.min_lease_ttl_ms / 4 {
            return Err(invalid(
                "renewal_flush_interval_ms",
                format!(
                    "{} ms must be positive and at most a quarter of min_lease_ttl_ms ({} ms): followers would see leases lapse between batches",
                    self.renewal_flush_interval_ms, self.min_lease_ttl_ms
                ),
            ));
        }
        if self.max_lease_ttl_ms < self.min_lease_ttl_ms {
            return Err(invalid(
                "max_lease_ttl_ms",
                format!("{} ms is below min_lease_ttl_ms ({} ms)", self.max_lease_ttl_ms, self.min_lease_ttl_ms),
            ));
        }
        Ok(())
    }

    /// The clock-drift bound and margin must leave a holder valid time for
    /// at least one renewal of the shortest lease.
    fn validate_lease_timing(&self) -> Result<(), ConfigError> {
        let timing = self.lease_timing();
        timing.validate().map_err(|e| invalid("max_clock_drift_ppm", e.to_string()))?;
        if timing.holder_valid_for_ms(self.min_lease_ttl_ms) <= timing.renew_interval_ms(self.min_lease_ttl_ms) {
            return Err(invalid(
                "lease_margin_ms",
                format!(
                    "{} ms leaves a {} ms lease less valid time than one renewal interval; lower the margin or raise min_lease_ttl_ms",
                    self.lease_margin_ms, self.min_lease_ttl_ms
                ),
            ));
        }
        Ok(())
    }

    /// Watch streams and report rates: at least one, at most a bound that
    /// still limits something, and per connection no more than in total.
    fn validate_request_limits(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_WATCH_STREAMS).contains(&self.max_watch_streams) {
            return Err(invalid(
                "max_watch_streams",
                format!("{} is outside 1..={MAX_WATCH_STREAMS}", self.max_watch_streams),
            ));
        }
        if !(1..=self.max_watch_streams).contains(&self.max_watch_streams_per_connection) {
            return Err(invalid(
                "max_watch_streams_per_connection",
                format!(
                    "{} is outside 1..=max_watch_streams ({})",
                    self.max_watch_streams_per_connection, self.max_watch_streams
                ),
            ));
        }
        if !(1..=MAX_REPORTS_PER_S).contains(&self.max_reports_per_s) {
            return Err(invalid(
                "max_reports_per_s",
                format!("{} is outside 1..={MAX_REPORTS_PER_S}", self.max_reports_per_s),
            ));
        }
        Ok(())
    }

    /// Snapshot triggers within their documented ranges.
    fn validate_snapshots(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_SNAPSHOT_EVERY_ENTRIES).contains(&self.snapshot_every_entries) {
            return Err(invalid(
                "snapshot_every_entries",
                format!("{} is outside 1..={MAX_SNAPSHOT_EVERY_ENTRIES}", self.snapshot_every_entries),
            ));
        }
        if !(MIN_SNAPSHOT_LOG_BYTES..=MAX_SNAPSHOT_LOG_BYTES).contains(&self.snapshot_max_log_bytes) {
            return Err(invalid(
                "snapshot_max_log_bytes",
                format!(
                    "{} is outside {MIN_SNAPSHOT_LOG_BYTES}..={MAX_SNAPSHOT_LOG_BYTES} (1 MiB to 4 GiB)",
                    self.snapshot_max_log_bytes
                ),
            ));
        }
        if !(MIN_SNAPSHOT_EVERY_MS..=MAX_SNAPSHOT_EVERY_MS).contains(&self.snapshot_every_ms) {
            return Err(invalid(
                "snapshot_every_ms",
                format!(
                    "{} ms is outside {MIN_SNAPSHOT_EVERY_MS}..={MAX_SNAPSHOT_EVERY_MS} ms (1 s to 1 day)",
                    self.snapshot_every_ms
                ),
            ));
        }
        Ok(())
    }
}

/// Which role driver an agent runs for a managed group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// `redis` when the member has a data URL in the group spec, else `none`.
    #[default]
    Auto,
    /// Promote, demote and fence the member's Redis (`REPLICAOF`, `CLIENT PAUSE`).
    Redis,
    /// Run the configured hooks ([`ExecHooks`]).
    Exec,
    /// Act on nothing: the agent only heartbeats, reports and holds the lease.
    None,
}

impl DriverKind {
    /// Every kind, in the order the help text lists them.
    pub const ALL: [DriverKind; 4] = [DriverKind::Auto, DriverKind::Redis, DriverKind::Exec, DriverKind::None];

    /// The name used in files and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Auto => "auto",
            DriverKind::Redis => "redis",
            DriverKind::Exec => "exec",
            DriverKind::None => "none",
        }
    }
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DriverKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
            format!("{s:?} is not one of {}", names.join(", "))
        })
    }
}

/// Commands the exec driver runs; each may be empty. Each runs with
/// `QUORATE_GROUP`, `QUORATE_MEMBER`, `QUORATE_EPOCH` and `QUORATE_ROLE` set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecHooks {
    /// Run on promotion to primary.
    pub promote: String,
    /// Run on demotion to replica.
    pub demote: String,
    /// Run to fence (stop acting as primary at once), at the lease deadline.
    pub fence: String,
}

/// Everything an agent process needs to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The failover group.
    pub group: String,
    /// This member's id in the group.
    pub member: String,
    /// Coordinator endpoints, HOST:PORT separated by commas.
    pub endpoints: String,
    /// Role driver for a managed group.
    pub driver: DriverKind,
    /// Commands of the exec driver.
    pub hooks: ExecHooks,
    /// The cluster CA's certificate (PEM); with `tls_cert` and `tls_key`
    /// every call to the coordinators is mutual TLS.
    pub tls_ca: PathBuf,
    /// This member's certificate (`quorate certs issue --role member`).
    pub tls_cert: PathBuf,
    /// Its private key.
    pub tls_key: PathBuf,
    /// Talk to the coordinators in plain text (they must serve it too).
    /// Refused together with the `tls_*` files.
    pub insecure: bool,
    /// The user the agent's Redis connections (heartbeat stores, the data
    /// service) log in as; needs a password. Empty: the `default` user.
    pub redis_username: String,
    /// A file holding their password (or `QUORATE_REDIS_PASSWORD`, not
    /// both); only for URLs that carry no credentials of their own.
    pub redis_password_file: PathBuf,
    /// The CA (PEM) of the Redis servers; required for `rediss://` URLs.
    pub redis_tls_ca: PathBuf,
    /// A client certificate (PEM) for `tls-auth-clients yes`, with
    /// `redis_tls_key`.
    pub redis_tls_cert: PathBuf,
    /// Its private key (PEM).
    pub redis_tls_key: PathBuf,
    /// The plain-HTTP listener of the health endpoints (`/primary`,
    /// `/replica`, ...) and `/metrics`, IP:PORT; empty: none.
    pub http_listen: String,
    /// UNSAFE, for the fault suite's negative control only: never fence.
    #[serde(skip)]
    pub test_only_no_deadline_fence: bool,
}

impl AgentConfig {
    /// The TLS files, or `None` for plain text (`insecure`); an error when
    /// neither or both are given.
    pub fn tls_files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        tls_files(&self.tls_ca, &self.tls_cert, &self.tls_key, self.insecure, AGENT_TLS_KEYS)
    }

    /// The `redis_*` fields.
    pub fn redis_options(&self) -> RedisOptions<'_> {
        RedisOptions {
            username: &self.redis_username,
            password_file: &self.redis_password_file,
            tls_ca: &self.redis_tls_ca,
            tls_cert: &self.redis_tls_cert,
            tls_key: &self.redis_tls_key,
        }
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        names::validate(NameKind::Group, &self.group).map_err(|e| invalid("group", e.to_string()))?;
        names::validate(NameKind::Member, &self.member).map_err(|e| invalid("member", e.to_string()))?;
        if self.endpoints.trim().is_empty() {
            return Err(invalid("endpoints", "missing: give --endpoints HOST:PORT,..."));
        }
        self.tls_files()?;
        self.redis_options().check()?;
        check_http_listen(&self.http_listen)?;
        if self.driver == DriverKind::Exec && self.hooks == ExecHooks::default() {
            return Err(invalid("hooks", "the exec driver needs at least one of promote, demote, fence"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> ServerConfig {
        ServerConfig {
            node_id: 1,
            listen: "127.0.0.1:7101".into(),
            data_dir: "/tmp/x".into(),
            peers: "1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103".into(),
            insecure: true,
            ..ServerConfig::default()
        }
    }

    fn err(c: &ServerConfig) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_with_required_fields_are_valid() {
        good().validate().unwrap();
        assert_eq!(good().advertised_addr(), "127.0.0.1:7101");
    }

    #[test]
    fn each_mistake_is_named() {
        let c = ServerConfig { node_id: 4, ..good() };
        assert_eq!(err(&c), "node_id: node id 4 is not among the peers (1, 2, 3)");
        let c = ServerConfig { peers: "1=127.0.0.1:7101,2=127.0.0.1:7101".into(), ..good() };
        assert!(err(&c).contains("address 127.0.0.1:7101 is used by more than one node"), "{}", err(&c));
        let c = ServerConfig { peers: "1=127.0.0.1:7101,1=127.0.0.1:7102".into(), ..good() };
        assert!(err(&c).contains("node id 1 is listed twice"));
        let c = ServerConfig { peers: "1=127.0.0.1".into(), ..good() };
        assert!(err(&c).starts_with("peers:"));
        let c = ServerConfig { election_timeout_min_ms: 100, election_timeout_max_ms: 140, ..good() };
        assert!(
            err(&c).starts_with("election_timeout_max_ms: 140 ms is less than 3 x heartbeat_interval_ms"),
            "{}",
            err(&c)
        );
        let c = ServerConfig { election_timeout_min_ms: 50, ..good() };
        assert!(
            err(&c).starts_with("election_timeout_min_ms: 50 ms must be above heartbeat_interval_ms"),
            "{}",
            err(&c)
        );
        let c = ServerConfig { election_timeout_max_ms: 60, ..good() };
        assert!(err(&c).starts_with("election_timeout_max_ms:"));
        let c = ServerConfig { min_lease_ttl_ms: 150, renewal_flush_interval_ms: 30, ..good() };
        assert!(err(&c).contains("lapse during every Raft leader change"));
        let c = ServerConfig { max_lease_ttl_ms: 10, ..good() };
        assert!(err(&c).starts_with("max_lease_ttl_ms:"));
        let c = ServerConfig { renewal_flush_interval_ms: 126, ..good() };
        assert!(err(&c).starts_with("renewal_flush_interval_ms: 126 ms must be positive and at most a quarter"));
        let c = ServerConfig { renewal_flush_interval_ms: 0, ..good() };
        assert!(err(&c).starts_with("renewal_flush_interval_ms:"));
        let c = ServerConfig { lease_margin_ms: 400, ..good() };
        assert!(err(&c).starts_with("lease_margin_ms:"));
        let c = ServerConfig { listen: "nowhere".into(), ..good() };
        assert!(err(&c).starts_with("listen:"));
        let c = ServerConfig { data_dir: PathBuf::new(), ..good() };
        assert!(err(&c).starts_with("data_dir:"));
        let c = ServerConfig { snapshot_every_entries: u64::MAX, ..good() };
        assert!(err(&c).starts_with("snapshot_every_entries:"), "{}", err(&c));
        let c = ServerConfig { snapshot_max_log_bytes: 10, ..good() };
        assert!(err(&c).starts_with("snapshot_max_log_bytes:"), "{}", err(&c));
        let c = ServerConfig { snapshot_every_ms: 0, ..good() };
        assert!(err(&c).starts_with("snapshot_every_ms:"), "{}", err(&c));
        let c = ServerConfig { http_listen: "nowhere".into(), ..good() };
        assert!(err(&c).starts_with("http_listen:"), "{}", err(&c));
        ServerConfig { http_listen: "127.0.0.1:8080".into(), ..good() }.validate().unwrap();
    }

    #[test]
    fn plain_text_is_asked_for_never_a_default() {
        let plain = ServerConfig { insecure: false, ..good() };
        assert!(
            err(&plain).starts_with("tls_ca: missing: every connection is mutual TLS unless insecure"),
            "{}",
            err(&plain)
        );
        let tls = ServerConfig {
            insecure: false,
            tls_ca: "ca.crt".into(),
            tls_cert: "node-1.crt".into(),
            tls_key: "node-1.key".into(),
            ..good()
        };
        tls.validate().unwrap();
        assert_eq!(tls.tls_files().unwrap().unwrap().cert, PathBuf::from("node-1.crt"));
        let both = ServerConfig { insecure: true, ..tls.clone() };
        assert_eq!(
            err(&both),
            "insecure: conflicts with tls_ca, tls_cert, tls_key: plain text and TLS at once; drop one"
        );
        let partial = ServerConfig { tls_key: PathBuf::new(), ..tls };
        assert_eq!(err(&partial), "tls_key: missing: TLS needs all of tls_ca, tls_cert, tls_key (missing: tls_key)");
        assert!(good().tls_files().unwrap().is_none(), "insecure: plain text");
        let agent = AgentConfig { insecure: false, ..good_agent() };
        assert!(agent.validate().unwrap_err().to_string().starts_with("tls_ca: missing:"));
    }

    #[test]
    fn request_limits_are_bounded() {
        let c = ServerConfig { max_watch_streams: 0, ..good() };
        assert_eq!(err(&c), "max_watch_streams: 0 is outside 1..=65536");
        let c = ServerConfig { max_watch_streams: 100_000, ..good() };
        assert!(err(&c).starts_with("max_watch_streams:"), "{}", err(&c));
        let c = ServerConfig { max_watch_streams_per_connection: 0, ..good() };
        assert!(err(&c).starts_with("max_watch_streams_per_connection:"), "{}", err(&c));
        let c = ServerConfig { max_watch_streams: 8, max_watch_streams_per_connection: 9, ..good() };
        assert_eq!(err(&c), "max_watch_streams_per_connection: 9 is outside 1..=max_watch_streams (8)");
        let c = ServerConfig { max_reports_per_s: 0, ..good() };
        assert_eq!(err(&c), "max_reports_per_s: 0 is outside 1..=100000");
        let c = ServerConfig { max_reports_per_s: u64::MAX, ..good() };
        assert!(err(&c).starts_with("max_reports_per_s:"), "{}", err(&c));
        ServerConfig { max_watch_streams: 2, max_watch_streams_per_connection: 2, max_reports_per_s: 1, ..good() }
            .validate()
            .unwrap();
    }

    #[test]
    fn sentinel_settings_are_checked_and_peers_derived() {
        assert!(good().sentinel_peer_map().is_empty(), "off by default");
        let on = ServerConfig { sentinel_listen: "127.0.0.1:7601".into(), ..good() };
        on.validate().unwrap();
        let derived: Vec<String> = on.sentinel_peer_map().into_values().collect();
        assert_eq!(derived, ["127.0.0.1:7601", "127.0.0.1:7601", "127.0.0.1:7601"]);
        let given =
            ServerConfig { sentinel_peers: "1=127.0.0.1:7601,2=127.0.0.1:7602,3=127.0.0.1:7603".into(), ..on.clone() };
        given.validate().unwrap();
        assert_eq!(given.sentinel_peer_map()[&2], "127.0.0.1:7602");
        let c = ServerConfig { sentinel_listen: "nowhere".into(), ..good() };
        assert!(err(&c).starts_with("sentinel_listen:"), "{}", err(&c));
        let c = ServerConfig { sentinel_listen: "127.0.0.1:7101".into(), ..good() };
        assert!(err(&c).contains("same address as listen"), "{}", err(&c));
        let c = ServerConfig { sentinel_peers: "1=127.0.0.1:7601,4=127.0.0.1:7604".into(), ..on.clone() };
        assert_eq!(err(&c), "sentinel_peers: node id 4 is not among the peers");
        let c = ServerConfig { sentinel_peers: "1=127.0.0.1:7601".into(), ..on.clone() };
        assert!(err(&c).starts_with("sentinel_peers: must name every node"), "{}", err(&c));
        let c = ServerConfig { sentinel_peers: "1=127.0.0.1:7601".into(), ..good() };
        assert!(err(&c).starts_with("sentinel_peers: given without sentinel_listen"), "{}", err(&c));
        // The membership decides who is listed: a removed node goes, a
        // node added since comes in at its host and this node's port.
        let members: BTreeMap<u64, String> =
            [(2, "127.0.0.1:7102".to_owned()), (3, "127.0.0.1:7103".to_owned()), (4, "10.0.0.4:7104".to_owned())]
                .into();
        let listed = given.sentinel_peers_of(&members);
        assert_eq!(listed.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(listed[&2], "127.0.0.1:7602");
        assert_eq!(listed[&4], "10.0.0.4:7601");
        assert_eq!(given.sentinel_peers_of(&BTreeMap::new()), given.sentinel_peer_map(), "not learned yet");
        let c = ServerConfig { sentinel_max_connections: 0, ..on.clone() };
        assert!(err(&c).starts_with("sentinel_max_connections:"), "{}", err(&c));
        sentinel_tls_needs_an_address_and_certificates(&on);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let pw = ServerConfig { sentinel_password_file: file.clone(), ..on };
        assert_eq!(pw.sentinel_password().unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        assert!(pw.sentinel_password().unwrap_err().to_string().starts_with("sentinel_password_file:"));
    }

    /// `on`: a valid config with the Sentinel endpoint on, `insecure`.
    fn sentinel_tls_needs_an_address_and_certificates(on: &ServerConfig) {
        let secure = ServerConfig {
            insecure: false,
            tls_ca: "ca.crt".into(),
            tls_cert: "node-1.crt".into(),
            tls_key: "node-1.key".into(),
            ..on.clone()
        };
        ServerConfig { sentinel_tls: true, ..secure.clone() }.validate().unwrap();
        ServerConfig { sentinel_tls: true, sentinel_tls_client_auth: true, ..secure.clone() }.validate().unwrap();
        let c = ServerConfig { sentinel_tls: true, ..on.clone() };
        assert_eq!(
            err(&c),
            "sentinel_tls: needs this node's certificate and key (tls_cert, tls_key), and insecure runs without them"
        );
        let c = ServerConfig { sentinel_tls: true, sentinel_listen: String::new(), ..secure.clone() };
        assert_eq!(err(&c), "sentinel_tls: given without sentinel_listen (the Sentinel endpoint is off)");
        let c = ServerConfig { sentinel_tls_client_auth: true, ..secure };
        assert!(err(&c).starts_with("sentinel_tls_client_auth: given without sentinel_tls"), "{}", err(&c));
        assert!(!ServerConfig::default().sentinel_tls && !ServerConfig::default().sentinel_tls_client_auth);
    }

    #[test]
    fn restore_settings_are_checked() {
        let c = ServerConfig { restore_epoch_bump: 0, ..good() };
        assert!(err(&c).starts_with("restore_epoch_bump: 0 is outside 1..="), "{}", err(&c));
        let c = ServerConfig { restore: "/tmp/b.snap".into(), node_id: 2, ..good() };
        assert!(
            err(&c).starts_with("restore: give --restore to the node that forms the cluster, node 1"),
            "{}",
            err(&c)
        );
        ServerConfig { restore: "/tmp/b.snap".into(), ..good() }.validate().unwrap();
        // Never a file key: a restarted node must not restore again.
        let e = toml::from_str::<ServerConfig>("restore = \"/tmp/b.snap\"").unwrap_err().to_string();
        assert!(e.contains("unknown field `restore`"), "{e}");
        assert_eq!(ServerConfig::default().restore_epoch_bump, 1_000_000);
    }

    #[test]
    fn toml_file_round_trip_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml::to_string(&good()).unwrap()).unwrap();
        assert_eq!(ServerConfig::from_file(&p).unwrap(), good());
        std::fs::write(&p, "node_id = 1\nlease_ttl = 5\n").unwrap();
        let e = ServerConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `lease_ttl`"), "{e}");
    }

    fn good_agent() -> AgentConfig {
        AgentConfig {
            group: "g".into(),
            member: "m1".into(),
            endpoints: "127.0.0.1:7101,127.0.0.1:7102".into(),
            insecure: true,
            ..AgentConfig::default()
        }
    }

    #[test]
    fn agent_config_mistakes_are_named() {
        good_agent().validate().unwrap();
        assert_eq!(good_agent().driver, DriverKind::Auto, "auto is the default");
        let e = |c: AgentConfig| c.validate().unwrap_err().to_string();
        assert!(e(AgentConfig { group: String::new(), ..good_agent() }).starts_with("group:"));
        assert!(e(AgentConfig { member: "a b".into(), ..good_agent() }).starts_with("member:"));
        assert!(e(AgentConfig { endpoints: " ".into(), ..good_agent() }).starts_with("endpoints: missing"));
        assert_eq!(
            e(AgentConfig { driver: DriverKind::Exec, ..good_agent() }),
            "hooks: the exec driver needs at least one of promote, demote, fence"
        );
        let hooks = ExecHooks { fence: "true".into(), ..ExecHooks::default() };
        AgentConfig { driver: DriverKind::Exec, hooks, ..good_agent() }.validate().unwrap();
    }

    #[test]
    fn redis_credentials_are_read_once_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        let with = |f: &dyn Fn(&mut AgentConfig)| {
            let mut c = good_agent();
            f(&mut c);
            c
        };
        let e =
            |c: &AgentConfig, env: Option<&str>| c.redis_options().load(env.map(Into::into)).unwrap_err().to_string();

        // A missing file names the field and the path.
        let c = with(&|c| c.redis_password_file = file.clone());
        assert!(
            e(&c, None).starts_with(&format!("redis_password_file: cannot read {}", file.display())),
            "{}",
            e(&c, None)
        );
        // Empty, or given twice: refused.
        std::fs::write(&file, "\n").unwrap();
        assert_eq!(e(&c, None), format!("redis_password_file: {} is empty", file.display()));
        std::fs::write(&file, "hunter2-secret\n").unwrap();
        let both = e(&c, Some("other-secret"));
        assert!(both.starts_with("redis_password_file: given together with QUORATE_REDIS_PASSWORD"), "{both}");
        assert_eq!(e(&good_agent(), Some("")), "QUORATE_REDIS_PASSWORD: is set but empty");
        // A user needs a password.
        let user = with(&|c| c.redis_username = "hb".into());
        assert!(e(&user, None).starts_with("redis_username: needs a password"), "{}", e(&user, None));
        // A client certificate needs its key and the CA (checked by validate).
        let cert = with(&|c| c.redis_tls_cert = "c.pem".into());
        assert!(cert.validate().unwrap_err().to_string().starts_with("redis_tls_key: missing"));
        let cert = with(&|c| {
            c.redis_tls_cert = "c.pem".into();
            c.redis_tls_key = "k.pem".into();
        });
        assert!(cert.validate().unwrap_err().to_string().starts_with("redis_tls_ca: missing"));
        let ca = with(&|c| c.redis_tls_ca = file.clone());
        assert!(
            e(&ca, None).starts_with("redis_tls_ca:") && e(&ca, None).contains("no PEM certificate"),
            "{}",
            e(&ca, None)
        );

        // The file's password (trailing newline dropped) is never printed.
        let access = c.redis_options().load(None).unwrap();
        assert!(access.has_password());
        let shown = format!("{access:?} {c:?}");
        assert!(!shown.contains("hunter2") && shown.contains("***"), "{shown}");
        let access = good_agent().redis_options().load(Some("env-secret".into())).unwrap();
        assert!(access.has_password() && !format!("{access:?}").contains("env-secret"));
        assert!(!good_agent().redis_options().load(None).unwrap().has_password());
        // The server reads the same fields.
        let server = ServerConfig { redis_password_file: file.clone(), ..good() };
        assert!(server.redis_options().load(None).unwrap().has_password());
    }

    #[test]
    fn driver_names_parse_and_print_both_ways() {
        for k in DriverKind::ALL {
            assert_eq!(k.as_str().parse::<DriverKind>().unwrap(), k);
        }
        assert_eq!("systemd".parse::<DriverKind>().unwrap_err(), r#""systemd" is not one of auto, redis, exec, none"#);
    }

    #[test]
    fn agent_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "group = \"g\"\nmember = \"m1\"\ndriver = \"exec\"\n[hooks]\nfence = \"true\"\n").unwrap();
        let c: AgentConfig = load(Some(&p), |c: &mut AgentConfig| c.member = "m2".into()).unwrap();
        assert_eq!(
            (c.group.as_str(), c.member.as_str(), c.driver),
            ("g", "m2", DriverKind::Exec),
            "a flag wins over the file"
        );
        assert_eq!(c.hooks.fence, "true");
        std::fs::write(&p, "driver = \"systemd\"\n").unwrap();
        let e = load::<AgentConfig>(Some(&p), |_| {}).unwrap_err().to_string();
        assert!(e.contains("agent.toml") && e.contains("unknown variant `systemd`"), "{e}");
    }
}

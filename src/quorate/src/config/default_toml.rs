//! `quorate server --print-default-config`: every key of [`ServerConfig`]
//! with its default, commented, as a TOML file that `--check-config`
//! accepts back.
//!
//! The keys and values come from serializing the struct itself, so the
//! file cannot miss a key or show a stale default; only the comments are
//! written here, one per key, and a test fails when a key has none (or a
//! comment has no key).

use std::path::PathBuf;

use super::ServerConfig;

/// One comment line per key, in no particular order.
const KEY_DOCS: &[(&str, &str)] = &[
    ("node_id", "Required. This node's Raft id; must be one of the ids in peers."),
    ("listen", "Required. IP:PORT to bind (the API and Raft share it)."),
    ("data_dir", "Required. The Raft log, vote and snapshots (raft.redb)."),
    ("peers", "Required. Every node, ID=HOST:PORT separated by commas (no duplicate ids or addresses)."),
    ("heartbeat_interval_ms", "Raft heartbeat."),
    ("election_timeout_min_ms", "At least 3 x heartbeat_interval_ms."),
    ("election_timeout_max_ms", "Above election_timeout_min_ms; an election takes about two timeouts."),
    ("min_lease_ttl_ms", "Shortest lease TTL clients may ask for; above election_timeout_max_ms."),
    ("max_lease_ttl_ms", "Longest lease TTL clients may ask for; at least min_lease_ttl_ms."),
    ("durable_renewals", "Log every renewal before answering it; false: quorum-confirmed, logged in batches."),
    (
        "renewal_flush_interval_ms",
        "How often the leader logs the renewals it confirmed (at most min_lease_ttl_ms / 4).",
    ),
    ("max_clock_drift_ppm", "The clock drift bound leases rely on (below 500000)."),
    ("lease_margin_ms", "Added to every grant wait, subtracted from every holder's deadline."),
    ("snapshot_every_entries", "Snapshot and compact the log after this many entries (at most 1000000)..."),
    ("snapshot_max_log_bytes", "... or once the log since the last snapshot holds this many bytes (1 MiB to 4 GiB)..."),
    ("snapshot_every_ms", "... or when this long passed with anything applied since (1 s to 1 day)."),
    ("max_groups", "Creating one more group is refused with RESOURCE_EXHAUSTED."),
    ("max_watch_streams", "Watch streams this node serves at once (1 to 65536)."),
    ("max_watch_streams_per_connection", "Watch streams one client connection may hold (1 to max_watch_streams)."),
    ("max_reports_per_s", "Reports a second per member identity, with a burst of as many (1 to 100000)."),
    ("tls_ca", "Mutual TLS: the cluster CA (PEM). tls_ca, tls_cert and tls_key are required unless insecure."),
    ("tls_cert", "This node's certificate (quorate certs issue --role node)."),
    ("tls_key", "This node's private key."),
    ("insecure", "Serve plain text: anyone who can reach the port can do anything. Refused with tls_*."),
    ("redis_username", "The Redis ACL user heartbeat store connections log in as (needs a password)."),
    ("redis_password_file", "A one-line file with that password (or QUORATE_REDIS_PASSWORD, not both)."),
    ("redis_tls_ca", "The Redis servers' CA (PEM); required for rediss:// heartbeat URLs."),
    ("redis_tls_cert", "A client certificate for Redis servers that ask for one, with redis_tls_key."),
    ("redis_tls_key", "Its private key."),
    ("http_listen", "IP:PORT of the plain-HTTP health and metrics listener; empty: off."),
    ("sentinel_listen", "IP:PORT of the Redis Sentinel-compatible endpoint; empty: off."),
    ("sentinel_peers", "Every node's Sentinel address, ID=HOST:PORT,...; empty: each peer's host, this port."),
    ("sentinel_password_file", "A one-line file: Sentinel clients must AUTH with it; empty: no password."),
    ("sentinel_max_connections", "Connections the Sentinel endpoint serves at once (1 to 65536)."),
    ("sentinel_tls", "Serve the Sentinel endpoint over TLS only, on this node's certificate."),
    ("sentinel_tls_client_auth", "With sentinel_tls: require a client certificate signed by tls_ca."),
    (
        "restore_epoch_bump",
        "A restore (--restore FILE, a flag only) raises every epoch by this (at least 1), so that no fencing token is reused.",
    ),
    ("test_only_skip_lease_wait", "UNSAFE, for the fault suite's negative control only. Leave it false."),
];

/// The values the default file shows for keys that have no default: an
/// example of each, which the check accepts (paths are not opened).
fn example() -> ServerConfig {
    ServerConfig {
        node_id: 1,
        listen: "127.0.0.1:7101".into(),
        data_dir: PathBuf::from("/var/lib/quorate"),
        peers: "1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103".into(),
        tls_ca: PathBuf::from("/etc/quorate/tls/ca.crt"),
        tls_cert: PathBuf::from("/etc/quorate/tls/node-1.crt"),
        tls_key: PathBuf::from("/etc/quorate/tls/node-1.key"),
        ..ServerConfig::default()
    }
}

impl ServerConfig {
    /// Every key with its default (the required ones with an example), each
    /// under a comment, as TOML.
    pub fn default_toml() -> String {
        let body = toml::to_string(&example()).unwrap_or_else(|e| format!("# cannot encode the defaults: {e}\n"));
        let mut out = String::from(
            "# quorate server configuration: every key with its default (`quorate server \
             --print-default-config`).\n# Keys marked Required have no default: the values shown are examples. \
             Check a file with\n# `quorate server --check-config FILE`; flags override the file.\n",
        );
        for line in body.lines() {
            let key = line.split_once(" = ").map_or("", |(k, _)| k.trim());
            if let Some((_, doc)) = KEY_DOCS.iter().find(|(k, _)| *k == key) {
                out.push_str(&format!("\n# {doc}\n"));
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_shown_with_a_comment_and_checks_back() {
        let text = ServerConfig::default_toml();
        let parsed: ServerConfig = toml::from_str(&text).expect("the default file parses");
        assert_eq!(parsed, example(), "the file holds exactly the defaults (and examples)");
        parsed.validate().expect("and validates");
        // Every key of the struct, each under its comment, and no comment
        // for a key that does not exist.
        let keys: Vec<String> = toml::to_string(&example())
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim().to_owned()))
            .collect();
        assert_eq!(keys.len(), KEY_DOCS.len(), "keys {keys:?}");
        for k in &keys {
            let doc = KEY_DOCS.iter().find(|(d, _)| d == k).unwrap_or_else(|| panic!("no comment for {k}")).1;
            assert!(text.contains(&format!("# {doc}\n{k} = ")), "{k} is not under its comment");
        }
        assert!(text.contains("restore_epoch_bump = 1000000\n"));
        assert!(!text.contains("\nrestore ="), "restore is a flag, not a key");
    }
}

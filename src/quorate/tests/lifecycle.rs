//! Group lifecycle, backup and restore, and the config commands, on real
//! processes: `quorate group delete` (refused with a live primary, allowed
//! with `--force`, and the group's lease, views and history gone),
//! `quorate snapshot save` and `quorate server --restore` into a fresh
//! cluster (groups and specs back, every epoch above the backup's),
//! corrupt backups refused, and `--print-default-config` /
//! `--check-config`.

// Each test holds the process-wide `serial()` guard for its whole run, on
// purpose: it serializes tests that each run on their own runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Cluster, Conn, free_port, run_cli, serial, transport};
use quorate::client::Client;
use serde_json::Value;

const MANAGED: &str = r#"
name = "db"
[failover]
lease_ttl_ms = 20000
[[members]]
id = "db-1"
heartbeat = "redis://127.0.0.1:1"
priority = 100
[[members]]
id = "db-2"
heartbeat = "redis://127.0.0.1:1"
priority = 50
"#;

const PLAIN: &str = r#"
name = "cache"
[[members]]
id = "cache-1"
heartbeat = "redis://127.0.0.1:1"
[[members]]
id = "cache-2"
heartbeat = "redis://127.0.0.1:1"
"#;

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON: {stdout:?}: {e}"))
}

/// Runs the CLI with `--json`; the exit code and the one JSON line.
fn cli(args: &[&str], conn: &Conn) -> (i32, Value, String) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = run_cli(&all, conn);
    (code, json(&out), err)
}

fn apply(c: &Cluster, name: &str, toml: &str) {
    let file = c.dir.path().join(format!("{name}.toml"));
    std::fs::write(&file, toml).unwrap();
    let (code, v, err) = cli(&["group", "apply", &file.display().to_string()], &c.conn());
    assert_eq!(code, 0, "group apply {name}: {v} {err}");
}

/// A client as member `member` of `group`, the identity its agent has.
fn member_client(c: &Cluster, group: &str, member: &str) -> Client {
    let eps: Vec<String> = c.endpoints().split(',').map(str::to_owned).collect();
    Client::new_with(&eps, transport(c.cert(member, Some(group)))).unwrap()
}

fn lease(conn: &Conn, group: &str) -> Value {
    let (code, v, err) = cli(&["lease", "get", group], conn);
    assert_eq!(code, 0, "lease get {group}: {v} {err}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_delete_frees_the_group() {
    let _serial = serial();
    let c = Cluster::start(3);
    c.wait_for_leader(Duration::from_secs(15)).await;
    apply(&c, "db", MANAGED);
    apply(&c, "cache", PLAIN);
    // db-1 is designated (highest priority) and takes the lease: a live primary.
    let db1 = member_client(&c, "db", "db-1");
    let granted = db1.acquire("db", "db-1", 20_000, None).await.unwrap();
    assert!(granted.acquired);
    let epoch = granted.lease.unwrap().epoch;

    // Refused without --force, naming the holder and the way out.
    let (code, v, _) = cli(&["group", "delete", "db"], &c.conn());
    assert_ne!(code, 0);
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("has a live primary") && msg.contains("db-1") && msg.contains("--force"), "{v}");
    assert_eq!(v["code"], "FailedPrecondition", "{v}");
    // Only an admin deletes.
    let (code, v, _) = cli(&["group", "delete", "cache"], &c.conn_as("reader"));
    assert_ne!(code, 0);
    assert!(v["error"].as_str().unwrap().contains("may not delete groups: admin only"), "{v}");

    // A watcher of the group is told, and its stream ends.
    let watch = db1.watch("db").await.unwrap();

    let (code, v, err) = cli(&["group", "delete", "db", "--force"], &c.conn());
    assert_eq!(code, 0, "{v} {err}");
    assert_eq!(
        (v["group"].as_str(), v["deleted"].as_bool(), v["epoch"].as_u64()),
        (Some("db"), Some(true), Some(epoch))
    );
    ended_with_deleted(watch).await;

    // Gone: the spec, the list entry, the matrix, the history; the lease is
    // free at the old epoch, and the old primary's renewal is refused.
    let (code, v, _) = cli(&["group", "get", "db"], &c.conn());
    assert_ne!(code, 0);
    assert_eq!(v["code"], "NotFound", "{v}");
    let (_, v, _) = cli(&["group", "list"], &c.conn());
    assert_eq!(v["groups"], serde_json::json!(["cache"]));
    for what in [&["matrix", "db"][..], &["history", "db"][..]] {
        let (code, v, _) = cli(what, &c.conn());
        assert_ne!(code, 0, "{what:?} of a deleted group: {v}");
    }
    let l = lease(&c.conn(), "db");
    assert_eq!(
        (l["holder"].is_null(), l["epoch"].as_u64(), l["state"].as_str()),
        (true, Some(epoch), Some("free")),
        "{l}"
    );
    assert!(db1.renew("db", "db-1", epoch).await.is_err(), "the deposed primary cannot renew");

    // The name can be used again, and its epochs go on from the old ones.
    apply(&c, "db", MANAGED);
    let again = db1.acquire("db", "db-1", 20_000, None).await.unwrap();
    assert_eq!(again.lease.unwrap().epoch, epoch + 1);
    // An unmanaged group is deleted without --force.
    let (code, v, err) = cli(&["group", "delete", "cache"], &c.conn());
    assert_eq!(code, 0, "{v} {err}");
    let (code, v, _) = cli(&["group", "delete", "cache"], &c.conn());
    assert_eq!((code != 0, v["code"].as_str()), (true, Some("NotFound")), "{v}");
}

/// Reads a watch until it ends; its last event must be DELETED.
async fn ended_with_deleted(mut watch: tonic::Streaming<quorate::pb::v1::WatchEvent>) {
    let mut last = None;
    let read = async {
        while let Ok(Some(ev)) = watch.message().await {
            last = Some(ev.kind);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the watch ends after the delete");
    assert_eq!(last, Some(quorate::pb::v1::EventKind::Deleted as i32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_then_restore_into_a_fresh_cluster() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("backup.snap");
    let file_s = file.display().to_string();
    let (specs, epochs, max_epoch) = take_backup(&file).await;

    // A fresh cluster, node 1 seeded from the file, the others empty.
    let mut new = Cluster::prepare(3, None, tempfile::tempdir().unwrap());
    new.node_args.insert(1, vec!["--restore".into(), file_s.clone()]);
    for id in 1..=3 {
        new.start_node(id);
    }
    new.wait_for_leader(Duration::from_secs(20)).await;
    // Groups and specs are back (read on the leader, then on every node).
    for (g, want) in ["db", "cache"].iter().zip(&specs) {
        let (code, got, err) = cli(&["group", "get", g], &new.conn());
        assert_eq!(code, 0, "{got} {err}");
        assert_eq!(strip_revision(&got), strip_revision(want), "{g}");
    }
    // Every lease is free at the backup's highest epoch + 1,000,000 (above
    // its own); the next grant is above every epoch of the backup.
    for (g, old_epoch) in &epochs {
        let l = lease(&new.conn(), g);
        assert_eq!(
            (l["epoch"].as_u64(), l["holder"].is_null(), l["state"].as_str()),
            (Some(max_epoch + 1_000_000), true, Some("free")),
            "{g} (at {old_epoch} in the backup): {l}"
        );
    }
    let db1 = member_client(&new, "db", "db-1");
    let e = db1.acquire("db", "db-1", 20_000, None).await.unwrap().lease.unwrap().epoch;
    assert_eq!(e, max_epoch + 1_000_001);
    let e = new.client_as("svc").acquire("fresh", "svc", 5_000, None).await.unwrap().lease.unwrap().epoch;
    assert!(e > max_epoch + 1_000_000, "a name not in the backup starts above it too: {e}");
    followers_serve_the_restored_state(&new).await;
    // Restarting node 1 with --restore still given is refused: its data
    // directory is no longer empty.
    new.kill(1);
    // On a port of its own: the check comes after the bind.
    let listen = format!("127.0.0.1:{}", free_port());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quorate"))
        .args(["server", "--node-id", "1", "--listen", &listen, "--peers", &new.peers, "--insecure"])
        .arg("--data-dir")
        .arg(&new.node(1).data_dir)
        .args(["--restore", &file_s])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not empty: a restore seeds a new cluster"), "{err}");
}

/// The followers received the state by Raft: each serves it (a stale read
/// of the restored lease) once caught up.
async fn followers_serve_the_restored_state(new: &Cluster) {
    for id in 2..=3 {
        let one = Conn { endpoints: new.node(id).addr.clone(), ..new.conn() };
        let mut served = false;
        for _ in 0..100 {
            let (code, v, _) = cli(&["lease", "get", "orders", "--consistency", "stale"], &one);
            if code == 0 && v["epoch"].as_u64() == Some(1_000_003) {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(served, "node {id} never served the restored state");
    }
}

/// A cluster with a managed group, a plain group and a plain lease, backed
/// up to `file`: the groups' specs, the leases' epochs, the highest epoch.
async fn take_backup(file: &Path) -> (Vec<Value>, Vec<(String, u64)>, u64) {
    let file_s = file.display().to_string();
    let old = Cluster::start(3);
    old.wait_for_leader(Duration::from_secs(15)).await;
    apply(&old, "db", MANAGED);
    apply(&old, "cache", PLAIN);
    let db1 = member_client(&old, "db", "db-1");
    db1.acquire("db", "db-1", 20_000, None).await.unwrap();
    let svc = old.client_as("svc");
    for _ in 0..3 {
        svc.acquire("orders", "svc", 5_000, None).await.unwrap();
    }
    // Only an admin takes backups.
    let (code, v, _) = cli(&["snapshot", "save", &file_s], &old.conn_as("reader"));
    assert!(code != 0 && v["error"].as_str().unwrap().contains("admin only"), "{v}");
    assert!(!file.exists());
    let (code, v, err) = cli(&["snapshot", "save", &file_s], &old.conn());
    assert_eq!(code, 0, "{v} {err}");
    assert_eq!((v["groups"].as_u64(), v["leases"].as_u64(), v["format_version"].as_u64()), (Some(2), Some(2), Some(1)));
    assert_eq!(v["bytes"].as_u64(), Some(std::fs::metadata(file).unwrap().len()));
    assert_eq!(v["sha256"].as_str().map(str::len), Some(64));
    let specs: Vec<Value> = ["db", "cache"].iter().map(|g| cli(&["group", "get", g], &old.conn()).1).collect();
    let epochs: Vec<(String, u64)> =
        ["db", "orders"].iter().map(|g| (g.to_string(), lease(&old.conn(), g)["epoch"].as_u64().unwrap())).collect();
    assert_eq!(epochs, vec![("db".to_string(), 1), ("orders".to_string(), 3)]);
    (specs, epochs, v["max_epoch"].as_u64().unwrap())
}

fn strip_revision(v: &Value) -> Value {
    let mut v = v.clone();
    v.as_object_mut().unwrap().remove("revision");
    v
}

/// What a refused restore prints, and that it leaves the data directory
/// empty; `local up --restore` checks the file before starting anything.
#[test]
fn corrupt_backups_are_refused_and_nothing_is_written() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let good = {
        let m = quorate_core::Machine::new();
        let b = quorate::backup::Backup {
            machine: m,
            revision: 1,
            served_by: 1,
            taken_at_unix_ms: 0,
            quorate_version: "test".into(),
        };
        quorate::backup::encode(&b).unwrap()
    };
    let mut flipped = good.clone();
    let at = flipped.len() - 3;
    flipped[at] ^= 1;
    let mut version = good.clone();
    version[8] = 9;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("truncated", good[..good.len() - 10].to_vec(), "the snapshot is truncated"),
        ("corrupt", flipped, "the snapshot is corrupt: its SHA-256 is"),
        ("version", version, "snapshot format version 9 is not supported"),
        ("foreign", b"hello, not a snapshot at all".to_vec(), "not a quorate snapshot file"),
    ];
    for (name, bytes, want) in cases {
        let file = tmp.path().join(format!("{name}.snap"));
        std::fs::write(&file, &bytes).unwrap();
        let data = tmp.path().join(format!("data-{name}"));
        let addr = format!("127.0.0.1:{}", free_port());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_quorate"))
            .args(["server", "--node-id", "1", "--listen", &addr, "--peers", &format!("1={addr}"), "--insecure"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--restore")
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {err}");
        assert!(err.contains(want) && err.contains(&file.display().to_string()), "{name}: {err}");
        assert!(!data.exists(), "{name}: the data directory was created");
        let dir = tmp.path().join(format!("local-{name}"));
        let args = ["local", "up", "--dir", &dir.display().to_string(), "--restore", &file.display().to_string()];
        let (code, _, err) = run_cli(&args, &Conn::none());
        assert!(code != 0 && err.contains(want) && err.contains("nothing was started"), "{name}: {err}");
        assert!(!dir.join("cluster.json").exists(), "{name}");
    }
}

#[test]
fn the_default_config_checks_back_and_mistakes_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, text, err) = run_cli(&["server", "--print-default-config"], &Conn::none());
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("# Raft heartbeat.\nheartbeat_interval_ms = 50\n"), "{text}");
    assert!(text.contains("restore_epoch_bump = 1000000"), "{text}");
    let file = tmp.path().join("server.toml");
    std::fs::write(&file, &text).unwrap();
    let (code, out, err) = run_cli(&["server", "--check-config", &file.display().to_string()], &Conn::none());
    assert_eq!((code, out.trim()), (0, format!("{}: OK", file.display()).as_str()), "{err}");
    let (code, out, _) = run_cli(&["--json", "server", "--check-config", &file.display().to_string()], &Conn::none());
    assert_eq!((code, json(&out)["ok"].as_bool()), (0, Some(true)));
    // One wrong value: non-zero, and the message names the field.
    std::fs::write(&file, text.replace("restore_epoch_bump = 1000000", "restore_epoch_bump = 0")).unwrap();
    let (code, _, err) = run_cli(&["server", "--check-config", &file.display().to_string()], &Conn::none());
    assert!(code != 0 && err.contains("restore_epoch_bump: 0 is outside"), "{err}");
    std::fs::write(&file, text.replace("election_timeout_max_ms = 150", "election_timeout_max_ms = 100")).unwrap();
    let (code, _, err) = run_cli(&["server", "--check-config", &file.display().to_string()], &Conn::none());
    assert!(code != 0 && err.contains("election_timeout_max_ms:"), "{err}");
    std::fs::write(&file, "node_id = 1\nlease_ttl = 5\n").unwrap();
    let (code, _, err) = run_cli(&["server", "--check-config", &file.display().to_string()], &Conn::none());
    assert!(code != 0 && err.contains("unknown field `lease_ttl`"), "{err}");
    let missing = Path::new("/nonexistent/quorate.toml");
    let (code, _, err) = run_cli(&["server", "--check-config", &missing.display().to_string()], &Conn::none());
    assert!(code != 0 && err.contains("cannot read config file"), "{err}");
}

/// Three consecutive free ports, and those `local up` puts above them
/// (Sentinel at +500, HTTP at +600).
fn free_base_port() -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    for _ in 0..200 {
        let base = free_port();
        if base < 60_000 && [0, 500, 600].iter().all(|off| (0..3).all(|i| free(base + off + i))) {
            return base;
        }
    }
    panic!("no free base port");
}

/// `local up --restore FILE`: node 1 restores, the cluster forms, the
/// lease comes back free at its epoch + the bump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_restores_a_backup() {
    use quorate_core::machine::{Command, LeaderStamp, LogPosition, Op};
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut m = quorate_core::Machine::new();
    for index in 1..=4 {
        let stamp = LeaderStamp { node_id: 1, boot_id: 1, now_ms: 0, timing: Default::default(), wall_ms: 0 };
        let op = Op::Acquire { group: "orders".into(), holder: "svc".into(), ttl_ms: 1000 };
        m.apply(LogPosition { index, term: 1, leader_node_id: 1 }, &Command { stamp, op });
    }
    let b = quorate::backup::Backup {
        machine: m,
        revision: 4,
        served_by: 1,
        taken_at_unix_ms: 0,
        quorate_version: "t".into(),
    };
    let file = tmp.path().join("b.snap");
    quorate::backup::write_file_atomic(&file, &quorate::backup::encode(&b).unwrap()).unwrap();
    let dir = tmp.path().join("local");
    let dir_s = dir.display().to_string();
    let base = free_base_port().to_string();
    let up = ["--json", "local", "up", "--dir", &dir_s, "--base-port", &base, "--restore", &file.display().to_string()];
    let (code, out, err) = run_cli(&up, &Conn::none());
    let down = || run_cli(&["local", "down", "--dir", &dir_s], &Conn::none());
    if code != 0 {
        down();
        let logs: Vec<String> =
            (1..=3).map(|i| std::fs::read_to_string(dir.join(format!("node-{i}.log"))).unwrap_or_default()).collect();
        panic!("local up --restore: {out} {err}\n{}", logs.join("\n-----\n"));
    }
    let conn = Conn::local(&dir, "admin");
    let l = lease(&conn, "orders");
    // Once a cluster holds it, --restore is refused for the directory.
    let (again, again_out, _) = run_cli(&up, &Conn::none());
    down();
    assert_eq!((l["epoch"].as_u64(), l["state"].as_str()), (Some(1_000_004), Some("free")), "{l}");
    let again_err = json(&again_out)["error"].as_str().unwrap_or_default().to_owned();
    assert!(again != 0 && again_err.contains("--restore seeds a new cluster"), "{again_out}");
}

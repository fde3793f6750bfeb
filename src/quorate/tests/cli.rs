//! The CLI end to end: `local up`, `status`, `lease`, `watch`, `local down`,
//! and the JSON shapes the README documents.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{CliProc, Conn, free_port, run_cli, serial};
use serde_json::Value;

/// Four consecutive free ports (three nodes and one `local add-node`
/// adds), and the four 500 and 600 above them.
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let base = free_port();
        // Nodes at base..base+2, their Sentinel endpoints at base+500.. and
        // their HTTP listeners at base+600.. (local up).
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        let all_free = |from: u16| (0..4).all(|i| free(base + from + i));
        if base < 60_000 && (1..4).all(|i| free(base + i)) && all_free(500) && all_free(600) {
            return base;
        }
    }
    panic!("no three consecutive free ports");
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON: {stdout:?}: {e}"))
}

/// Stops whatever `local up` started in `dir`, even when the test fails.
struct LocalGuard<'a>(&'a Path);

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        let _ = run_cli(&["local", "down", "--dir", &self.0.display().to_string()], &Conn::none());
        if std::thread::panicking() {
            for id in 1..=3 {
                let log = std::fs::read_to_string(self.0.join(format!("node-{id}.log"))).unwrap_or_default();
                eprintln!("----- node-{id}.log -----\n{}", log.lines().rev().take(30).collect::<Vec<_>>().join("\n"));
            }
        }
    }
}

#[test]
fn local_cluster_status_lease_watch_and_restart() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let dir_s = dir.display().to_string();
    let base = free_base_port().to_string();
    let _guard = LocalGuard(&dir);

    let eps = up_and_check_cluster_file(&dir, &base);
    check_status(&eps);
    // The cluster is mutual TLS: plain text is told so, and a reader may
    // not take a lease.
    let plain = Conn { tls: None, insecure: true, ..eps.clone() };
    let (code, _, err) = run_cli(&["lease", "get", "G"], &plain);
    assert_eq!(code, 1);
    assert!(err.contains("the cluster probably serves mutual TLS"), "{err}");
    let (code, _, err) =
        run_cli(&["lease", "acquire", "G", "--holder", "r", "--ttl-ms", "1000"], &eps.as_identity("reader"));
    assert_eq!(code, 1);
    assert!(err.contains("reader reader may not hold group G's lease as r"), "{err}");

    // lease get on a free group: holder null.
    let (code, out, _) = run_cli(&["lease", "get", "G", "--json"], &eps);
    assert_eq!(code, 0);
    let free = json(&out);
    assert_eq!(free["group"], "G");
    assert_eq!(free["holder"], Value::Null);
    assert_eq!(free["epoch"], 0);

    watch_acquisition_and_expiry(&eps, tmp.path());

    // down, then up again on the same data: the epoch is still there.
    let (code, out, err) = run_cli(&["--json", "local", "down", "--dir", &dir_s], &Conn::none());
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["stopped"].as_array().unwrap().len(), 3);
    let (code, _, err) = run_cli(&["status", "--json"], &eps);
    assert_ne!(code, 0, "status succeeded with every node down: {err}");
    let (code, _, err) = run_cli(&["local", "up", "--nodes", "3", "--dir", &dir_s], &Conn::none());
    assert_eq!(code, 0, "restart failed: {err}");
    let (code, out, err) = run_cli(&["lease", "get", "G", "--json"], &eps);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["epoch"], 1);
}

/// `local add-node` starts node 4 and makes it a voter, `local remove-node`
/// removes node 2 for good; `cluster.json` and `cluster members` agree at
/// each step, and a removed id is never given out again.
#[test]
fn local_add_node_and_remove_node_keep_cluster_json_in_step() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let dir_s = dir.display().to_string();
    let base = free_base_port().to_string();
    let _guard = LocalGuard(&dir);
    let eps = up_and_check_cluster_file(&dir, &base);
    let file = || -> Value { serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap() };
    let ids =
        |f: &Value| -> Vec<u64> { f["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_u64().unwrap()).collect() };
    let voters = || -> Vec<u64> {
        let (code, out, err) = run_cli(&["--json", "cluster", "members"], &eps);
        assert_eq!(code, 0, "{err}");
        let mut v: Vec<u64> = json(&out)["voters"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        v.sort_unstable();
        v
    };

    let (code, out, err) = run_cli(&["--json", "local", "add-node", "--dir", &dir_s], &Conn::none());
    assert_eq!(code, 0, "local add-node failed: {err}");
    let added = json(&out);
    assert_eq!(added["added"], 4, "{added}");
    assert_eq!(ids(&file()), [1, 2, 3, 4]);
    assert_eq!(voters(), [1, 2, 3, 4], "node 4 is a voter once add-node returns");

    let (code, out, err) = run_cli(&["--json", "local", "remove-node", "--dir", &dir_s, "--id", "2"], &Conn::none());
    assert_eq!(code, 0, "local remove-node failed: {err}");
    assert_eq!(json(&out)["removed"], 2);
    let f = file();
    assert_eq!(ids(&f), [1, 3, 4]);
    assert_eq!(f["removed_ids"], serde_json::json!([2]), "{f}");
    assert_eq!(voters(), [1, 3, 4]);
    let (code, out, _) = run_cli(&["--json", "cluster", "members"], &eps);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["removed"], serde_json::json!([2]));
    // Removing it again is refused.
    let (code, _, err) = run_cli(&["local", "remove-node", "--dir", &dir_s, "--id", "2"], &Conn::none());
    assert_ne!(code, 0, "removed twice");
    assert!(!err.is_empty());
}

/// `local up` of three nodes in `dir` from port `base`: what it prints is
/// the cluster file, and the file names every node and its certificates.
/// Returns how to reach it as its admin.
fn up_and_check_cluster_file(dir: &Path, base: &str) -> Conn {
    let dir_s = dir.display().to_string();
    let (code, out, err) =
        run_cli(&["--json", "local", "up", "--nodes", "3", "--dir", &dir_s, "--base-port", base], &Conn::none());
    assert_eq!(code, 0, "local up failed: {err}");
    let up = json(&out);
    let file: Value = serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    assert_eq!(up, file);
    let eps = file["endpoints"].as_str().unwrap().to_owned();
    assert_eq!(eps.split(',').count(), 3);
    let nodes = file["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["id"], i as u64 + 1);
        assert!(n["pid"].as_u64().unwrap() > 0);
        assert!(n["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(n["data_dir"].as_str().unwrap().ends_with(&format!("node-{}", i + 1)));
        assert!(n["tls_cert"].as_str().unwrap().ends_with(&format!("tls/node-{}.crt", i + 1)), "{n}");
    }
    let tls = &file["tls"];
    for (key, name) in [("ca", "ca.crt"), ("admin_cert", "admin.crt"), ("reader_key", "reader.key")] {
        let path = tls[key].as_str().unwrap_or_else(|| panic!("no tls.{key} in {file}"));
        assert!(path.ends_with(&format!("tls/{name}")) && Path::new(path).exists(), "{path}");
    }
    assert!(!eps.is_empty());
    Conn::local(dir, "admin")
}

/// status --json: {"leader":1,"term":5,"nodes":[{"id":1,"addr":..,"role":"leader","reachable":true}]}
fn check_status(eps: &Conn) {
    let (code, out, err) = run_cli(&["status", "--json"], eps);
    assert_eq!(code, 0, "{err}");
    let status = json(&out);
    let leader = status["leader"].as_u64().expect("a leader");
    assert!(status["term"].as_u64().unwrap() >= 1);
    let snodes = status["nodes"].as_array().unwrap();
    assert_eq!(snodes.len(), 3);
    assert!(snodes.iter().all(|n| n["reachable"] == true));
    assert_eq!(snodes.iter().filter(|n| n["role"] == "leader").count(), 1);
    assert!(snodes.iter().any(|n| n["id"] == leader && n["role"] == "leader"));
}

/// watch sees the current state, the acquisition and the expiry (a holder
/// of G acquires, renews, and is killed).
fn watch_acquisition_and_expiry(eps: &Conn, tmp: &Path) {
    let watch = CliProc::spawn("watch", &["--json", "watch", "G"], eps, tmp);
    let (_, ev) = watch.next_json(Duration::from_secs(10)).expect("watch printed nothing");
    assert_eq!(ev["event"], "current");
    // A lease holder is a client identity: `local up` issues one, `client`.
    let args = ["--json", "lease", "acquire", "G", "--holder", "client@h1", "--ttl-ms", "1000"];
    let mut holder = CliProc::spawn("holder", &args, &eps.as_identity("client"), tmp);
    let (_, acq) = holder.next_json(Duration::from_secs(10)).expect("acquire printed nothing");
    assert_eq!(acq["event"], "acquired", "{acq}");
    assert_eq!(
        (acq["group"].as_str(), acq["holder"].as_str(), acq["epoch"].as_u64()),
        (Some("G"), Some("client@h1"), Some(1))
    );
    let (_, ren) = holder.next_json(Duration::from_secs(5)).expect("no renewal");
    assert_eq!(ren["event"], "renewed", "{ren}");
    let (code, out, _) = run_cli(&["lease", "get", "G", "--json"], eps);
    assert_eq!(code, 0);
    let held = json(&out);
    assert_eq!((held["holder"].as_str(), held["epoch"].as_u64()), (Some("client@h1"), Some(1)));
    let remaining = held["remaining_ms"].as_u64().unwrap();
    assert!(remaining > 0 && remaining <= 1000, "{held}");

    holder.proc.kill();
    let mut kinds = Vec::new();
    while let Some((_, ev)) = watch.next_json(Duration::from_secs(5)) {
        let kind = ev["event"].as_str().unwrap().to_owned();
        kinds.push(kind.clone());
        if kind == "expired" {
            assert_eq!(ev["epoch"], 1);
            break;
        }
    }
    assert_eq!(kinds.first().map(String::as_str), Some("acquired"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("expired"), "{kinds:?}");
}

#[test]
fn local_up_with_a_group_starts_stores_and_agents_and_shows_the_matrix() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let dir_s = dir.display().to_string();
    // Ports base..base+2 for nodes, base+100.. for heartbeat stores.
    let base = loop {
        let b = free_base_port();
        // Heartbeat stores at base+100.., agents' HTTP listeners at base+700...
        if (100..102).chain(700..702).all(|i| std::net::TcpListener::bind(("127.0.0.1", b + i)).is_ok()) {
            break b;
        }
    };
    let _guard = LocalGuard(&dir);
    let args = ["--json", "local", "up", "--nodes", "3", "--dir", &dir_s, "--base-port", &base.to_string()];
    let (code, out, err) = run_cli(&[&args[..], &["--group", "cache", "--members", "2"]].concat(), &Conn::none());
    assert_eq!(code, 0, "local up failed: {err}");
    let up = json(&out);
    let eps = Conn::local(&dir, "admin");
    let members = up["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    for (i, m) in members.iter().enumerate() {
        assert_eq!(m["id"], format!("cache-{}", i + 1));
        assert!(m["agent_pid"].as_u64().unwrap() > 0);
        assert!(m["heartbeat_redis_pid"].as_u64().unwrap() > 0);
        assert_eq!(m["heartbeat_redis_addr"], format!("127.0.0.1:{}", base + 100 + i as u16));
        assert!(m["tls_cert"].as_str().unwrap().ends_with(&format!("tls/cache-{}.crt", i + 1)), "{m}");
    }

    check_matrix(&eps);

    // The human grid and the explanation.
    let (code, out, _) = run_cli(&["matrix", "cache"], &eps);
    assert_eq!(code, 0);
    assert!(out.contains("OBSERVER") && out.contains("VERDICT") && out.contains("legend:"), "{out}");
    let (code, out, _) = run_cli(&["explain", "cache", "cache-1", "--json"], &eps);
    assert_eq!(code, 0);
    let e = json(&out);
    assert!(e["sentence"].as_str().unwrap().starts_with("cache-1 is UP"), "{e}");
    assert_eq!(e["evidence"].as_array().unwrap().len(), 4);

    check_spec_and_a_bad_one(&eps, tmp.path());
}

/// The matrix fills in: every member up, seen by 4 observers, quorum 3.
fn check_matrix(eps: &Conn) {
    let start = std::time::Instant::now();
    let matrix = loop {
        let (code, out, _) = run_cli(&["matrix", "cache", "--json"], eps);
        if code == 0 {
            let m = json(&out);
            if m["verdicts"]["cache-1"]["state"] == "up" && m["verdicts"]["cache-2"]["state"] == "up" {
                break m;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "verdicts never became up");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(matrix["group"], "cache");
    assert_eq!(matrix["targets"], serde_json::json!(["cache-1", "cache-2"]));
    assert_eq!(matrix["observers"].as_array().unwrap().len(), 5);
    let cells = matrix["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 8, "2 member cells + 2 x 3 coordinator cells");
    for c in cells {
        assert!(c["observer"].is_string() && c["target"].is_string() && c["age_ms"].is_u64(), "{c}");
        assert_eq!(c["state"], "up", "{c}");
    }
    let v = &matrix["verdicts"]["cache-2"];
    assert_eq!((v["up_votes"].as_u64(), v["down_votes"].as_u64(), v["quorum"].as_u64()), (Some(4), Some(0), Some(3)));
}

/// The spec, and a bad spec (written into `tmp`) refused with the field
/// named.
fn check_spec_and_a_bad_one(eps: &Conn, tmp: &Path) {
    let (code, out, _) = run_cli(&["group", "get", "cache", "--json"], eps);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["policy"]["down_after_ms"], 500);
    let bad = tmp.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\n[policy]\nheartbeat_interval_ms = 100\ndown_after_ms = 150\n\n[[members]]\nid = \"a\"\nheartbeat = \"redis://127.0.0.1:1\"\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["group", "apply", &bad.display().to_string()], eps);
    assert_eq!(code, 1);
    assert!(err.contains("policy.down_after_ms"), "{err}");
}

/// Plain text is asked for, never a default: a server with neither TLS
/// files nor --insecure refuses to start, saying what to give; a CLI
/// without credentials says the same; `--insecure` on both ends works and
/// the server warns; a plain-text CLI against a TLS cluster is told why.
#[test]
fn plain_text_only_when_asked_for_and_a_mismatch_is_explained() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let data = tmp.path().join("data").display().to_string();
    let server = ["server", "--node-id", "1", "--listen", &addr, "--peers", &format!("1={addr}"), "--data-dir", &data];
    let (code, _, err) = run_cli(&server, &Conn::none());
    assert_eq!(code, 1, "started without TLS or --insecure: {err}");
    assert!(err.contains("tls_ca: missing") && err.contains("--tls-ca") && err.contains("--insecure"), "{err}");

    let (code, _, err) = run_cli(&["status"], &Conn { endpoints: addr.clone(), ..Conn::none() });
    assert_eq!(code, 1);
    assert!(err.contains("give --ca, --cert and --key") && err.contains("QUORATE_CA"), "{err}");

    let log = std::fs::File::create(tmp.path().join("server.log")).unwrap();
    let child = std::process::Command::new(common::QUORATE)
        .args(["--insecure"])
        .args(server)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _server = common::Proc { child, name: "insecure-server".into() };
    let plain = Conn { endpoints: addr.clone(), tls: None, insecure: true };
    let start = std::time::Instant::now();
    let out = loop {
        let (code, out, err) = run_cli(&["status", "--json"], &plain);
        if code == 0 && json(&out)["leader"] == 1 {
            break out;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no leader over plain text: {err}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(json(&out)["nodes"].as_array().unwrap().len(), 1);
    let log = std::fs::read_to_string(tmp.path().join("server.log")).unwrap();
    assert!(log.contains("INSECURE: serving plain text"), "no warning in the server's log: {log}");
}

//! The CLI end to end: `local up`, `status`, `lease`, `watch`, `local down`,
//! and the JSON shapes the README documents.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{CliProc, free_port, run_cli, serial};
use serde_json::Value;

/// Three consecutive free ports.
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let base = free_port();
        if base < 60_000 && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
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
        let _ = run_cli(&["local", "down", "--dir", &self.0.display().to_string()], "");
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

    let (code, out, err) =
        run_cli(&["--json", "local", "up", "--nodes", "3", "--dir", &dir_s, "--base-port", &base], "");
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
    }

    // status --json: {"leader":1,"term":5,"nodes":[{"id":1,"addr":..,"role":"leader","reachable":true}]}
    let (code, out, err) = run_cli(&["status", "--json"], &eps);
    assert_eq!(code, 0, "{err}");
    let status = json(&out);
    let leader = status["leader"].as_u64().expect("a leader");
    assert!(status["term"].as_u64().unwrap() >= 1);
    let snodes = status["nodes"].as_array().unwrap();
    assert_eq!(snodes.len(), 3);
    assert!(snodes.iter().all(|n| n["reachable"] == true));
    assert_eq!(snodes.iter().filter(|n| n["role"] == "leader").count(), 1);
    assert!(snodes.iter().any(|n| n["id"] == leader && n["role"] == "leader"));

    // lease get on a free group: holder null.
    let (code, out, _) = run_cli(&["lease", "get", "G", "--json"], &eps);
    assert_eq!(code, 0);
    let free = json(&out);
    assert_eq!(free["group"], "G");
    assert_eq!(free["holder"], Value::Null);
    assert_eq!(free["epoch"], 0);

    // watch sees the current state, the acquisition and the expiry.
    let watch = CliProc::spawn("watch", &["--json", "watch", "G"], &eps, tmp.path());
    let (_, ev) = watch.next_json(Duration::from_secs(10)).expect("watch printed nothing");
    assert_eq!(ev["event"], "current");
    let mut holder = CliProc::spawn(
        "holder",
        &["--json", "lease", "acquire", "G", "--holder", "h1", "--ttl-ms", "1000"],
        &eps,
        tmp.path(),
    );
    let (_, acq) = holder.next_json(Duration::from_secs(10)).expect("acquire printed nothing");
    assert_eq!(acq["event"], "acquired", "{acq}");
    assert_eq!(
        (acq["group"].as_str(), acq["holder"].as_str(), acq["epoch"].as_u64()),
        (Some("G"), Some("h1"), Some(1))
    );
    let (_, ren) = holder.next_json(Duration::from_secs(5)).expect("no renewal");
    assert_eq!(ren["event"], "renewed", "{ren}");
    let (code, out, _) = run_cli(&["lease", "get", "G", "--json"], &eps);
    assert_eq!(code, 0);
    let held = json(&out);
    assert_eq!((held["holder"].as_str(), held["epoch"].as_u64()), (Some("h1"), Some(1)));
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

    // down, then up again on the same data: the epoch is still there.
    let (code, out, err) = run_cli(&["--json", "local", "down", "--dir", &dir_s], "");
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["stopped"].as_array().unwrap().len(), 3);
    let (code, _, err) = run_cli(&["status", "--json"], &eps);
    assert_ne!(code, 0, "status succeeded with every node down: {err}");
    let (code, _, err) = run_cli(&["local", "up", "--nodes", "3", "--dir", &dir_s], "");
    assert_eq!(code, 0, "restart failed: {err}");
    let (code, out, err) = run_cli(&["lease", "get", "G", "--json"], &eps);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["epoch"], 1);
}

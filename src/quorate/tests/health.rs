//! Health endpoints and metrics on real processes: the agents' Patroni-style
//! checks on a managed Redis pair (through a crash of the primary), the
//! coordinators' `/livez`, `/readyz`, `/leader` and `/metrics`, and
//! `grpc.health.v1` on the API port (mutual TLS).

// Each test holds the process-wide `serial()` guard for its whole run, on
// purpose: cluster tests must not overlap on a 2-core machine.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, PairFixture, serial, transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// One plain HTTP/1.1 request; (status, body), or None if nothing answers.
async fn http(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.ok()?
}

async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    http(addr, "GET", path).await
}

async fn status(addr: &str, path: &str) -> u16 {
    get(addr, path).await.map_or(0, |(s, _)| s)
}

/// Waits until `GET addr path` answers `want`.
async fn wait_status(addr: &str, path: &str, want: u16, within: Duration) {
    let start = Instant::now();
    loop {
        let got = get(addr, path).await;
        if got.as_ref().is_some_and(|(s, _)| *s == want) {
            return;
        }
        assert!(start.elapsed() < within, "{addr}{path} did not answer {want} within {within:?}: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// The samples of an OpenMetrics text, checked line by line: name (with
/// labels) to value.
fn samples(text: &str) -> Vec<(String, f64)> {
    assert!(text.trim_end().ends_with("# EOF"), "no # EOF: {text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
            (name.to_owned(), value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

fn sample(samples: &[(String, f64)], name: &str) -> Option<f64> {
    samples.iter().find(|(n, _)| n == name || n.starts_with(&format!("{name}{{"))).map(|(_, v)| *v)
}

/// The metric families of OpenMetrics text (its `# TYPE` lines).
fn families(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

fn check_alert_names_and_readme(scraped: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fams = families(scraped);
    assert!(fams.iter().any(|f| f.starts_with("quorate_member_verdict")), "no group metrics: {fams:?}");
    let alerts = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    let mut used: Vec<&str> = alerts
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("quorate_") && !w.ends_with('_'))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() > 10, "{used:?}");
    for name in used {
        let family = ["_total", "_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(fams.iter().any(|f| f == family), "alerts.yml uses {name}, which no scrape exports: {fams:?}");
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for f in &fams {
        assert!(readme.contains(&format!("`{f}")), "README does not document the metric {f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_answer_patroni_checks_and_follow_the_primary_through_a_crash() {
    let _g = serial();
    let mut f = PairFixture::start_with_http().await;
    f.wait_ready().await;
    let a1 = f.members[0].agent_http.clone().unwrap();
    let a2 = f.members[1].agent_http.clone().unwrap();
    let within = Duration::from_secs(30);
    wait_status(&a1, "/primary", 200, within).await;
    wait_status(&a2, "/replica", 200, within).await;
    assert_eq!(status(&a2, "/primary").await, 503);
    assert_eq!(status(&a1, "/replica").await, 503);
    assert_eq!(status(&a1, "/read-only").await, 200);
    assert_eq!(status(&a2, "/read-only").await, 200);
    assert_eq!(status(&a1, "/health").await, 200);
    assert_eq!(status(&a2, "/liveness").await, 200);
    assert_eq!(status(&a2, "/replica?lag=lots").await, 503, "a lag that is not a size fails the check");
    // The replica's lag is known once its agent has polled the holder's offset.
    wait_status(&a2, "/replica?lag=1GB", 200, within).await;

    let (code, body) = get(&a1, "/primary").await.unwrap();
    let b = json(&body);
    assert_eq!((code, b["member"].as_str(), b["role"].as_str()), (200, Some("db-1"), Some("primary")));
    assert_eq!(b["holds_lease"], true);
    assert_eq!(b["fenced"], false);
    let (code, body) = get(&a2, "/primary").await.unwrap();
    assert_eq!((code, json(&body)["role"].as_str()), (503, Some("replica")));
    // HEAD answers the same status without a body.
    let (code, body) = http(&a1, "HEAD", "/primary").await.unwrap();
    assert_eq!((code, body.as_str()), (200, ""));
    let (code, _) = http(&a2, "HEAD", "/primary").await.unwrap();
    assert_eq!(code, 503);
    assert_eq!(status(&a1, "/nowhere").await, 404);
    assert_eq!(http(&a1, "POST", "/primary").await.map(|r| r.0), Some(405));

    let (code, text) = get(&a1, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let m = samples(&text);
    assert_eq!(sample(&m, "quorate_agent_serving_primary"), Some(1.0), "{text}");
    assert_eq!(sample(&m, "quorate_agent_lease_held"), Some(1.0));
    assert!(sample(&m, "quorate_agent_heartbeat_errors_total").is_some(), "{text}");
    assert!(text.contains("group=\"db\"") && text.contains("member=\"db-1\""), "{text}");
    let m2 = samples(&get(&a2, "/metrics").await.unwrap().1);
    assert_eq!(sample(&m2, "quorate_agent_serving_primary"), Some(0.0));

    // Every metric the alert rules use is exported, and every exported one
    // is documented.
    let node = f.cluster.node(1).http_addr.clone().unwrap();
    wait_status(&node, "/readyz", 200, within).await;
    let scraped = [get(&node, "/metrics").await.unwrap().1, text, get(&a2, "/metrics").await.unwrap().1].concat();
    check_alert_names_and_readme(&scraped);

    f.crash(0);
    wait_status(&a2, "/primary", 200, Duration::from_secs(45)).await;
    let (_, body) = get(&a2, "/primary").await.unwrap();
    assert_eq!(json(&body)["member"], "db-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_answer_livez_readyz_leader_metrics_and_grpc_health() {
    let _g = serial();
    let mut c = Cluster::start_with_http(3);
    let leader = c.wait_for_leader(Duration::from_secs(30)).await;
    let http_of = |c: &Cluster, id: u64| c.node(id).http_addr.clone().unwrap();
    for id in 1..=3 {
        wait_status(&http_of(&c, id), "/livez", 200, Duration::from_secs(20)).await;
        wait_status(&http_of(&c, id), "/readyz", 200, Duration::from_secs(30)).await;
    }
    // `/leader` is 200 on exactly one node.
    let start = Instant::now();
    loop {
        let mut leaders = Vec::new();
        for id in 1..=3 {
            if status(&http_of(&c, id), "/leader").await == 200 {
                leaders.push(id);
            }
        }
        if leaders == [leader] {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "/leader answered 200 on {leaders:?}, not [{leader}]");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = get(&http_of(&c, leader), "/readyz").await.unwrap();
    assert_eq!((code, json(&body)["health"].as_str()), (200, Some("true")));

    // grpc.health.v1 on the API port, over mutual TLS.
    let channel = quorate::wire::lazy_channel_with(&c.node(leader).addr, &transport(c.cert("reader", None))).unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "quorate.v1.Coordinator"] {
        let resp = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "service {service:?}");
    }
    // Server reflection lists the services (what grpcurl asks first).
    let mut reflection = ServerReflectionClient::new(channel);
    let ask =
        ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices("".into())) };
    let mut answers = reflection.server_reflection_info(tokio_stream::iter([ask])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::ListServicesResponse(list)) = answer else { panic!("not a service list: {answer:?}") };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"quorate.v1.Coordinator"), "{names:?}");

    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let (code, text) = get(&http_of(&c, follower), "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let m = samples(&text);
    assert_eq!(sample(&m, "quorate_raft_has_leader"), Some(1.0), "{text}");
    assert_eq!(sample(&m, "quorate_raft_is_leader"), Some(0.0));
    assert!(sample(&m, "quorate_raft_term").is_some_and(|t| t >= 1.0));
    assert!(sample(&m, "quorate_raft_log_commit_duration_seconds_count").is_some(), "{text}");
    let changes = sample(&m, "quorate_raft_leader_changes_seen_total").expect("leader changes counter");
    assert!(changes >= 1.0);
    let lm = samples(&get(&http_of(&c, leader), "/metrics").await.unwrap().1);
    assert_eq!(sample(&lm, "quorate_raft_is_leader"), Some(1.0));
    assert!(
        lm.iter().any(|(n, _)| n.starts_with("quorate_grpc_server_handled_total{")
            && n.contains("grpc_service=\"grpc.health.v1.Health\"")
            && n.contains("grpc_code=\"OK\"")),
        "{lm:?}"
    );

    // A leader change is counted by the nodes that see it.
    c.kill(leader);
    let start = Instant::now();
    loop {
        let now = get(&http_of(&c, follower), "/metrics").await.map(|(_, t)| samples(&t));
        let seen = now.as_deref().and_then(|m| sample(m, "quorate_raft_leader_changes_seen_total"));
        let has = now.as_deref().and_then(|m| sample(m, "quorate_raft_has_leader"));
        if seen.is_some_and(|v| v > changes) && has == Some(1.0) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no leader change counted: {seen:?} (was {changes})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_status(&http_of(&c, follower), "/readyz", 200, Duration::from_secs(30)).await;
    assert_eq!(status(&http_of(&c, leader), "/livez").await, 0, "the killed node answers nothing");
}

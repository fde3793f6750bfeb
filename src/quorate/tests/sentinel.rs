//! The Sentinel-compatible discovery endpoint on a managed Redis pair (real
//! coordinators, agents and redis-servers): the reply shape of each command
//! over raw RESP and through the `redis` crate, the refusals (no AUTH,
//! RESP3, an oversized bulk), a switchover that disconnects the demoted
//! primary's clients and publishes `+switch-master`, and redis-rs's own
//! Sentinel client writing through a `kill -9` of the primary's host. Over
//! TLS (`--sentinel-tls`): `rediss://` with the cluster CA and the
//! password, plain text refused, and client certificates when required.
//!
//! Run alone: `cargo test -p quorate --test sentinel -- --nocapture` (prints
//! the kill→first-write time).

#![allow(clippy::await_holding_lock)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use quorate::pb::v1 as pb;
use quorate::tls::config::TlsFiles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "sentinel-s3cret";

/// A raw connection: write bytes, read what arrives within a moment.
struct Raw(TcpStream);

impl Raw {
    async fn open(addr: &str) -> Self {
        Raw(TcpStream::connect(addr).await.unwrap())
    }

    /// Sends `req` and reads until `want` bytes arrived or 2 s passed.
    async fn ask(&mut self, req: &[u8], want: usize) -> String {
        self.0.write_all(req).await.unwrap();
        self.read(want, Duration::from_secs(2)).await
    }

    async fn read(&mut self, want: usize, within: Duration) -> String {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        let mut buf = [0u8; 4096];
        while got.len() < want {
            match tokio::time::timeout_at(deadline, self.0.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Sends `req` and checks the reply is exactly `want`.
    async fn says(&mut self, req: &[u8], want: &str) {
        let got = self.ask(req, want.len()).await;
        assert_eq!(got, want, "reply to {:?}", String::from_utf8_lossy(req));
    }

    /// Whether the server closed the connection (EOF within 2 s).
    async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(Duration::from_secs(2), self.0.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }
}

fn url(addr: &str) -> String {
    format!("redis://:{PASSWORD}@{addr}")
}

async fn sentinel_conn(addr: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url(addr)).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn query<T: redis::FromRedisValue>(c: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(c).await.unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Refusals and handshake replies, byte for byte.
async fn raw_checks(addr: &str) {
    let mut r = Raw::open(addr).await;
    r.says(b"PING\r\n", "-NOAUTH Authentication required.\r\n").await;
    assert!(r.ask(b"AUTH nope\r\n", 10).await.starts_with("-WRONGPASS"));
    r.says(format!("AUTH {PASSWORD}\r\n").as_bytes(), "+OK\r\n").await;
    r.says(b"PING\r\n", "+PONG\r\n").await;
    r.says(b"*2\r\n$5\r\nHELLO\r\n$1\r\n4\r\n", "-NOPROTO sorry, this protocol version is not supported\r\n").await;
    let hello = r.ask(b"*2\r\n$5\r\nHELLO\r\n$1\r\n2\r\n", 144).await;
    assert!(hello.starts_with("*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n") && hello.contains("sentinel"), "{hello:?}");
    r.says(b"CLIENT SETNAME test\r\nCLIENT SETINFO lib-name x\r\n", "+OK\r\n+OK\r\n").await;
    r.says(b"SELECT 0\r\n", "+OK\r\n").await;
    r.says(b"COMMAND\r\n", "*0\r\n").await;
    assert!(r.ask(b"PUBLISH +switch-master x\r\n", 5).await.starts_with("-ERR"));
    r.says(b"SENTINEL get-master-addr-by-name nosuch\r\n", "*-1\r\n").await;
    r.says(b"SENTINEL master nosuch\r\n", "-ERR No such master with that name\r\n").await;
    r.says(b"QUIT\r\n", "+OK\r\n").await;
    assert!(r.closed().await, "QUIT closes");
}

/// RESP3, and an oversized bulk.
async fn raw_resp3_and_limits(addr: &str) {
    // RESP3 (redis-py 8 sends HELLO 3 and does not fall back): maps, nulls.
    let mut r = Raw::open(addr).await;
    let hello = r.ask(format!("HELLO 3 AUTH default {PASSWORD}\r\n").as_bytes(), 130).await;
    assert!(hello.starts_with("%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n") && hello.contains(":3\r\n"), "{hello:?}");
    r.says(b"SENTINEL get-master-addr-by-name nosuch\r\n", "_\r\n").await;
    let master = r.ask(b"SENTINEL master db\r\n", 20).await;
    assert!(master.starts_with("%22\r\n$4\r\nname\r\n$2\r\ndb\r\n"), "{master:?}");
    drop(r);

    // An oversized bulk is refused and the connection closed.
    let mut r = Raw::open(addr).await;
    r.says(format!("AUTH {PASSWORD}\r\n").as_bytes(), "+OK\r\n").await;
    r.says(b"*2\r\n$8\r\nSENTINEL\r\n$1000000\r\n", "-ERR Protocol error: invalid bulk length\r\n").await;
    assert!(r.closed().await, "a protocol error closes");
}

/// Each command's reply through the redis crate.
async fn reply_shapes(f: &PairFixture, epoch: u64) {
    let addrs = &f.cluster.sentinel_addrs;
    let p1 = f.data_port("db-1").to_string();
    let mut c = sentinel_conn(&addrs[1]).await;
    let (ip, port): (String, String) = query(&mut c, &["SENTINEL", "get-master-addr-by-name", "db"]).await;
    assert_eq!((ip.as_str(), port.as_str()), ("127.0.0.1", p1.as_str()));
    let masters: Vec<HashMap<String, String>> = query(&mut c, &["SENTINEL", "masters"]).await;
    assert_eq!(masters.len(), 1, "{masters:?}");
    let m = &masters[0];
    assert_eq!((m["name"].as_str(), m["port"].as_str(), m["flags"].as_str()), ("db", p1.as_str(), "master"));
    assert_eq!((m["num-other-sentinels"].as_str(), m["quorum"].as_str()), ("2", "2"));
    assert_eq!(m["config-epoch"], epoch.to_string());
    let master: HashMap<String, String> = query(&mut c, &["sentinel", "MASTER", "db"]).await;
    assert_eq!(&master, m);
    replicas_and_sentinels(f, &mut c).await;
    info_and_role(f, &mut c).await;
}

async fn replicas_and_sentinels(f: &PairFixture, c: &mut redis::aio::MultiplexedConnection) {
    let addrs = &f.cluster.sentinel_addrs;
    let p1 = f.data_port("db-1").to_string();
    let p2 = f.data_port("db-2").to_string();
    for sub in ["replicas", "slaves"] {
        let r: Vec<HashMap<String, String>> = query(c, &["SENTINEL", sub, "db"]).await;
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!((r[0]["port"].as_str(), r[0]["flags"].as_str()), (p2.as_str(), "slave"));
        assert_eq!((r[0]["master-port"].as_str(), r[0]["master-link-status"].as_str()), (p1.as_str(), "ok"));
    }
    let s: Vec<HashMap<String, String>> = query(c, &["SENTINEL", "sentinels", "db"]).await;
    let mut ports: Vec<String> = s.iter().map(|x| format!("{}:{}", x["ip"], x["port"])).collect();
    ports.sort();
    let mut others = vec![addrs[0].clone(), addrs[2].clone()];
    others.sort();
    assert_eq!(ports, others, "the other coordinators: {s:?}");
    assert!(s.iter().all(|x| x["flags"] == "sentinel"));
}

async fn info_and_role(f: &PairFixture, c: &mut redis::aio::MultiplexedConnection) {
    let addrs = &f.cluster.sentinel_addrs;
    let p1 = f.data_port("db-1").to_string();
    let ck: String = query(c, &["SENTINEL", "ckquorum", "db"]).await;
    assert!(ck.starts_with("OK ") && ck.contains("usable Sentinels"), "{ck}");
    let id: String = query(c, &["SENTINEL", "myid"]).await;
    assert_eq!(id, format!("{:040x}", 2));
    let info: String = query(c, &["INFO"]).await;
    for want in
        ["redis_version:7.0.0", "redis_mode:sentinel", "# Sentinel", "sentinel_masters:1", "master0:name=db,status=ok"]
    {
        assert!(info.contains(want), "INFO lacks {want}: {info}");
    }
    let mut resp3 = redis::Client::open(format!("{}?protocol=resp3", url(&addrs[0])))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let over_resp3: Vec<HashMap<String, String>> = query(&mut resp3, &["SENTINEL", "masters"]).await;
    assert_eq!(over_resp3[0]["port"], p1, "the same over RESP3");
    let role: redis::Value = query(c, &["ROLE"]).await;
    assert_eq!(
        role,
        redis::Value::Array(vec![
            redis::Value::BulkString(b"sentinel".to_vec()),
            redis::Value::Array(vec![redis::Value::BulkString(b"db".to_vec())]),
        ])
    );
}

/// One raw subscriber on `+switch-master` and on everything (`*`).
async fn subscriber(addr: &str) -> Raw {
    let mut r = Raw::open(addr).await;
    r.says(format!("AUTH {PASSWORD}\r\n").as_bytes(), "+OK\r\n").await;
    r.says(b"SUBSCRIBE +switch-master\r\n", "*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n").await;
    r.says(b"PSUBSCRIBE *\r\n", "*3\r\n$10\r\npsubscribe\r\n$1\r\n*\r\n:2\r\n").await;
    assert!(r.ask(b"INFO\r\n", 10).await.starts_with("-ERR Can't execute 'info'"), "only Pub/Sub commands now");
    r.says(b"PING\r\n", "*2\r\n$4\r\npong\r\n$0\r\n\r\n").await;
    r
}

/// Every write of the redis-rs Sentinel client: when, and to which port.
type Writes = Arc<Mutex<Vec<(Instant, u16)>>>;

/// Writes in a loop through redis-rs's own Sentinel client, looking the
/// master up again after every failure.
async fn sentinel_writer(addrs: Vec<String>, writes: Writes, stop: Arc<std::sync::atomic::AtomicBool>) {
    let infos: Vec<String> = addrs.iter().map(|a| url(a)).collect();
    let mut sentinel = redis::sentinel::Sentinel::build(infos).unwrap();
    let mut conn: Option<(redis::aio::MultiplexedConnection, u16)> = None;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(300)))
        .set_response_timeout(Some(Duration::from_millis(500)));
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if conn.is_none() {
            let found = tokio::time::timeout(Duration::from_secs(2), sentinel.async_master_for("db", None)).await;
            if let Ok(Ok(client)) = found {
                let port = match client.get_connection_info().addr() {
                    redis::ConnectionAddr::Tcp(_, p) => *p,
                    other => panic!("unexpected address {other:?}"),
                };
                if let Ok(c) = client.get_multiplexed_async_connection_with_config(&config).await {
                    conn = Some((c, port));
                }
            }
        }
        if let Some((c, port)) = conn.as_mut() {
            i += 1;
            match redis::cmd("SET").arg("sentinel-key").arg(i).query_async::<()>(c).await {
                Ok(()) => writes.lock().unwrap().push((Instant::now(), *port)),
                Err(_) => conn = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_clients_find_the_primary_through_a_switchover_and_a_crash() {
    let _serial = serial();
    let secrets = tempfile::tempdir().unwrap();
    let pw = secrets.path().join("sentinel.pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let extra = ["--sentinel-password-file".to_owned(), pw.display().to_string()];
    let mut f = PairFixture::start_on(Cluster::start_with_sentinels(3, &extra)).await;
    let epoch = f.wait_ready().await;
    let addrs = f.cluster.sentinel_addrs.clone();
    raw_checks(&addrs[0]).await;
    raw_resp3_and_limits(&addrs[0]).await;
    reply_shapes(&f, epoch).await;

    // A switchover: the demoted primary's clients are disconnected, and
    // every subscriber hears of it.
    let mut sub = subscriber(&addrs[2]).await;
    let (p1, p2) = (f.data_port("db-1"), f.data_port("db-2"));
    let mut on_old = redis_conn(p1).await.unwrap();
    let _: String = redis::cmd("PING").query_async(&mut on_old).await.unwrap();
    f.cluster.client().switchover("db", Some("db-2"), Duration::from_secs(30)).await.expect("switchover");
    let heard = sub.read(1 << 16, Duration::from_secs(5)).await;
    let switch = format!("db 127.0.0.1 {p1} 127.0.0.1 {p2}");
    assert!(
        heard.contains(&format!("$7\r\nmessage\r\n$14\r\n+switch-master\r\n${}\r\n{switch}\r\n", switch.len())),
        "no +switch-master message: {heard:?}"
    );
    assert!(heard.contains("$8\r\npmessage\r\n$1\r\n*\r\n$14\r\n+switch-master\r\n"), "no pmessage: {heard:?}");
    let start = Instant::now();
    loop {
        // The connection was killed (a reconnection would need a new
        // connection id; the multiplexed connection reports the error).
        if redis::cmd("PING").query_async::<String>(&mut on_old).await.is_err() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the demoted primary kept its clients");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(role_of(p1).await.as_deref(), Some("slave"));

    // redis-rs's Sentinel client writes, then the primary's host dies.
    let writes: Writes = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(sentinel_writer(addrs.clone(), writes.clone(), stop.clone()));
    let start = Instant::now();
    while !writes.lock().unwrap().iter().any(|(_, p)| *p == p2) {
        assert!(start.elapsed() < Duration::from_secs(10), "redis-rs never wrote to db-2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Instant::now();
    f.crash(1);
    let first = loop {
        if let Some((at, _)) = writes.lock().unwrap().iter().find(|(at, p)| *at > killed && *p == p1) {
            break *at;
        }
        assert!(killed.elapsed() < Duration::from_secs(15), "redis-rs did not write to the new primary within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = first - killed;
    println!("redis-rs Sentinel client: kill -9 of the primary's host -> first write to the new primary: {took:?}");
    eprintln!("redis-rs Sentinel client: kill -9 -> first write: {} ms", took.as_millis());
    let heard = sub.read(1 << 16, Duration::from_millis(500)).await;
    for want in ["+sdown", "+odown", "+switch-master"] {
        assert!(heard.contains(want), "no {want} event after the crash: {heard:?}");
    }
    assert!(heard.contains(&format!("db 127.0.0.1 {p2} 127.0.0.1 {p1}")), "{heard:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let mut c = sentinel_conn(&addrs[0]).await;
    let (_, port): (String, String) = query(&mut c, &["SENTINEL", "get-master-addr-by-name", "db"]).await;
    assert_eq!(port, p1.to_string());
    announce_addresses_are_answered(&f, &mut c).await;
}

/// A member with an announce address is given to clients there, not at its
/// data URL (which replicas keep following); the others still at theirs.
async fn announce_addresses_are_answered(f: &PairFixture, c: &mut redis::aio::MultiplexedConnection) {
    let client = f.cluster.client();
    let mut spec = client.get_group("db", pb::Consistency::Linearizable).await.unwrap().spec.expect("the group's spec");
    let primary = spec.members.iter_mut().find(|m| m.id == "db-1").unwrap();
    primary.announce = "192.0.2.10:16379".into();
    let mut bad = spec.clone();
    bad.members[1].announce = "no-port".into();
    let refused = client.apply_group(bad).await.unwrap_err().to_string();
    assert!(refused.contains("members[1].announce") && refused.contains("HOST:PORT"), "{refused}");
    client.apply_group(spec).await.unwrap();
    let start = Instant::now();
    loop {
        let (ip, port): (String, String) = query(c, &["SENTINEL", "get-master-addr-by-name", "db"]).await;
        if (ip.as_str(), port.as_str()) == ("192.0.2.10", "16379") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the announce address is not answered: {ip}:{port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r: Vec<HashMap<String, String>> = query(c, &["SENTINEL", "replicas", "db"]).await;
    assert_eq!(r[0]["port"], f.data_port("db-2").to_string(), "db-2 has no announce address: {r:?}");
    assert_eq!((r[0]["master-host"].as_str(), r[0]["master-port"].as_str()), ("192.0.2.10", "16379"), "{r:?}");
}

/// A `rediss://` client of `addr` that trusts the CA `ca` only, presents
/// `cert` when given, and gives the password when `password`.
fn tls_client(addr: &str, ca: &Path, cert: Option<&TlsFiles>, password: bool) -> redis::Client {
    // The redis crate builds its TLS configuration with rustls's default
    // provider; quorate's is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = if password { format!("rediss://:{PASSWORD}@{addr}") } else { format!("rediss://{addr}") };
    let certs = redis::TlsCertificates {
        client_tls: cert.map(|c| redis::ClientTlsConfig {
            client_cert: std::fs::read(&c.cert).unwrap(),
            client_key: std::fs::read(&c.key).unwrap(),
        }),
        root_cert: Some(std::fs::read(ca).unwrap()),
    };
    redis::Client::build_with_tls(url, certs).unwrap()
}

/// A connection through `client`, bounded in time.
async fn connect(client: &redis::Client) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(3)));
    client.get_multiplexed_async_connection_with_config(&config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_over_tls_with_a_password_and_client_certificates() {
    let _serial = serial();
    let secrets = tempfile::tempdir().unwrap();
    let pw = secrets.path().join("sentinel.pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let extra = ["--sentinel-password-file".to_owned(), pw.display().to_string(), "--sentinel-tls".to_owned()];
    let mut cluster = Cluster::prepare_with_sentinels(3, &extra);
    // Node 3 requires a client certificate as well.
    cluster.node_args.get_mut(&3).unwrap().push("--sentinel-tls-client-auth".to_owned());
    for id in 1..=3 {
        cluster.start_node(id);
    }
    let f = PairFixture::start_on(cluster).await;
    f.wait_ready().await;
    let addrs = f.cluster.sentinel_addrs.clone();
    let p1 = f.data_port("db-1").to_string();
    // A certificate of the cluster CA, and the CA itself.
    let reader = f.cluster.cert("reader", None);
    let ca = reader.ca.as_path();

    // rediss:// with the cluster CA and the password, no client certificate.
    let mut c = connect(&tls_client(&addrs[0], ca, None, true)).await.expect("rediss:// with the CA");
    let (ip, port): (String, String) = query(&mut c, &["SENTINEL", "get-master-addr-by-name", "db"]).await;
    assert_eq!((ip.as_str(), port.as_str()), ("127.0.0.1", p1.as_str()));
    // TLS is not the authentication: without the password, NOAUTH.
    let mut anon = connect(&tls_client(&addrs[0], ca, None, false)).await.unwrap();
    let e = redis::cmd("SENTINEL").arg("masters").query_async::<redis::Value>(&mut anon).await.unwrap_err();
    assert!(e.to_string().contains("NOAUTH"), "{e}");

    // redis-rs's own Sentinel client over TLS (the connection info carries
    // the CA) finds the master too.
    let infos: Vec<redis::ConnectionInfo> =
        addrs[..2].iter().map(|a| tls_client(a, ca, None, true).get_connection_info().clone()).collect();
    let mut sentinel = redis::sentinel::Sentinel::build(infos).unwrap();
    let master = tokio::time::timeout(Duration::from_secs(5), sentinel.async_master_for("db", None))
        .await
        .expect("no master within 5 s")
        .unwrap();
    assert!(
        matches!(master.get_connection_info().addr(), redis::ConnectionAddr::Tcp(_, p) if p.to_string() == p1),
        "{:?}",
        master.get_connection_info().addr()
    );

    // Plain text on the TLS port: no RESP reply (a TLS alert record), and
    // the connection closes.
    let mut raw = Raw::open(&addrs[0]).await;
    let got = raw.ask(format!("AUTH {PASSWORD}\r\nPING\r\n").as_bytes(), 7).await;
    assert!(!got.contains("+OK") && !got.contains("PONG"), "a plain-text reply on the TLS port: {got:?}");
    assert!(raw.closed().await, "the TLS port kept a plain-text connection open");
    let plain = redis::Client::open(url(&addrs[0])).unwrap();
    assert!(connect(&plain).await.is_err(), "redis:// connected to the TLS port");

    // Node 3 requires a certificate: none is refused, and so is one from
    // another CA; the cluster CA's (any identity) is let in.
    // (TLS 1.3: the client's handshake completes, and the server's alert
    // arrives as the answer to its AUTH.)
    let e = connect(&tls_client(&addrs[2], ca, None, true)).await.err().map(|e| e.to_string());
    assert!(e.as_ref().is_some_and(|e| e.contains("CertificateRequired")), "no certificate: {e:?}");
    let other = tempfile::tempdir().unwrap();
    quorate::tls::certs::init(other.path()).unwrap();
    let stranger = ensure_cert(other.path(), "reader", None);
    let e = connect(&tls_client(&addrs[2], ca, Some(&stranger), true)).await.err().map(|e| e.to_string());
    assert!(e.as_ref().is_some_and(|e| e.contains("UnknownCA")), "another CA's certificate: {e:?}");
    let mut c3 = connect(&tls_client(&addrs[2], ca, Some(&reader), true)).await.expect("a cluster certificate");
    let (_, port): (String, String) = query(&mut c3, &["SENTINEL", "get-master-addr-by-name", "db"]).await;
    assert_eq!(port, p1);
    // Where a certificate is optional, one that is given works too.
    let mut c1 = connect(&tls_client(&addrs[1], ca, Some(&reader), true)).await.unwrap();
    let pong: String = query(&mut c1, &["PING"]).await;
    assert_eq!(pong, "PONG");
}

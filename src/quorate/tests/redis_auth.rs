//! Redis credentials and `rediss://` against real redis-server processes:
//! the heartbeat stores agents and coordinators use, and the agent's Redis
//! driver, with a password from a file, an ACL user, TLS verified against a
//! private CA (and a client certificate), and the errors of a wrong
//! password, a missing one and a wrong CA, none of which shows a password.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quorate::agent::driver::{RedisDriver, RoleDriver};
use quorate::config::AgentConfig;
use quorate::observation::store::{RedisStores, Stores};
use quorate::redis_access::RedisAccess;
use quorate::tls::certs::{self, IssueRequest};
use quorate_core::access::Role as CertRole;
use quorate_core::election::Role;

const PASSWORD: &str = "s3cret-hb-pw";
const TIMEOUT: Duration = Duration::from_secs(3);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A redis-server in a temp dir of its own, killed when dropped (also when
/// the test fails).
struct RedisProc {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RedisProc {
    /// `args` come after the port, bind address and persistence flags;
    /// `tls` serves TLS on the port (and plain text nowhere).
    fn start(args: &[&str], tls: Option<&TlsFiles>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).arg("--dir").arg(dir.path());
        match tls {
            Some(t) => {
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&t.server_cert)
                    .arg("--tls-key-file")
                    .arg(&t.server_key)
                    .arg("--tls-ca-cert-file")
                    .arg(&t.ca);
            }
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
        }
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (deploy/test.sh installs it)");
        let r = RedisProc { port, child, _dir: dir };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "redis-server did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
struct TlsFiles {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl TlsFiles {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = certs::init(dir.path()).unwrap();
        let mut server = IssueRequest::new("node-1", CertRole::Node);
        server.sans = vec!["127.0.0.1".into()];
        let (server_cert, server_key) = certs::issue(dir.path(), &server).unwrap();
        let (client_cert, client_key) = certs::issue(dir.path(), &IssueRequest::new("ops", CertRole::Admin)).unwrap();
        TlsFiles { _dir: dir, ca, server_cert, server_key, client_cert, client_key }
    }
}

/// An agent config with these `redis_*` fields, loaded as the agent loads
/// it (without the environment).
fn access(configure: impl FnOnce(&mut AgentConfig)) -> Arc<RedisAccess> {
    let mut c = AgentConfig::default();
    configure(&mut c);
    Arc::new(c.redis_options().load(None).unwrap())
}

fn password_file(dir: &Path, password: &str) -> PathBuf {
    let p = dir.join("redis-password");
    std::fs::write(&p, format!("{password}\n")).unwrap();
    p
}

async fn round_trip(stores: &RedisStores, url: &str) -> Result<(), String> {
    let key = "quorate:hb:{g}:m1".to_owned();
    stores.set(url, &key, "beat-1", 10_000, TIMEOUT).await.map_err(|e| e.to_string())?;
    let got = stores.get_many(url, &[key], TIMEOUT).await.map_err(|e| e.to_string())?;
    assert_eq!(got, vec![Some("beat-1".to_owned())]);
    Ok(())
}

fn assert_no_secret(err: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!err.contains(s), "the error shows a password ({s}): {err}");
    }
}

#[tokio::test]
async fn heartbeats_with_a_password_file_and_clear_errors_without_it() {
    let redis = RedisProc::start(&["--requirepass", PASSWORD], None);
    let dir = tempfile::tempdir().unwrap();
    let good = access(|c| c.redis_password_file = password_file(dir.path(), PASSWORD));
    round_trip(&RedisStores::with_access(good), &redis.url()).await.unwrap();

    // A wrong password: the login fails, and says so.
    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = access(|c| c.redis_password_file = password_file(wrong_dir.path(), "not-the-pw"));
    let err = round_trip(&RedisStores::with_access(wrong), &redis.url()).await.unwrap_err();
    eprintln!("wrong password: {err}");
    assert!(err.starts_with(&format!("heartbeat store {}: authentication failed", redis.url())), "{err}");
    assert_no_secret(&err, &[PASSWORD, "not-the-pw"]);

    // No password at all: Redis answers NOAUTH, and the error says what to give.
    let err = round_trip(&RedisStores::new(), &redis.url()).await.unwrap_err();
    eprintln!("no password: {err}");
    assert!(err.contains("authentication required") && err.contains("redis_password_file"), "{err}");

    // A URL's own credentials win over the process's, and are never shown.
    let own = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port);
    round_trip(&RedisStores::new(), &own).await.unwrap();
    let bad_own = format!("redis://:bad-url-pw@127.0.0.1:{}", redis.port);
    let err = round_trip(&RedisStores::with_access(access(|_| {})), &bad_own).await.unwrap_err();
    assert!(err.contains(&format!("redis://:***@127.0.0.1:{}", redis.port)), "{err}");
    assert_no_secret(&err, &["bad-url-pw"]);
}

#[tokio::test]
async fn heartbeats_as_an_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("users.acl");
    // The least a heartbeat store user needs: SET and MGET on the keys.
    std::fs::write(
        &acl,
        "user default off\nuser quorate-hb on >hb-user-pw ~quorate:hb:* resetchannels -@all +set +mget\n",
    )
    .unwrap();
    let redis = RedisProc::start(&["--aclfile", acl.to_str().unwrap()], None);
    let pw_dir = tempfile::tempdir().unwrap();
    let user = access(|c| {
        c.redis_username = "quorate-hb".into();
        c.redis_password_file = password_file(pw_dir.path(), "hb-user-pw");
    });
    round_trip(&RedisStores::with_access(user), &redis.url()).await.unwrap();

    // The same password without the user is the (disabled) default user.
    let no_user = access(|c| c.redis_password_file = password_file(pw_dir.path(), "hb-user-pw"));
    let err = round_trip(&RedisStores::with_access(no_user), &redis.url()).await.unwrap_err();
    assert!(err.contains("authentication failed"), "{err}");
    assert_no_secret(&err, &["hb-user-pw"]);
}

#[tokio::test]
async fn heartbeats_over_tls_verified_against_the_ca() {
    let tls = TlsFiles::new();
    let redis = RedisProc::start(&["--tls-auth-clients", "no"], Some(&tls));
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let good = access(|c| c.redis_tls_ca = tls.ca.clone());
    round_trip(&RedisStores::with_access(good), &url).await.unwrap();

    // Another CA: the server's certificate is refused, and the error says TLS.
    let other = TlsFiles::new();
    let wrong = access(|c| c.redis_tls_ca = other.ca.clone());
    let err = round_trip(&RedisStores::with_access(wrong), &url).await.unwrap_err();
    eprintln!("wrong CA: {err}");
    assert!(err.starts_with(&format!("heartbeat store {url}: TLS connection failed")), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");

    // No CA: refused before connecting, naming the setting.
    let err = round_trip(&RedisStores::new(), &url).await.unwrap_err();
    assert!(err.contains("rediss:// needs the Redis servers' CA: give redis_tls_ca"), "{err}");
}

#[tokio::test]
async fn heartbeats_over_tls_with_a_client_certificate_and_a_password() {
    let tls = TlsFiles::new();
    let redis = RedisProc::start(&["--tls-auth-clients", "yes", "--requirepass", PASSWORD], Some(&tls));
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let dir = tempfile::tempdir().unwrap();
    let pw = password_file(dir.path(), PASSWORD);
    let full = access(|c| {
        c.redis_tls_ca = tls.ca.clone();
        c.redis_tls_cert = tls.client_cert.clone();
        c.redis_tls_key = tls.client_key.clone();
        c.redis_password_file = pw.clone();
    });
    round_trip(&RedisStores::with_access(full), &url).await.unwrap();

    // Without the client certificate the server ends the handshake.
    let no_cert = access(|c| {
        c.redis_tls_ca = tls.ca.clone();
        c.redis_password_file = pw.clone();
    });
    let err = round_trip(&RedisStores::with_access(no_cert), &url).await.unwrap_err();
    eprintln!("no client certificate: {err}");
    assert!(err.starts_with(&format!("heartbeat store {url}:")), "{err}");
    assert_no_secret(&err, &[PASSWORD]);
}

/// Waits until `check` holds for the driver's view of its service.
async fn wait_state(d: &RedisDriver, what: &str, check: impl Fn(&quorate::agent::driver::ServiceState) -> bool) {
    let start = Instant::now();
    loop {
        let s = d.state().await;
        if check(&s) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{what}: never; last state {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ACL of a data service: replication as the default user (with the
/// replica's masterauth), the agent as a user with only what its driver and
/// fencer run (README: "Redis credentials").
const DATA_ACL: &str = "user default on >s3cret-hb-pw ~* &* +@all\n\
    user quorate-agent on >agent-pw ~quorate:lease:* resetchannels -@all \
    +info +replicaof +client|pause +client|unpause +client|kill +set +del\n";

#[tokio::test]
async fn the_redis_driver_switches_over_a_password_protected_pair_as_an_acl_user() {
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("users.acl");
    std::fs::write(&acl, DATA_ACL).unwrap();
    // The replica authenticates to its primary with its own masterauth
    // (the operator's redis.conf; the driver never sets it).
    let args = ["--aclfile", acl.to_str().unwrap(), "--masterauth", PASSWORD];
    let (a, b) = (RedisProc::start(&args, None), RedisProc::start(&args, None));
    let dir = tempfile::tempdir().unwrap();
    let creds = access(|c| {
        c.redis_username = "quorate-agent".into();
        c.redis_password_file = password_file(dir.path(), "agent-pw");
    });
    let da = RedisDriver::new("g", &a.url(), creds.clone());
    let db = RedisDriver::new("g", &b.url(), creds.clone());

    let s = db.state().await;
    assert!(s.reachable && s.role == Some(Role::Primary), "{s:?}");
    db.follow(&a.url(), 1).await.unwrap();
    let following = format!("127.0.0.1:{}", a.port);
    wait_state(&db, "b follows a with the link up", |s| {
        s.role == Some(Role::Replica) && s.link_up && s.following.as_deref() == Some(following.as_str())
    })
    .await;

    // Switch over: a pauses writes, b catches up and is promoted, a follows b.
    let offset = da.pause_writes().await.unwrap();
    let start = Instant::now();
    while da.offset_of(&b.url()).await.unwrap() < offset {
        assert!(start.elapsed() < Duration::from_secs(15), "b never caught up to {offset}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.promote(2).await.unwrap();
    wait_state(&db, "b is primary", |s| s.role == Some(Role::Primary)).await;
    da.follow(&b.url(), 2).await.unwrap();
    let following = format!("127.0.0.1:{}", b.port);
    wait_state(&da, "a follows b", |s| {
        s.role == Some(Role::Replica) && s.link_up && s.following.as_deref() == Some(following.as_str())
    })
    .await;

    // Without the password the driver sees nothing and says why.
    let bare = RedisDriver::new("g", &b.url(), Arc::new(RedisAccess::default()));
    assert!(!bare.state().await.reachable);
    let err = bare.promote(3).await.unwrap_err().to_string();
    eprintln!("driver without password: {err}");
    assert!(err.starts_with(&format!("data store {}: authentication required", b.url())), "{err}");
    assert_no_secret(&err, &[PASSWORD, "agent-pw"]);
}

//! `RedisStores` against a real redis-server, through a proxy that can hold
//! back the replies of one connection (what a lost TCP segment does): a late
//! reply must not hold up the next call, a stalled connection is replaced,
//! the number of connections stays bounded, and a restarted server is
//! reached again.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Redis;
use quorate::observation::store::{CONNS_PER_STORE, RedisStores, STALLED_AFTER, StoreError, Stores};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to one upstream; each accepted connection can be frozen
/// (its replies held back until thawed).
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<Conn>>>,
    /// New connections start frozen.
    freeze_new: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

struct Conn {
    frozen: Arc<AtomicBool>,
    /// Set when the client closed the connection.
    closed: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let list = conns.clone();
        let freeze_new = Arc::new(AtomicBool::new(false));
        let start_frozen = freeze_new.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
                let frozen = Arc::new(AtomicBool::new(start_frozen.load(Ordering::SeqCst)));
                let closed = Arc::new(AtomicBool::new(false));
                list.lock().unwrap().push(Conn { frozen: frozen.clone(), closed: closed.clone() });
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    closed.store(true, Ordering::SeqCst);
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while frozen.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Proxy { port, conns, freeze_new, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    fn open(&self) -> usize {
        self.conns.lock().unwrap().iter().filter(|c| !c.closed.load(Ordering::SeqCst)).count()
    }

    fn freeze(&self, i: usize, on: bool) {
        self.conns.lock().unwrap()[i].frozen.store(on, Ordering::SeqCst);
    }

    /// Freezes (or thaws) every connection, present and future.
    fn freeze_all(&self, on: bool) {
        self.freeze_new.store(on, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().iter() {
            c.frozen.store(on, Ordering::SeqCst);
        }
    }

    fn closed(&self, i: usize) -> bool {
        self.conns.lock().unwrap()[i].closed.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const T: Duration = Duration::from_millis(300);

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_late_reply_does_not_hold_up_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path(), "hb");
    let proxy = Proxy::start(redis.port).await;
    let url = proxy.url();
    let stores = RedisStores::new();

    stores.set(&url, "k", "v1", 60_000, Duration::from_secs(5)).await.unwrap();
    assert_eq!(proxy.accepted(), 1);

    // The only connection's replies are held back: the write lands but its
    // reply is late, so the call times out.
    proxy.freeze(0, true);
    let err = stores.set(&url, "k", "v2", 60_000, T).await.unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err}");
    // The next call does not queue behind it: it goes out on a new
    // connection and sees the late write.
    assert_eq!(stores.get_many(&url, &["k".into()], Duration::from_secs(5)).await.unwrap(), vec![Some("v2".into())]);
    assert_eq!(proxy.accepted(), 2);

    // Once the late reply arrives the first connection is idle again and
    // reused: no new connections for a run of calls.
    proxy.freeze(0, false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..20 {
        stores.set(&url, "k", &format!("v{i}"), 60_000, Duration::from_secs(5)).await.unwrap();
    }
    assert_eq!(proxy.accepted(), 2, "connections are reused");
    assert!(!proxy.closed(0), "a late reply does not close the connection");
}

#[tokio::test]
async fn a_stalled_connection_is_replaced_and_connections_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path(), "hb");
    let proxy = Proxy::start(redis.port).await;
    let url = proxy.url();
    let stores = RedisStores::new();

    stores.set(&url, "k", "v", 60_000, Duration::from_secs(5)).await.unwrap();
    // Every connection, present and future, stalls.
    proxy.freeze_all(true);
    for _ in 0..(CONNS_PER_STORE + 3) {
        assert!(stores.get_many(&url, &["k".into()], Duration::from_millis(50)).await.is_err());
    }
    // Calls beyond the limit fail at once rather than open more.
    let err = stores.get_many(&url, &["k".into()], T).await.unwrap_err();
    assert!(err.to_string().contains("waiting for late replies"), "{err}");
    assert!(proxy.accepted() <= CONNS_PER_STORE, "{} connections", proxy.accepted());

    // With no reply within STALLED_AFTER, every stalled connection is closed.
    let stalled = proxy.accepted();
    until("the stalled connections are closed", async || (0..stalled).all(|i| proxy.closed(i))).await;
    assert!(STALLED_AFTER < Duration::from_secs(30));

    // New connections work.
    proxy.freeze_all(false);
    until("calls succeed again", async || stores.get_many(&url, &["k".into()], T).await.is_ok()).await;
    assert!(proxy.open() <= CONNS_PER_STORE);
}

#[tokio::test]
async fn a_restarted_server_is_reached_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path(), "hb");
    let url = redis.url();
    let stores = RedisStores::new();
    let t = Duration::from_millis(500);

    stores.set(&url, "k", "v1", 60_000, t).await.unwrap();
    redis.kill();
    assert!(stores.get_many(&url, &["k".into()], t).await.is_err());
    assert!(stores.get_many(&url, &["k".into()], t).await.is_err(), "a refused connect is an error too");

    redis.restart();
    // The old connection was reset by the restart: the store connects anew.
    until("writes succeed again", async || stores.set(&url, "k", "v2", 60_000, t).await.is_ok()).await;
    assert_eq!(stores.get_many(&url, &["k".into()], t).await.unwrap(), vec![Some("v2".to_owned())]);
}

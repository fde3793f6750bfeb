//! Heartbeat stores: where heartbeat keys are written and read.
//!
//! [`Stores`] is the I/O boundary of the agent and of coordinator observers:
//! set one key with a TTL, read many keys, on the store named by a URL.
//! [`RedisStores`] talks to Redis (a few connections per URL so that one
//! late reply does not hold up the next call, every wait bounded by a
//! timeout), with the process's credentials and TLS
//! ([`crate::redis_access`]); [`MemStores`] is the in-memory twin for tests.
//! Errors name a store by its redacted URL (no password).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quorate_core::group::redacted;
use redis::aio::MultiplexedConnection;

use crate::redis_access::{RedisAccess, describe};

/// Why a store call failed. Observers treat every failure as "unreachable".
/// `url` is redacted (any password replaced by `***`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("heartbeat store {url}: timed out after {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("heartbeat store {url}: {message}")]
    Failed { url: String, message: String },
}

/// Set and read heartbeat keys on stores named by URL.
pub trait Stores: Send + Sync + 'static {
    /// `SET key value PX ttl_ms`, bounded by `timeout`.
    fn set(
        &self,
        url: &str,
        key: &str,
        value: &str,
        ttl_ms: u64,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// `MGET keys`, bounded by `timeout`.
    fn get_many(
        &self,
        url: &str,
        keys: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Option<String>>, StoreError>> + Send;
}

/// Redis stores: a few connections per URL, each carrying one call at a time.
///
/// Heartbeats ride on TCP, and TCP retransmits a lost segment after at least
/// 200 ms, doubling each time it is lost again. On one connection a single
/// lost packet would stall every later call behind it (head-of-line
/// blocking), and on a link with 20% loss stalls of 600 ms or more come
/// every few seconds: longer than `down_after_ms`. So each call takes an
/// *idle* connection (opening one if fewer than [`CONNS_PER_STORE`] exist),
/// and a call that outlives its caller's timeout keeps running in its own
/// task until the late reply frees the connection. A stall then delays one
/// call, not the next one, and losses on different connections are
/// independent.
///
/// A connection is replaced when Redis reports it broken or when a call on
/// it gets no reply within [`STALLED_AFTER`] (a peer gone without a reset, or
/// TCP backing off on a link that has healed).
#[derive(Debug, Default)]
pub struct RedisStores {
    pools: Arc<Mutex<HashMap<String, Pool>>>,
    access: Arc<RedisAccess>,
}

/// Connections per store URL, at most. Without loss one is used (calls
/// from one loop never overlap); with 20% loss about a third of calls are
/// late by 200 ms or more, and with three connections the writer and the
/// readers still ran out of idle ones often enough to flap a member's
/// observation (the 20% loss scenario of the fault suite: 38 false downs in
/// 15 s with three, 15 with eight). Idle connections cost Redis one client
/// slot each.
pub const CONNS_PER_STORE: usize = 8;

/// The longest a connection may take to connect or to answer one call before
/// it is given up. Longer than TCP's first retransmissions of a lost segment
/// (200 + 400 + 800 ms) and of a lost SYN (1 s), so loss alone does not
/// close connections; short enough that a healed link is read again within a
/// couple of seconds.
pub const STALLED_AFTER: Duration = Duration::from_millis(2_000);

/// What a finished call does with its connection.
enum After {
    Keep(MultiplexedConnection),
    Drop,
    DropAll,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Vec<MultiplexedConnection>,
    /// Connections carrying a call or being opened.
    busy: usize,
}

impl RedisStores {
    /// Stores reached without credentials or TLS settings of the process
    /// (a URL may still carry its own credentials).
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores reached with `access` (the process's credentials and TLS).
    pub fn with_access(access: Arc<RedisAccess>) -> Self {
        Self { pools: Arc::default(), access }
    }

    fn pools(pools: &Mutex<HashMap<String, Pool>>) -> std::sync::MutexGuard<'_, HashMap<String, Pool>> {
        pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one command, waiting at most `timeout` for its reply. The call
    /// itself runs in a task of its own (see the type's doc), which ends
    /// within 2 × [`STALLED_AFTER`].
    async fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        url: &str,
        cmd: redis::Cmd,
        timeout: Duration,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pools = self.pools.clone();
        let access = self.access.clone();
        let owned_url = url.to_owned();
        tokio::spawn(async move {
            let _ = tx.send(Self::call(&pools, &access, &owned_url, cmd).await);
        });
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(StoreError::Timeout { url: redacted(url), after: timeout }),
            Ok(Err(_)) => Err(StoreError::Failed { url: redacted(url), message: "the call's task ended".into() }),
            Ok(Ok(res)) => res,
        }
    }

    /// Takes an idle connection (or opens one), runs `cmd` on it and puts
    /// it back unless it proved broken or stalled.
    async fn call<T: redis::FromRedisValue>(
        pools: &Mutex<HashMap<String, Pool>>,
        access: &RedisAccess,
        url: &str,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        let failed = |message: String| StoreError::Failed { url: redacted(url), message };
        let idle = {
            let mut all = Self::pools(pools);
            let pool = all.entry(url.to_owned()).or_default();
            let idle = pool.idle.pop();
            if idle.is_none() && pool.busy >= CONNS_PER_STORE {
                return Err(failed(format!("all {CONNS_PER_STORE} connections are waiting for late replies")));
            }
            pool.busy += 1;
            idle
        };
        // From here on `busy` counts this call: every path below gives the
        // connection back or gives it up, and decrements it.
        let release = |after: After| {
            let mut all = Self::pools(pools);
            let pool = all.entry(url.to_owned()).or_default();
            debug_assert!(pool.busy > 0, "busy count underflow for {}", redacted(url));
            pool.busy = pool.busy.saturating_sub(1);
            match after {
                After::Keep(c) => pool.idle.push(c),
                After::Drop => {}
                // What broke this connection (a restarted server, a reset
                // link) has most likely broken the idle ones too: open
                // fresh ones rather than fail one call on each.
                After::DropAll => pool.idle.clear(),
            }
        };
        let mut conn = match idle {
            Some(c) => c,
            None => match access.connect(url, STALLED_AFTER).await {
                Ok(c) => c,
                Err(e) => {
                    release(After::Drop);
                    return Err(failed(e));
                }
            },
        };
        match cmd.query_async::<T>(&mut conn).await {
            Ok(v) => {
                release(After::Keep(conn));
                Ok(v)
            }
            // No reply within STALLED_AFTER: this connection is stuck.
            Err(e) if e.is_timeout() => {
                release(After::Drop);
                Err(failed(describe(url, &e)))
            }
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() => {
                release(After::DropAll);
                Err(failed(describe(url, &e)))
            }
            // A reply that is an error (READONLY, LOADING, NOAUTH, ...)
            // proves the connection works.
            Err(e) => {
                release(After::Keep(conn));
                Err(failed(describe(url, &e)))
            }
        }
    }
}

impl Stores for RedisStores {
    async fn set(&self, url: &str, key: &str, value: &str, ttl_ms: u64, timeout: Duration) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(ttl_ms);
        self.run::<()>(url, cmd, timeout).await
    }

    async fn get_many(&self, url: &str, keys: &[String], timeout: Duration) -> Result<Vec<Option<String>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        cmd.arg(keys);
        self.run(url, cmd, timeout).await
    }
}

/// In-memory stores for tests: keys expire on the tokio clock, and a store
/// can be made unreachable.
#[derive(Debug, Default, Clone)]
pub struct MemStores {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Debug, Default)]
struct MemInner {
    keys: HashMap<(String, String), (String, tokio::time::Instant)>,
    down: Vec<String>,
}

impl MemStores {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the store at `url` unreachable (or reachable again).
    pub fn set_down(&self, url: &str, down: bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.down.retain(|u| u != url);
        if down {
            inner.down.push(url.to_owned());
        }
    }

    fn check(&self, url: &str) -> Result<std::sync::MutexGuard<'_, MemInner>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.down.iter().any(|u| u == url) {
            return Err(StoreError::Failed { url: redacted(url), message: "connection refused".into() });
        }
        Ok(inner)
    }
}

impl Stores for MemStores {
    async fn set(&self, url: &str, key: &str, value: &str, ttl_ms: u64, _timeout: Duration) -> Result<(), StoreError> {
        let expires = tokio::time::Instant::now() + Duration::from_millis(ttl_ms);
        self.check(url)?.keys.insert((url.to_owned(), key.to_owned()), (value.to_owned(), expires));
        Ok(())
    }

    async fn get_many(
        &self,
        url: &str,
        keys: &[String],
        _timeout: Duration,
    ) -> Result<Vec<Option<String>>, StoreError> {
        let now = tokio::time::Instant::now();
        let inner = self.check(url)?;
        Ok(keys
            .iter()
            .map(|k| inner.keys.get(&(url.to_owned(), k.clone())).filter(|(_, exp)| *exp > now).map(|(v, _)| v.clone()))
            .collect())
    }
}

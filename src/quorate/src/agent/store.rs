//! Heartbeat stores: where heartbeat keys are written and read.
//!
//! [`Stores`] is the I/O boundary of the agent and of coordinator observers:
//! set one key with a TTL, read many keys, on the store named by a URL.
//! [`RedisStores`] talks to Redis (one multiplexed connection per URL,
//! reconnecting on failure, every call bounded by a timeout); [`MemStores`]
//! is the in-memory twin for tests.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

/// Why a store call failed. Observers treat every failure as "unreachable".
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{url}: timed out after {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("{url}: {message}")]
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

/// Redis stores, one connection per URL.
#[derive(Debug, Default)]
pub struct RedisStores {
    conns: Mutex<HashMap<String, MultiplexedConnection>>,
}

impl RedisStores {
    pub fn new() -> Self {
        Self::default()
    }

    async fn conn(&self, url: &str, timeout: Duration) -> Result<MultiplexedConnection, StoreError> {
        if let Some(c) = self.conns.lock().unwrap_or_else(|p| p.into_inner()).get(url) {
            return Ok(c.clone());
        }
        let failed = |message: String| StoreError::Failed { url: url.to_owned(), message };
        let client = redis::Client::open(url).map_err(|e| failed(e.to_string()))?;
        let config =
            AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
        let conn = tokio::time::timeout(timeout, client.get_multiplexed_async_connection_with_config(&config))
            .await
            .map_err(|_| StoreError::Timeout { url: url.to_owned(), after: timeout })?
            .map_err(|e| failed(e.to_string()))?;
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(url.to_owned(), conn.clone());
        Ok(conn)
    }

    /// Runs one command; a failure drops the connection so the next call
    /// reconnects.
    async fn run<T: redis::FromRedisValue>(
        &self,
        url: &str,
        cmd: redis::Cmd,
        timeout: Duration,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let mut conn = self.conn(url, timeout).await?;
        let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
        let res = match tokio::time::timeout(left, cmd.query_async::<T>(&mut conn)).await {
            Err(_) => Err(StoreError::Timeout { url: url.to_owned(), after: timeout }),
            Ok(r) => r.map_err(|e| StoreError::Failed { url: url.to_owned(), message: e.to_string() }),
        };
        if res.is_err() {
            self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(url);
        }
        res
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
            return Err(StoreError::Failed { url: url.to_owned(), message: "connection refused".into() });
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

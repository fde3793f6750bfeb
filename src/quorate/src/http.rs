//! A small plain-HTTP server for health checks and `/metrics`, on a listen
//! address of its own (`http_listen`), as etcd serves its metrics listener
//! apart from client traffic: load balancers and Prometheus reach it
//! without client certificates, and it changes nothing.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (more are
//! closed at accept), one request per connection, request heads of at most
//! [`MAX_HEAD_BYTES`] (hyper's smallest buffer) and [`MAX_HEADERS`]
//! headers, read within [`HEAD_TIMEOUT`], every connection ended after
//! [`CONNECTION_TIMEOUT`]. Only `GET`, `HEAD` and `OPTIONS` are answered
//! (`HEAD` and `OPTIONS` without a body, as Patroni does); request bodies
//! are never read. What each path answers is the [`Handler`]'s.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Connections served at once; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request head (hyper's smallest read buffer).
pub const MAX_HEAD_BYTES: usize = 8192;
/// The most headers a request may carry.
pub const MAX_HEADERS: usize = 32;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last, answer included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);

/// The content type of OpenMetrics text (what `/metrics` answers).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An answer: status, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    /// A health answer in the Patroni style: 200 when `ok`, else 503, with
    /// a JSON body.
    pub fn check(ok: bool, body: &serde_json::Value) -> Self {
        let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        Self::json(status, body)
    }

    pub fn json(status: StatusCode, body: &serde_json::Value) -> Self {
        Self { status, content_type: "application/json", body: format!("{body}\n") }
    }

    /// `/metrics`.
    pub fn metrics(text: String) -> Self {
        Self { status: StatusCode::OK, content_type: OPENMETRICS, body: text }
    }

    /// A path this listener does not serve, naming those it does.
    pub fn not_found(paths: &[&str]) -> Self {
        Self::json(StatusCode::NOT_FOUND, &serde_json::json!({ "error": "no such path", "paths": paths }))
    }
}

/// What a listener answers: one call per request, with the path and the
/// query string (if any).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, path: &str, query: Option<&str>) -> impl Future<Output = Reply> + Send;
}

/// Binds `addr` (`IP:PORT`).
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `handler` on `listener` until `stop` turns true; open
/// connections are dropped then.
pub async fn serve<H: Handler>(listener: TcpListener, handler: H, mut stop: watch::Receiver<bool>) {
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "HTTP health and metrics listener serving");
    }
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = crate::shutdown::stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                warn!("HTTP accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "HTTP: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let handler = handler.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handler = handler.clone();
                // Only the method and the target are kept: bodies are never read.
                let method = req.method().clone();
                let path = req.uri().path().to_owned();
                let query = req.uri().query().map(str::to_owned);
                async move { Ok::<_, Infallible>(answer(handler.as_ref(), &method, &path, query.as_deref()).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(MAX_HEAD_BYTES)
                .max_headers(MAX_HEADERS)
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => debug!(%peer, "HTTP connection: {e}"),
                Err(_) => debug!(%peer, "HTTP connection timed out"),
                Ok(Ok(())) => {}
            }
            drop(permit);
        });
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn answer<H: Handler>(handler: &H, method: &Method, path: &str, query: Option<&str>) -> Response<Full<Bytes>> {
    let with_body = match *method {
        Method::GET => true,
        Method::HEAD | Method::OPTIONS => false,
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"only GET, HEAD and OPTIONS\n")));
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD, OPTIONS"));
            return r;
        }
    };
    let reply = handler.handle(path, query).await;
    let body = if with_body { Bytes::from(reply.body) } else { Bytes::new() };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = reply.status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(reply.content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

/// The value of `key` in a query string (`a=1&lag=16kB`), undecoded.
pub fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// A byte size as Patroni's `?lag=` takes it: a number of bytes, or one
/// with a unit `B`, `kB`, `MB`, `GB`, `TB` (powers of 1024, any case).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kb" | "k" => 10,
        "mb" | "m" => 20,
        "gb" | "g" => 30,
        "tb" | "t" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_sizes_parse_as_patroni_takes_them() {
        assert_eq!(parse_bytes("0"), Some(0));
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("16kB"), Some(16 << 10));
        assert_eq!(parse_bytes("1MB"), Some(1 << 20));
        assert_eq!(parse_bytes("2gb"), Some(2 << 30));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("1PB"), None);
        assert_eq!(parse_bytes("99999999999999999999"), None);
        assert_eq!(query_param(Some("a=1&lag=16kB"), "lag"), Some("16kB"));
        assert_eq!(query_param(Some("lag"), "lag"), None);
        assert_eq!(query_param(None, "lag"), None);
    }
}

//! The Redis Sentinel-compatible discovery endpoint: a RESP2 listener on
//! its own address (`sentinel_listen`), so that unmodified Redis clients
//! (redis-py `Sentinel`, ioredis, Jedis, go-redis, Lettuce, redis-rs) find
//! each managed group's primary through quorate.
//!
//! A front door like `api`: [`resp`] decodes (bounded) and encodes,
//! [`commands`] answers each command from the service layer
//! (`service::discovery`: primary, flags, epoch), and this file owns the
//! listener, the connections (at most `sentinel_max_connections`) and the
//! one task that turns discovery's events into published messages. Every
//! task here ends on the node's stop signal.
//!
//! RESP2 by default, RESP3 after `HELLO 3` (maps, pushes, nulls),
//! optionally behind a requirepass-style password: it serves reads of
//! public facts (which address is the primary) and changes nothing. Plain
//! text, or TLS only with `sentinel_tls` (as Redis's `tls-port`): the
//! node's own certificate, reloaded as the gRPC port's is, and a client
//! certificate from the cluster CA optional or, with
//! `sentinel_tls_client_auth`, required. Plain and TLS connections share
//! one handler; a TLS handshake runs in its connection's task, bounded in
//! time, and holds one of the connection slots like any connection.

pub mod commands;
pub mod resp;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quorate_core::access::Identity;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use self::commands::{Message, Password, Session, Shared};
use self::resp::{LIMITS, Reply};
use crate::service::Node;
use crate::shutdown::stopped;
use crate::tls::caller::Caller;
use crate::tls::config::{ClientCerts, Tls};
use crate::tls::transport::HANDSHAKE_TIMEOUT;

/// Messages buffered for each subscriber; one that falls further behind
/// (it does not read) is disconnected, as Redis drops a client past its
/// output buffer limit.
pub const SUBSCRIBER_BUFFER: usize = 1024;
/// The longest a reply may take to write before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Read at most this much at a time.
const READ_CHUNK: usize = 16 * 1024;

/// What the endpoint needs besides the node.
#[derive(Debug, Clone)]
pub struct Settings {
    pub password: Option<String>,
    pub max_connections: usize,
    /// TLS only, when set (`sentinel_tls`).
    pub tls: Option<SentinelTls>,
}

/// The endpoint's TLS: the node's certificate (its gRPC port's [`Tls`],
/// so a rotation reaches both) and whether clients must present one.
#[derive(Debug, Clone)]
pub struct SentinelTls {
    pub tls: Tls,
    pub clients: ClientCerts,
}

/// Serves the endpoint on `listener` until the node stops.
pub async fn serve(node: Node, listener: TcpListener, settings: Settings) {
    let (events, _) = broadcast::channel(SUBSCRIBER_BUFFER);
    let shared = Arc::new(Shared {
        caller: Caller::Known(Identity::Reader { name: "sentinel-endpoint".into() }),
        password: settings.password.map(Password),
        events,
        node,
    });
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let tls = settings.tls;
    let shown = match tls.as_ref().map(|t| t.clients) {
        None => "off",
        Some(ClientCerts::Optional) => "on, client certificate optional",
        Some(ClientCerts::Required) => "on, client certificate required",
    };
    info!(%addr, auth = shared.password.is_some(), tls = shown, "Sentinel-compatible endpoint listening");
    let mut tasks = JoinSet::new();
    tasks.spawn(publish(shared.clone()));
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let ids = AtomicU64::new(1);
    let mut stopping = shared.node.stopping.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stopped(&mut stopping) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!("Sentinel endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over TLS the refusal would need a handshake first, the work
            // the bound is there to limit: the client just sees the close.
            if tls.is_none() {
                tasks.spawn(refuse(stream));
            }
            continue;
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let tls = tls.clone();
        // The handshake runs here, in the connection's own task (holding
        // its slot), so a slow one holds up no one else's accept.
        tasks.spawn(async move {
            match tls {
                None => {
                    debug!(%peer, id, "Sentinel client connected");
                    connection(shared, stream, id).await;
                }
                Some(t) => {
                    let acceptor = TlsAcceptor::from(t.tls.resp_server(t.clients));
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            debug!(%peer, id, "Sentinel client connected over TLS");
                            connection(shared, stream, id).await;
                        }
                        // Plain text on the TLS port, a stranger's or no
                        // certificate where one is required: said at the
                        // level an operator sees, as the gRPC port does.
                        Ok(Err(e)) => warn!(%peer, "Sentinel endpoint: refused a TLS connection: {e}"),
                        Err(_) => {
                            debug!(%peer, "Sentinel endpoint: TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}")
                        }
                    }
                }
            }
            drop(slot);
        });
    }
    // Dropping the set aborts every connection and the publisher.
    tasks.shutdown().await;
}

/// Tells a client over the connection limit so, and closes.
async fn refuse(mut stream: TcpStream) {
    let mut out = Vec::new();
    Reply::error("ERR max number of clients reached").encode(&mut out, 2);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}

/// Publishes discovery's events (see `service::discovery`) to every
/// subscriber.
async fn publish(shared: Arc<Shared>) {
    let (tx, mut rx) = mpsc::channel(64);
    let node = shared.node.clone();
    let follow = node.discovery_events(tx);
    tokio::pin!(follow);
    loop {
        tokio::select! {
            () = &mut follow => return,
            ev = rx.recv() => match ev {
                Some(ev) => {
                    let m = commands::message_of(&ev);
                    info!(channel = %m.channel, payload = %m.payload, "Sentinel event");
                    // No subscriber: nothing to do.
                    let _ = shared.events.send(m);
                }
                None => return,
            },
        }
    }
}

/// Serves one client until it quits, breaks the protocol, falls behind on
/// its messages or the node stops: over plain TCP or TLS alike.
async fn connection<S>(shared: Arc<Shared>, stream: S, id: u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut session = Session::new(id, shared.password.is_some());
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut events: Option<broadcast::Receiver<Message>> = None;
    let mut stopping = shared.node.stopping.clone();
    loop {
        // Every complete command in the buffer, in order.
        let mut out = Vec::new();
        loop {
            match resp::decode(&buf, &LIMITS) {
                Ok(Some((args, used))) => {
                    buf.drain(..used);
                    for r in commands::run(&shared, &mut session, &args) {
                        r.encode(&mut out, session.proto);
                    }
                    if session.quit {
                        if write(&mut wr, &out).await {
                            close(&mut wr).await;
                        }
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    Reply::error(format!("ERR {e}")).encode(&mut out, session.proto);
                    if write(&mut wr, &out).await {
                        close(&mut wr).await;
                    }
                    return;
                }
            }
        }
        if !out.is_empty() && !write(&mut wr, &out).await {
            return;
        }
        // Subscribe to the feed on entering Pub/Sub mode, leave it after.
        match (session.subscribed(), events.is_some()) {
            (true, false) => events = Some(shared.events.subscribe()),
            (false, true) => events = None,
            _ => {}
        }
        tokio::select! {
            n = rd.read(&mut chunk) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            m = recv(&mut events) => match m {
                Ok(m) => {
                    let mut out = Vec::new();
                    for r in session.deliver(&m) {
                        r.encode(&mut out, session.proto);
                    }
                    if !out.is_empty() && !write(&mut wr, &out).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(id, skipped = n, "Sentinel subscriber fell behind; disconnecting it");
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = stopped(&mut stopping) => return,
        }
    }
}

/// The next message, or never when not subscribed.
async fn recv(events: &mut Option<broadcast::Receiver<Message>>) -> Result<Message, broadcast::error::RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes `out` and flushes it (TLS may hold back the last record until
/// then); false when the client is gone or does not read.
async fn write(wr: &mut (impl AsyncWrite + Unpin), out: &[u8]) -> bool {
    let all = async {
        wr.write_all(out).await?;
        wr.flush().await
    };
    matches!(tokio::time::timeout(WRITE_TIMEOUT, all).await, Ok(Ok(())))
}

/// Closes the connection on purpose (QUIT, a protocol error): over TLS a
/// close_notify, so that the client reads a clean end rather than a
/// truncation; over TCP the FIN that dropping would send anyway.
async fn close(wr: &mut (impl AsyncWrite + Unpin)) {
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

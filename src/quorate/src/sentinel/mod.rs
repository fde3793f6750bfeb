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
//! RESP2 by default, RESP3 after `HELLO 3` (maps, pushes, nulls). Plain
//! text only, optionally behind a requirepass-style password: it
//! serves reads of public facts (which address is the primary) and changes
//! nothing. Run it on a network clients can reach, and TLS-terminate in
//! front of it if clients need TLS.

pub mod commands;
pub mod resp;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quorate_core::access::Identity;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use self::commands::{Message, Password, Session, Shared};
use self::resp::{LIMITS, Reply};
use crate::service::Node;
use crate::shutdown::stopped;
use crate::tls::caller::Caller;

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
}

/// Serves the endpoint on `listener` until the node stops.
pub async fn serve(node: Node, listener: TcpListener, settings: Settings) {
    let (events, _) = broadcast::channel(SUBSCRIBER_BUFFER);
    let shared = Arc::new(Shared {
        caller: Caller::Known(Identity::Reader { name: "sentinel-endpoint".into() }),
        password: settings.password.map(Password),
        sentinels: node.config.sentinel_peer_map(),
        events,
        node,
    });
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(%addr, auth = shared.password.is_some(), "Sentinel-compatible endpoint listening");
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
            tasks.spawn(refuse(stream));
            continue;
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tasks.spawn(async move {
            debug!(%peer, id, "Sentinel client connected");
            connection(shared, stream, id).await;
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
/// its messages or the node stops.
async fn connection(shared: Arc<Shared>, stream: TcpStream, id: u64) {
    let (mut rd, mut wr) = stream.into_split();
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
                        let _ = write(&mut wr, &out).await;
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    Reply::error(format!("ERR {e}")).encode(&mut out, session.proto);
                    let _ = write(&mut wr, &out).await;
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

/// Writes `out`; false when the client is gone or does not read.
async fn write(wr: &mut tokio::net::tcp::OwnedWriteHalf, out: &[u8]) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(out)).await, Ok(Ok(())))
}

//! How bytes move: plain TCP (only with an explicit `--insecure`) or mutual
//! TLS, for both ends of every gRPC connection.
//!
//! - [`Transport`]: what a process was started with; channels to nodes are
//!   built from it (`wire::lazy_channel`), so every client, agent and peer
//!   connection of a process uses the same rule.
//! - [`incoming`]: a server's accepted connections. TLS handshakes run
//!   apart from the accept loop, each bounded in time and in number, so a
//!   slow or hostile client cannot hold up anyone else's connection. Each
//!   connection carries its [`Peer`] (address and certificate identity),
//!   which tonic puts in every request's extensions for the service layer.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quorate_core::access::Identity;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use super::config::{Tls, TlsError, TlsFiles};
use super::identity_of;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most TLS handshakes a server runs at once; more connections wait
/// for a slot (the kernel's accept queue holds them).
pub const MAX_HANDSHAKES: usize = 256;

/// Plain text or mutual TLS.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain TCP: anyone who can reach the port may do anything. Only with
    /// `--insecure`, which warns.
    Insecure,
    /// Mutual TLS with the cluster's CA.
    Tls(Tls),
}

impl Transport {
    /// Mutual TLS with `files`, or plain text when there are none (the
    /// caller's config asked for it: see `config::tls_files`), which logs
    /// `plain_text_warning` saying what that exposes.
    pub fn from_files(files: Option<TlsFiles>, plain_text_warning: &str) -> Result<Self, TlsError> {
        match files {
            Some(files) => Ok(Transport::Tls(Tls::load(files)?)),
            None => {
                warn!("INSECURE: {plain_text_warning}");
                Ok(Transport::Insecure)
            }
        }
    }

    /// Whether this is mutual TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its address.
    pub addr: Option<SocketAddr>,
    /// Its certificate's identity: `None` over plain text; an error when a
    /// CA-signed certificate carries no usable identity (then the service
    /// layer refuses everything but says why).
    pub identity: Option<Result<Identity, super::IdentityError>>,
}

impl Peer {
    /// The peer of the connection a gRPC request came on, as [`incoming`]
    /// attached it (None: a server not built on it).
    pub fn of_request<T>(req: &tonic::Request<T>) -> Option<&Peer> {
        req.extensions().get::<Peer>()
    }
}

/// An accepted connection: plain or TLS, with its [`Peer`].
#[derive(Debug)]
pub struct Conn {
    io: ConnIo,
    peer: Peer,
}

#[derive(Debug)]
enum ConnIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The connections `listener` accepts, as a stream for tonic's
/// `serve_with_incoming`. The accept task it starts ends when the stream is
/// dropped (the server stopped), and takes the listener with it.
pub fn incoming(listener: TcpListener, transport: Transport) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, transport, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(listener: TcpListener, transport: Transport, tx: mpsc::Sender<io::Result<Conn>>) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of
                // spinning, and keep serving the connections already open.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = match &transport {
            Transport::Insecure => {
                let peer = Peer { addr: Some(addr), identity: None };
                if tx.send(Ok(Conn { io: ConnIo::Plain(tcp), peer })).await.is_err() {
                    return;
                }
                continue;
            }
            Transport::Tls(tls) => tls.clone(),
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let tx = tx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let acceptor = TlsAcceptor::from(tls.server());
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let identity =
                        stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| identity_of(c));
                    let peer = Peer { addr: Some(addr), identity };
                    let _ = tx.send(Ok(Conn { io: ConnIo::Tls(Box::new(stream)), peer })).await;
                }
                // A stranger, an expired certificate, plain text on a TLS
                // port: said once per connection, at the level an operator
                // sees, since it is either misconfiguration or an attack.
                Ok(Err(e)) => warn!(peer = %addr, "refused a TLS connection: {e}"),
                Err(_) => debug!(peer = %addr, "TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}"),
            }
        });
    }
}

/// Connects to `addr` (`HOST:PORT`) with mutual TLS, verifying the server's
/// certificate against HOST.
pub async fn connect_tls(tls: &Tls, addr: &str) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?} is not a server name: {e}")))?;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(tls.client()).connect(name, tcp).await
}

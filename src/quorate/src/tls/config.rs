//! Mutual TLS configurations (rustls with ring), reloaded when their files
//! change.
//!
//! Both sides of gRPC present a certificate from the cluster's CA and
//! verify the other's: gRPC servers require a client certificate (no
//! anonymous callers), clients verify the server's against the address they
//! dial. The Sentinel endpoint's RESP server ([`Tls::resp_server`]) presents
//! the same certificate; whether it requires one from its clients is its
//! setting ([`ClientCerts`]), since Redis clients usually authenticate with
//! a password instead. As etcd does, the files are looked at again for every
//! new connection (a `stat` of three files): a rotated certificate is used
//! from the next connection on, without a restart. A rotation that cannot be
//! loaded (half a key, a key that does not match) keeps the last good
//! configuration and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

/// Where a process's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate: peers must present one it signed.
    pub ca: PathBuf,
    /// This process's certificate (chain).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// `dir/ca.crt`, `dir/NAME.crt` and `dir/NAME.key`: the layout
    /// `quorate certs issue` writes.
    pub fn named(dir: &Path, name: &str) -> Self {
        TlsFiles {
            ca: dir.join(super::certs::CA_CERT),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// Why TLS material cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.display().to_string(), message: message.to_string() }
}

/// The one crypto provider: ring, so no C toolchain beyond the linker's.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// HTTP/2 only: gRPC needs nothing else, and ALPN lets a plain-text or
/// HTTP/1 client fail at the handshake rather than later.
const ALPN_H2: &[u8] = b"h2";

struct Material {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load_material(files: &TlsFiles, check: bool) -> Result<Material, TlsError> {
    let mut roots = RootCertStore::empty();
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca)
        .map_err(|e| file_err(&files.ca, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&files.ca, e))?;
    if ca.is_empty() {
        return Err(file_err(&files.ca, "holds no certificate"));
    }
    for c in ca {
        roots.add(c).map_err(|e| file_err(&files.ca, e))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_err(&files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&files.cert, e))?;
    if chain.is_empty() {
        return Err(file_err(&files.cert, "holds no certificate"));
    }
    if check {
        check_validity(&files.cert, &chain[0])?;
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err(&files.key, e))?;
    Ok(Material { roots: Arc::new(roots), chain, key })
}

/// Refuses this process's own certificate when it is expired or not yet
/// valid: the peer would refuse it anyway, and over TLS 1.3 the caller only
/// sees its connection cancelled, so say it here, plainly, naming the file.
fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| file_err(path, e))?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(file_err(
            path,
            format!("the certificate expired at {}; issue a new one (quorate certs issue)", validity.not_after),
        ));
    }
    if now < validity.not_before {
        return Err(file_err(path, format!("the certificate is not valid before {}", validity.not_before)));
    }
    Ok(())
}

/// Whether a RESP server (the Sentinel endpoint) asks its clients for a
/// certificate. Either way a certificate that is presented must be the
/// cluster CA's, as Redis's `tls-auth-clients optional` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// Clients may connect without one (`tls-auth-clients optional`).
    Optional,
    /// Clients must present one (`tls-auth-clients yes`).
    Required,
}

/// A server configuration presenting `m`'s certificate; `alpn` is what it
/// offers (nothing: whatever the client asks for is ignored).
fn server_config(m: &Material, clients: ClientCerts, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider());
    let verifier = match clients {
        ClientCerts::Required => verifier,
        ClientCerts::Optional => verifier.allow_unauthenticated(),
    };
    let verifier = verifier.build().map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn client_config(m: Material) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(m.roots)
        .with_client_auth_cert(m.chain, m.key)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// What identifies one version of the files: each one's length and mtime.
type Stamp = [Option<(u64, SystemTime)>; 3];

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.ca, &files.cert, &files.key]
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.len(), m.modified().ok()?))))
}

/// Every configuration built from one read of the files.
struct Configs {
    /// gRPC: HTTP/2, client certificate required.
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// RESP (the Sentinel endpoint): no ALPN (Redis clients send none),
    /// client certificate optional or required.
    resp_optional: Arc<ServerConfig>,
    resp_required: Arc<ServerConfig>,
}

struct Current {
    stamp: Stamp,
    configs: Configs,
    /// The files' stamp when they last failed to load, so that a broken
    /// rotation is reported once, not at every connection.
    failed: Option<Stamp>,
}

/// Every configuration from one read of the files (`check`: refuse an
/// expired or not yet valid certificate of our own).
fn configs(files: &TlsFiles, check: bool) -> Result<Configs, TlsError> {
    let m = load_material(files, check)?;
    Ok(Configs {
        server: server_config(&m, ClientCerts::Required, &[ALPN_H2])?,
        resp_optional: server_config(&m, ClientCerts::Optional, &[])?,
        resp_required: server_config(&m, ClientCerts::Required, &[])?,
        client: client_config(m)?,
    })
}

/// A process's TLS configurations, reloaded when their files change.
/// Cheap to clone; every clone sees the same reloads.
#[derive(Clone)]
pub struct Tls {
    files: Arc<TlsFiles>,
    current: Arc<Mutex<Current>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Self::load_with(files, true)
    }

    fn load_with(files: TlsFiles, check: bool) -> Result<Self, TlsError> {
        let stamp = stamp(&files);
        let current = Current { stamp, configs: configs(&files, check)?, failed: None };
        Ok(Self { files: Arc::new(files), current: Arc::new(Mutex::new(current)) })
    }

    /// As [`Self::load`], without refusing an expired or not yet valid
    /// certificate of its own: for tests of what a peer does with one.
    #[doc(hidden)]
    pub fn load_unchecked(files: TlsFiles) -> Result<Self, TlsError> {
        Self::load_with(files, false)
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The identity this process's own certificate carries (as it is on
    /// disk now).
    pub fn own_identity(&self) -> Result<quorate_core::access::Identity, TlsError> {
        let path = &self.files.cert;
        let first = CertificateDer::pem_file_iter(path)
            .map_err(|e| file_err(path, e))?
            .next()
            .ok_or_else(|| file_err(path, "no certificate in it"))?
            .map_err(|e| file_err(path, e))?;
        super::identity_of(&first).map_err(|e| file_err(path, e))
    }

    /// Reloads if the files changed since the last look. A change that
    /// cannot be loaded keeps the configuration in use (and is tried again
    /// at the next look, so a rotation written in two steps lands).
    fn refresh(&self) -> std::sync::MutexGuard<'_, Current> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.files);
        if now != cur.stamp {
            match configs(&self.files, true) {
                Ok(configs) => {
                    info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
                    *cur = Current { stamp: now, configs, failed: None };
                }
                Err(e) if cur.failed != Some(now) => {
                    warn!("TLS files changed but cannot be loaded, keeping the previous ones: {e}");
                    cur.failed = Some(now);
                }
                Err(_) => {}
            }
        }
        cur
    }

    /// The server configuration for a new gRPC connection.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.refresh().configs.server.clone()
    }

    /// The client configuration for a new connection.
    pub fn client(&self) -> Arc<ClientConfig> {
        self.refresh().configs.client.clone()
    }

    /// The server configuration for a new RESP connection (the Sentinel
    /// endpoint): this process's certificate, no ALPN, and a client
    /// certificate as `clients` says.
    pub fn resp_server(&self, clients: ClientCerts) -> Arc<ServerConfig> {
        let cur = self.refresh();
        match clients {
            ClientCerts::Optional => cur.configs.resp_optional.clone(),
            ClientCerts::Required => cur.configs.resp_required.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use quorate_core::access::{Identity, Role};
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::tls::certs::{self, IssueRequest};
    use crate::tls::identity_of;

    fn issue(dir: &Path, name: &str, role: Role, groups: &[&str]) -> TlsFiles {
        let mut req = IssueRequest::new(name, role);
        req.groups = groups.iter().map(|g| (*g).to_owned()).collect();
        req.sans = vec!["127.0.0.1".into()];
        let (cert, key) = certs::issue(dir, &req).unwrap();
        TlsFiles { ca: dir.join(certs::CA_CERT), cert, key }
    }

    /// One handshake between `server` and `client` over loopback: the
    /// identity the server saw, or each side's error.
    async fn handshake(server: &Tls, client: &Tls) -> Result<Identity, String> {
        handshake_with(server.server(), client.client()).await?.ok_or_else(|| "no client cert".to_owned())
    }

    /// [`handshake`] with any configurations: the identity of the client's
    /// certificate, if it presented one.
    async fn handshake_with(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Result<Option<Identity>, String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server);
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| format!("server: {e}"))?;
            let der = tls.get_ref().1.peer_certificates().and_then(|c| c.first().cloned());
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await.map_err(|e| format!("server read: {e}"))?;
            der.map(|d| identity_of(&d).map_err(|e| e.to_string())).transpose()
        });
        let connector = TlsConnector::from(client);
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let client_side = async {
            let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("client: {e}"))?;
            tls.write_all(b"hi").await.map_err(|e| format!("client write: {e}"))?;
            tls.flush().await.map_err(|e| format!("client flush: {e}"))?;
            Ok::<_, String>(tls)
        };
        let client_res = tokio::time::timeout(Duration::from_secs(10), client_side).await.unwrap();
        let server_res = tokio::time::timeout(Duration::from_secs(10), accept).await.unwrap().unwrap();
        match (client_res, server_res) {
            (Ok(_), Ok(id)) => Ok(id),
            (c, s) => Err(format!("{:?} / {:?}", c.err(), s.err())),
        }
    }

    #[tokio::test]
    async fn mutual_tls_accepts_the_cluster_and_refuses_strangers() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(dir.path()).unwrap();
        let node = Tls::load(issue(dir.path(), "node-1", Role::Node, &[])).unwrap();
        let member = Tls::load(issue(dir.path(), "db-1", Role::Member, &["pair"])).unwrap();
        assert_eq!(
            handshake(&node, &member).await.unwrap(),
            Identity::Member { group: "pair".into(), member: "db-1".into() }
        );

        // A certificate from another CA is refused, on both sides.
        let other = tempfile::tempdir().unwrap();
        certs::init(other.path()).unwrap();
        let stranger = Tls::load(issue(other.path(), "db-1", Role::Member, &["pair"])).unwrap();
        let e = handshake(&node, &stranger).await.unwrap_err();
        assert!(e.contains("UnknownIssuer") || e.contains("unknown"), "{e}");
        let e = handshake(&stranger, &node).await.unwrap_err();
        assert!(e.contains("UnknownIssuer") || e.contains("unknown"), "{e}");

        // An expired one too.
        let mut req = IssueRequest::new("old", Role::Reader);
        let now = time::OffsetDateTime::now_utc();
        (req.not_before, req.not_after) = (now - time::Duration::days(10), now - time::Duration::days(1));
        let (cert, key) = certs::issue(dir.path(), &req).unwrap();
        let files = TlsFiles { ca: dir.path().join(certs::CA_CERT), cert, key };
        // Its owner refuses to use it, naming the file...
        let e = Tls::load(files.clone()).unwrap_err().to_string();
        assert!(e.contains("old.crt") && e.contains("expired at"), "{e}");
        // ... and a peer that is sent it anyway refuses it too.
        let expired = Tls::load_unchecked(files).unwrap();
        let e = handshake(&node, &expired).await.unwrap_err();
        assert!(e.contains("Expired") || e.contains("expired"), "{e}");
    }

    #[tokio::test]
    async fn a_rotated_certificate_is_used_from_the_next_connection() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(dir.path()).unwrap();
        let node = Tls::load(issue(dir.path(), "node-1", Role::Node, &[])).unwrap();
        let files = issue(dir.path(), "svc", Role::Client, &["g1"]);
        let client = Tls::load(files.clone()).unwrap();
        let first = handshake(&node, &client).await.unwrap();
        assert_eq!(first, Identity::Client { name: "svc".into(), groups: vec!["g1".into()] });
        // Re-issue under the same name with another group; mtimes can be
        // coarse, so make sure the stamp differs.
        std::thread::sleep(Duration::from_millis(20));
        let rotated = issue(dir.path(), "svc", Role::Client, &["g1", "g2"]);
        assert_eq!(rotated, files);
        let second = handshake(&node, &client).await.unwrap();
        assert_eq!(second, Identity::Client { name: "svc".into(), groups: vec!["g1".into(), "g2".into()] });
        // A broken key file keeps the last good configuration.
        std::fs::write(&files.key, "not a key").unwrap();
        assert!(handshake(&node, &client).await.is_ok(), "a broken rotation broke the client");
    }

    #[tokio::test]
    async fn the_resp_server_requires_a_client_certificate_only_when_told() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(dir.path()).unwrap();
        let node = Tls::load(issue(dir.path(), "node-1", Role::Node, &[])).unwrap();
        let reader = Tls::load(issue(dir.path(), "r", Role::Reader, &[])).unwrap();
        // A Redis client's usual setup: the CA, no certificate, no ALPN.
        let m = load_material(reader.files(), true).unwrap();
        let builder = || {
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(m.roots.clone())
        };
        let anonymous = Arc::new(builder().with_no_client_auth());
        assert_eq!(handshake_with(node.resp_server(ClientCerts::Optional), anonymous.clone()).await, Ok(None));
        let e = handshake_with(node.resp_server(ClientCerts::Required), anonymous).await.unwrap_err();
        assert!(e.contains("server: ") && e.to_lowercase().contains("certificate"), "{e}");
        // A certificate of the cluster CA is verified and read either way
        // (this client also offers h2, which the RESP server ignores).
        let id = Identity::Reader { name: "r".into() };
        for clients in [ClientCerts::Optional, ClientCerts::Required] {
            assert_eq!(handshake_with(node.resp_server(clients), reader.client()).await, Ok(Some(id.clone())));
        }
        // Another CA's certificate is refused even where one is optional.
        let other = tempfile::tempdir().unwrap();
        certs::init(other.path()).unwrap();
        let theirs = load_material(&issue(other.path(), "r", Role::Reader, &[]), true).unwrap();
        let stranger = Arc::new(builder().with_client_auth_cert(theirs.chain, theirs.key).unwrap());
        let e = handshake_with(node.resp_server(ClientCerts::Optional), stranger).await.unwrap_err();
        assert!(e.contains("UnknownIssuer") || e.contains("unknown"), "{e}");
    }

    #[test]
    fn missing_and_broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(dir.path()).unwrap();
        let files = issue(dir.path(), "r", Role::Reader, &[]);
        let e = Tls::load(TlsFiles { key: dir.path().join("nope.key"), ..files.clone() }).unwrap_err().to_string();
        assert!(e.contains("nope.key"), "{e}");
        std::fs::write(dir.path().join("empty.crt"), "").unwrap();
        let e = Tls::load(TlsFiles { ca: dir.path().join("empty.crt"), ..files }).unwrap_err().to_string();
        assert!(e.contains("empty.crt") && e.contains("no certificate"), "{e}");
    }
}

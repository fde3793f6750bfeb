//! How this process reaches Redis: the one place where its credentials and
//! TLS settings are applied to a Redis URL.
//!
//! Every Redis connection a server or an agent makes (heartbeat stores in
//! [`crate::observation::store`], the data service in
//! [`crate::agent::driver`] and its fencer) is opened by
//! [`RedisAccess::connect`], through [`RedisAccess::client`]:
//!
//! - a URL that carries credentials of its own (`redis://user:pass@host:port`,
//!   or only a user) is used as it is; any other gets the process's
//!   `redis_username` and password (`redis_password_file` or
//!   `QUORATE_REDIS_PASSWORD`), sent as `AUTH [user] pass` when connecting;
//! - a `rediss://` URL is TLS (rustls with ring), verified against
//!   `redis_tls_ca` only (required: the system roots are never used), with
//!   the client certificate `redis_tls_cert`/`redis_tls_key` when given.
//!
//! [`RedisAccess`] is built once at start from the validated config
//! ([`crate::config::RedisOptions::load`]). The password is held in a
//! [`Secret`], whose `Debug` prints `***`; errors and logs name a URL only in
//! its redacted form ([`quorate_core::group::redacted`]).

use std::sync::Once;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ClientTlsConfig, IntoConnectionInfo, TlsCertificates};

/// The environment variable a password may be given in.
pub const PASSWORD_ENV: &str = "QUORATE_REDIS_PASSWORD";

/// A password: never printed (`Debug` is `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that sends it.
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The PEM files of `rediss://` connections, read at start.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// The CA (one or more certificates) the Redis servers' certificates
    /// must chain to.
    pub ca: Vec<u8>,
    /// A client certificate and its key, for `tls-auth-clients yes`.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca_bytes", &self.ca.len())
            .field("client_cert", &self.client.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The credentials and TLS settings of every Redis connection of this
/// process. The default is none (plain text, no `AUTH`).
#[derive(Debug, Clone, Default)]
pub struct RedisAccess {
    username: Option<String>,
    password: Option<Secret>,
    tls: Option<RedisTls>,
}

/// Installs ring as rustls's process-wide provider, once, before the first
/// `rediss://` client is built: the redis crate builds its TLS
/// configurations with the default provider (quorate's own TLS names ring
/// explicitly). One installed already (by anyone) is fine.
fn install_ring_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl RedisAccess {
    /// `username` is only used with a password.
    pub fn new(username: Option<String>, password: Option<Secret>, tls: Option<RedisTls>) -> Self {
        Self { username: username.filter(|u| !u.is_empty()), password, tls }
    }

    /// Whether this process has credentials to give.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// A client for `url`, with this process's credentials unless the URL
    /// carries its own, and TLS for `rediss://`. The error names the
    /// redacted URL's problem, never a password.
    pub fn client(&self, url: &str) -> Result<redis::Client, String> {
        let info = url.into_connection_info().map_err(|e| e.to_string())?;
        let settings = info.redis_settings();
        let info = if settings.username().is_none() && settings.password().is_none() {
            match &self.password {
                Some(password) => {
                    let mut settings = settings.clone().set_password(password.expose());
                    if let Some(user) = &self.username {
                        settings = settings.set_username(user);
                    }
                    info.set_redis_settings(settings)
                }
                None => info,
            }
        } else {
            info
        };
        if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            return redis::Client::open(info).map_err(|e| e.to_string());
        }
        let Some(tls) = &self.tls else {
            return Err("rediss:// needs the Redis servers' CA: give redis_tls_ca (--redis-tls-ca)".into());
        };
        install_ring_provider();
        let certificates = TlsCertificates {
            client_tls: tls
                .client
                .as_ref()
                .map(|(cert, key)| ClientTlsConfig { client_cert: cert.clone(), client_key: key.clone() }),
            root_cert: Some(tls.ca.clone()),
        };
        redis::Client::build_with_tls(info, certificates).map_err(|e| format!("TLS: {e}"))
    }

    /// A multiplexed connection to `url` ([`Self::client`]); connecting and
    /// each reply are bounded by `timeout`. The error says what failed
    /// ([`describe`]).
    pub async fn connect(&self, url: &str, timeout: Duration) -> Result<MultiplexedConnection, String> {
        let client = self.client(url)?;
        let config =
            AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
        match tokio::time::timeout(timeout, client.get_multiplexed_async_connection_with_config(&config)).await {
            Err(_) => Err(format!("no connection within {timeout:?}")),
            Ok(r) => r.map_err(|e| describe(url, &e)),
        }
    }
}

/// What a Redis error means, for a message: an authentication failure or
/// a missing password says so, a TLS failure on a `rediss://` URL too. No
/// error of the redis crate carries the password.
pub fn describe(url: &str, e: &redis::RedisError) -> String {
    let text = e.to_string();
    if e.kind() == redis::ErrorKind::AuthenticationFailed || text.contains("WRONGPASS") {
        return format!("authentication failed ({text}): check redis_username and the password");
    }
    if text.contains("NOAUTH") {
        return format!(
            "authentication required ({text}): give redis_password_file or {PASSWORD_ENV}, or credentials in the URL"
        );
    }
    if text.contains("NOPERM") {
        return format!("permission denied ({text}): the Redis ACL user may not run this command");
    }
    if url.starts_with("rediss://") && e.is_io_error() {
        let hint = if text.contains("CertificateRequired") {
            ": the server asks for a client certificate (redis_tls_cert, redis_tls_key)"
        } else if text.contains("certificate") {
            ": check redis_tls_ca and the server's certificate"
        } else {
            ""
        };
        return format!("TLS connection failed ({text}){hint}");
    }
    text
}

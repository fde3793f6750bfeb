//! What travels between quorate's processes, shared by the client, the
//! agent, the server, the CLI, the benchmarks and the local launcher: the
//! protobuf conversions ([`convert`]), the gRPC metadata header names, how a
//! channel to a node is built, and the Redis key formats the agents, the
//! Lua fenced write (`deploy/redis/fenced_set.lua`) and the fault suite
//! share. It depends on nothing of the crate but the generated protobuf
//! code, so that no side needs another side's modules to talk.

pub mod convert;

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::tls::transport::{Transport, connect_tls};

pub use self::convert::lease_pb;

/// Metadata key carrying the leader's node id.
pub const LEADER_ID_HEADER: &str = "x-quorate-leader-id";
/// Metadata key carrying the leader's gRPC address.
pub const LEADER_ADDR_HEADER: &str = "x-quorate-leader-addr";
/// Metadata key carrying a lease's current epoch on FAILED_PRECONDITION.
pub const CURRENT_EPOCH_HEADER: &str = "x-quorate-current-epoch";

/// The most group views one report carries: the observation loop never
/// sends more, and the service layer refuses more (a report is one proposal,
/// and the views in it are checked one by one).
pub const MAX_VIEWS_PER_REPORT: usize = 1024;

/// How long a TCP connect may take before the node counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Builds one lazily connecting channel to a node's gRPC address
/// (`HOST:PORT`) over plain TCP; see [`lazy_channel_with`].
pub fn lazy_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    lazy_channel_with(addr, &Transport::Insecure)
}

/// Builds one lazily connecting channel to a node's gRPC address
/// (`HOST:PORT`), as every client of a node does: no Nagle delay, HTTP/2
/// keep-alives so a dead connection is noticed within seconds, and with
/// TLS a new handshake (with the certificates as they are on disk then)
/// for every new connection.
pub fn lazy_channel_with(addr: &str, transport: &Transport) -> Result<Channel, tonic::transport::Error> {
    let scheme = if transport.is_tls() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(match transport {
        Transport::Insecure => endpoint.connect_lazy(),
        Transport::Tls(tls) => {
            let (tls, addr) = (tls.clone(), addr.to_owned());
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let (tls, addr) = (tls.clone(), addr.clone());
                async move { connect_tls(&tls, &addr).await.map(hyper_util::rt::TokioIo::new) }
            }))
        }
    })
}

/// A protobuf message that does not decode into a core value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Redis key formats.
pub mod keys {
    pub use quorate_core::group::heartbeat_key;

    /// The key holding the primary's epoch until its lease deadline (read by
    /// `deploy/redis/fenced_set.lua`).
    pub fn lease_key(group: &str) -> String {
        format!("quorate:lease:{{{group}}}")
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_lease_key_matches_the_lua_fenced_write() {
            let lua = include_str!("../../../../deploy/redis/fenced_set.lua");
            assert_eq!(super::lease_key("db"), "quorate:lease:{db}");
            assert!(lua.contains("quorate:lease:{<group>}"), "fenced_set.lua documents the key format");
        }
    }
}

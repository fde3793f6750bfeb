//! # quorate
//!
//! A quorum-based failover coordinator. This crate holds everything that does
//! I/O; every decision is made by the pure core in `quorate-core`.
//!
//! ## Layout
//!
//! - [`backup`]: backup files (`quorate snapshot save`, `server --restore`):
//!   header, checksum, bounded atomic reads and writes.
//! - [`config`]: one validated configuration struct per process (server,
//!   agent) and the one merge of defaults, file and flags.
//! - [`raft`]: openraft behind one facade ([`raft::RaftNode`]): redb log
//!   store, state machine adapter, Raft RPCs over tonic.
//! - [`server`]: a `quorate server` node: Raft plus the gRPC API, start-up,
//!   cluster formation and clean shutdown.
//! - [`service`]: the service layer: every coordinator operation once, on
//!   domain types, with one error type.
//! - [`api`]: the public gRPC service, a thin translation between protobuf
//!   and the service layer, with the one place that maps errors to gRPC
//!   status.
//! - [`sentinel`]: the Redis Sentinel-compatible discovery endpoint (RESP2
//!   and RESP3, plain text or TLS), a thin front door on the service layer
//!   like `api`.
//! - [`observation`]: the observation loop (read every member's heartbeat,
//!   report views) that agents and coordinator nodes share, and its stores.
//! - [`agent`]: `quorate agent`: heartbeat publisher, role runtime, fencer,
//!   drivers.
//! - [`client`]: the Rust client: endpoints, leader following, lease keeper.
//! - [`cli`]: the `quorate` subcommands (no logic of their own).
//! - [`render`]: text and JSON renderings shared by the CLI and the demo.
//! - [`http`]: the small plain-HTTP server of the health endpoints and
//!   `/metrics` (coordinators and agents).
//! - [`local`]: the local launcher (`quorate local up|down`).
//! - [`bench`]: the load generator behind `quorate bench`.
//! - [`redis_access`]: the credentials and TLS of every Redis connection,
//!   applied to a URL in one place.
//! - [`wire`]: what travels between processes (protobuf conversions,
//!   header names, channels, Redis key formats), shared by every side.
//! - [`shutdown`]: the shutdown signal every process waits on.
//! - [`notify`]: systemd's notify protocol (`READY=1`, `STOPPING=1`,
//!   `WATCHDOG=1`) for servers and agents; a no-op without `NOTIFY_SOCKET`.

pub mod agent;
pub mod api;
pub mod backup;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod local;
pub mod notify;
pub mod observation;
pub mod raft;
pub mod redis_access;
pub mod render;
pub mod sentinel;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod tls;
pub mod wire;

/// Generated protobuf and gRPC code.
pub mod pb {
    /// The public coordinator API, `quorate.v1`.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic, clippy::nursery)]
    pub mod v1 {
        tonic::include_proto!("quorate.v1");
    }
    /// Internal Raft RPCs, `quorate.raft.v1`.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic, clippy::nursery)]
    pub mod raft {
        tonic::include_proto!("quorate.raft.v1");
    }

    /// A client-only subset of etcd's v3 API, `etcdserverpb`: the anchor
    /// that `quorate bench --target etcd` measures against
    /// (`proto/anchors/etcd/rpc.proto` says why it is here).
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic, clippy::nursery)]
    pub mod etcd {
        tonic::include_proto!("etcdserverpb");
    }

    /// The file descriptor set of both quorate packages (for server reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("quorate_descriptor");

    /// The gRPC server reflection service (`grpc.reflection.v1`) over
    /// [`FILE_DESCRIPTOR_SET`], so that `grpcurl` works without the protos.
    pub fn reflection() -> Result<
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        String,
    > {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| e.to_string())
    }
}

/// The version every node and the CLI report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

//! Role drivers: how an agent makes its member's data service follow the
//! primary role. The I/O boundary between the role loop and the service.
//!
//! - [`RedisDriver`]: promote with `REPLICAOF NO ONE`, follow the primary with
//!   `REPLICAOF host port`.
//! - [`ExecDriver`]: runs configured commands with `QUORATE_GROUP`,
//!   `QUORATE_MEMBER`, `QUORATE_EPOCH`, `QUORATE_ROLE` in the environment.
//! - [`NoDriver`]: the lease only (for services that read it themselves).
//!
//! The Redis driver and its fencer connect with the process's credentials
//! and TLS ([`crate::redis_access`]); errors show URLs redacted. A replica
//! of a password-protected primary needs `masterauth` (and `masteruser`
//! for an ACL user) in its own redis.conf: the driver issues `REPLICAOF`
//! only and never sets them (README: "Redis credentials").
//!
//! Stopping and opening writes is not done here but by the fencer
//! ([`super::fence`]), on its own thread and connection, so that a fence is
//! never queued behind a driver command: each driver hands the fencer its
//! [`FenceOps`]. A promotion therefore leaves writes as they were (a fenced
//! service stays paused) until the fencer opens them under a valid lease.

use crate::config::ExecHooks;
use crate::redis_access::{RedisAccess, describe};
use crate::wire::keys::lease_key;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use quorate_core::election::Role;
use quorate_core::group::{parse_redis_url, redacted};
use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;
use tracing::warn;

use super::fence::FenceOps;

/// The client name of the fencer's connection, which a demotion's
/// disconnection of clients spares.
pub const FENCER_NAME: &str = "quorate-fencer";

/// How long one command to the data service may take.
pub const DRIVER_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a driver action failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct DriverError(pub String);

/// What the driver sees of its data service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceState {
    pub reachable: bool,
    pub role: Option<Role>,
    pub offset: u64,
    pub link_up: bool,
    /// `host:port` of the primary a replica follows.
    pub following: Option<String>,
    /// Changes when the service restarts (Redis `run_id`).
    pub run_id: String,
}

/// Acting on the data service.
pub trait RoleDriver: Send + Sync + 'static {
    /// The service's state now.
    fn state(&self) -> impl Future<Output = ServiceState> + Send;
    /// Become primary under `epoch`. Writes stay as they were (paused if
    /// fenced); the fencer opens them.
    fn promote(&self, epoch: u64) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// How the fencer fences this service (its own connection).
    fn fence_ops(&self) -> FenceOps;
    /// Follow `primary_data` (a `redis://HOST:PORT` URL) as a replica.
    fn follow(&self, primary_data: &str, epoch: u64) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Pause writes for a switchover; returns the replication offset to
    /// wait for. (Given up, the fencer opens writes again.)
    fn pause_writes(&self) -> impl Future<Output = Result<u64, DriverError>> + Send;
    /// The replication offset of another member's service (switchover).
    fn offset_of(&self, other_data: &str) -> impl Future<Output = Result<u64, DriverError>> + Send;
}

/// Drives a Redis data service.
#[derive(Debug)]
pub struct RedisDriver {
    group: String,
    url: String,
    access: Arc<RedisAccess>,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl RedisDriver {
    /// Drives the Redis at `url`, connecting with `access`.
    pub fn new(group: &str, url: &str, access: Arc<RedisAccess>) -> Self {
        Self { group: group.to_owned(), url: url.to_owned(), access, conn: Mutex::new(None) }
    }

    /// Runs commands on the own service; a failure drops the connection.
    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, DriverError> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(connect_redis(&self.access, &self.url).await?);
        }
        let conn = guard.as_mut().expect("connected above");
        let res = match tokio::time::timeout(DRIVER_TIMEOUT, cmd.query_async::<T>(conn)).await {
            Err(_) => Err(DriverError(format!("data store {}: timed out", redacted(&self.url)))),
            Ok(r) => {
                r.map_err(|e| DriverError(format!("data store {}: {}", redacted(&self.url), describe(&self.url, &e))))
            }
        };
        if res.is_err() {
            *guard = None;
        }
        res
    }

    /// Disconnects the normal clients of a demoted primary, as Redis
    /// Sentinel does on every reconfiguration: pooled connections then look
    /// the primary up again instead of getting READONLY (or hanging on a
    /// pause) for as long as they live. Spares this connection (SKIPME) and
    /// the fencer's ([`FENCER_NAME`]), so that no fence waits for a
    /// reconnection. Runs on the role loop, never on the fencer.
    async fn kill_clients(&self) -> Result<(), DriverError> {
        let mut list = redis::cmd("CLIENT");
        list.arg("LIST").arg("TYPE").arg("normal");
        let list: String = self.run(list).await?;
        let spared = format!("name={FENCER_NAME}");
        let ids: Vec<&str> = list
            .lines()
            .filter(|l| !l.split(' ').any(|f| f == spared))
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("CLIENT").arg("KILL").arg("ID").arg(*id).arg("SKIPME").arg("yes").ignore();
        }
        let mut guard = self.conn.lock().await;
        let Some(conn) = guard.as_mut() else { return Ok(()) };
        let shown = format!("data store {}", redacted(&self.url));
        let res = tokio::time::timeout(DRIVER_TIMEOUT, pipe.query_async::<()>(conn)).await;
        match res {
            Ok(Ok(())) => {
                tracing::info!(
                    clients = ids.len(),
                    "demoted: disconnected the clients so that they look the primary up again"
                );
                Ok(())
            }
            Ok(Err(e)) => {
                *guard = None;
                Err(DriverError(format!("{shown}: {}", describe(&self.url, &e))))
            }
            Err(_) => {
                *guard = None;
                Err(DriverError(format!("{shown}: timed out")))
            }
        }
    }

    async fn info(&self) -> Result<String, DriverError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("replication").arg("server");
        self.run(cmd).await
    }
}

/// A connection to a Redis ([`RedisAccess::connect`]), bounded by
/// [`DRIVER_TIMEOUT`]; the error names the redacted URL.
pub(crate) async fn connect_redis(access: &RedisAccess, url: &str) -> Result<MultiplexedConnection, DriverError> {
    access.connect(url, DRIVER_TIMEOUT).await.map_err(|e| DriverError(format!("data store {}: {e}", redacted(url))))
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

/// Parses `INFO replication` + `INFO server`.
pub fn parse_info(info: &str) -> ServiceState {
    let role = match field(info, "role") {
        Some("master") => Some(Role::Primary),
        Some("slave") => Some(Role::Replica),
        _ => None,
    };
    let offset_field = if role == Some(Role::Replica) { "slave_repl_offset" } else { "master_repl_offset" };
    let offset = field(info, offset_field).and_then(|v| v.parse().ok()).unwrap_or(0);
    let following = match (field(info, "master_host"), field(info, "master_port")) {
        (Some(h), Some(p)) if role == Some(Role::Replica) => Some(format!("{h}:{p}")),
        _ => None,
    };
    ServiceState {
        reachable: true,
        role,
        offset,
        link_up: field(info, "master_link_status") == Some("up"),
        following,
        run_id: field(info, "run_id").unwrap_or_default().to_owned(),
    }
}

fn host_port(url: &str) -> Result<(String, u16), DriverError> {
    parse_redis_url(url)
        .map(|a| (a.host, a.port))
        .map_err(|e| DriverError(format!("data store {}: {e}", redacted(url))))
}

impl RoleDriver for RedisDriver {
    async fn state(&self) -> ServiceState {
        match self.info().await {
            Ok(info) => parse_info(&info),
            Err(_) => ServiceState::default(),
        }
    }

    async fn promote(&self, _epoch: u64) -> Result<(), DriverError> {
        let mut noone = redis::cmd("REPLICAOF");
        noone.arg("NO").arg("ONE");
        self.run::<()>(noone).await
    }

    fn fence_ops(&self) -> FenceOps {
        FenceOps::Redis { url: self.url.clone(), group: self.group.clone(), access: self.access.clone(), conn: None }
    }

    async fn follow(&self, primary_data: &str, _epoch: u64) -> Result<(), DriverError> {
        if primary_data.is_empty() {
            return Err(DriverError("the primary has no data URL in the group spec".into()));
        }
        let (host, port) = host_port(primary_data)?;
        let state = self.state().await;
        if state.role != Some(Role::Replica) || state.following.as_deref() != Some(&format!("{host}:{port}")) {
            let mut cmd = redis::cmd("REPLICAOF");
            cmd.arg(&host).arg(port);
            self.run::<()>(cmd).await?;
        }
        if state.role == Some(Role::Primary) {
            // Demoted: before the pause is lifted, so that no client blocked
            // on it carries on against a replica.
            if let Err(e) = self.kill_clients().await {
                warn!("demoted, but cannot disconnect its clients: {e}");
            }
        }
        // A replica refuses writes by itself; the pause would only hold
        // clients' reads of stale data.
        self.run::<()>(redis::cmd("CLIENT").arg("UNPAUSE").clone()).await
    }

    async fn pause_writes(&self) -> Result<u64, DriverError> {
        let _ = self.run::<()>(redis::cmd("DEL").arg(lease_key(&self.group)).clone()).await;
        let mut pause = redis::cmd("CLIENT");
        pause.arg("PAUSE").arg(60_000u64).arg("WRITE");
        self.run::<()>(pause).await?;
        let state = self.state().await;
        if !state.reachable {
            return Err(DriverError(format!("data store {}: unreachable after pausing writes", redacted(&self.url))));
        }
        Ok(state.offset)
    }

    async fn offset_of(&self, other_data: &str) -> Result<u64, DriverError> {
        if other_data.is_empty() {
            return Err(DriverError("the switchover target has no data URL".into()));
        }
        let mut conn = connect_redis(&self.access, other_data).await?;
        let mut cmd = redis::cmd("INFO");
        cmd.arg("replication");
        let shown = format!("data store {}", redacted(other_data));
        let info: String = tokio::time::timeout(DRIVER_TIMEOUT, cmd.query_async(&mut conn))
            .await
            .map_err(|_| DriverError(format!("{shown}: timed out")))?
            .map_err(|e| DriverError(format!("{shown}: {}", describe(other_data, &e))))?;
        Ok(parse_info(&info).offset)
    }
}

/// The role an exec driver last put its service in, shared with its
/// fencer (the fence hook runs on the fencer's thread).
#[derive(Debug, Clone, Default)]
pub struct SharedRole(std::sync::Arc<std::sync::Mutex<Option<Role>>>);

impl SharedRole {
    pub fn get(&self) -> Option<Role> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn set(&self, role: Role) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(role);
    }
}

/// Runs one hook command of the exec driver (bounded to 30 s); a non-zero
/// exit is an error carrying its stderr.
pub(crate) async fn run_hook(
    group: &str,
    member: &str,
    which: &str,
    command: &str,
    epoch: u64,
    role: &str,
) -> Result<(), DriverError> {
    if command.is_empty() {
        return Ok(());
    }
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .env("QUORATE_GROUP", group)
            .env("QUORATE_MEMBER", member)
            .env("QUORATE_EPOCH", epoch.to_string())
            .env("QUORATE_ROLE", role)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| DriverError(format!("{which} hook timed out after 30 s")))?
    .map_err(|e| DriverError(format!("{which} hook could not run: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DriverError(format!(
            "{which} hook failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs commands on role changes. A failed hook is an error (reported by
/// the agent and retried on its next cycle), never ignored.
#[derive(Debug)]
pub struct ExecDriver {
    group: String,
    member: String,
    hooks: ExecHooks,
    role: SharedRole,
}

impl ExecDriver {
    pub fn new(group: &str, member: &str, hooks: ExecHooks) -> Self {
        Self { group: group.into(), member: member.into(), hooks, role: SharedRole::default() }
    }

    async fn hook(&self, which: &str, command: &str, epoch: u64, role: &str) -> Result<(), DriverError> {
        run_hook(&self.group, &self.member, which, command, epoch, role).await
    }
}

impl RoleDriver for ExecDriver {
    async fn state(&self) -> ServiceState {
        let role = self.role.get();
        ServiceState { reachable: true, role, link_up: role == Some(Role::Replica), ..Default::default() }
    }
    async fn promote(&self, epoch: u64) -> Result<(), DriverError> {
        self.hook("promote", &self.hooks.promote, epoch, "primary").await?;
        self.role.set(Role::Primary);
        Ok(())
    }
    fn fence_ops(&self) -> FenceOps {
        FenceOps::Exec {
            group: self.group.clone(),
            member: self.member.clone(),
            command: self.hooks.fence.clone(),
            role: self.role.clone(),
        }
    }
    async fn follow(&self, _primary_data: &str, epoch: u64) -> Result<(), DriverError> {
        if self.role.get() == Some(Role::Replica) {
            return Ok(());
        }
        self.hook("demote", &self.hooks.demote, epoch, "replica").await?;
        self.role.set(Role::Replica);
        Ok(())
    }
    async fn pause_writes(&self) -> Result<u64, DriverError> {
        self.hook("fence", &self.hooks.fence, 0, "fenced").await?;
        self.role.set(Role::Unknown);
        Ok(0)
    }
    async fn offset_of(&self, _other_data: &str) -> Result<u64, DriverError> {
        Ok(0)
    }
}

/// No data service: the lease is all there is.
#[derive(Debug, Default)]
pub struct NoDriver;

impl RoleDriver for NoDriver {
    async fn state(&self) -> ServiceState {
        ServiceState { reachable: true, ..Default::default() }
    }
    async fn promote(&self, _: u64) -> Result<(), DriverError> {
        Ok(())
    }
    fn fence_ops(&self) -> FenceOps {
        FenceOps::None
    }
    async fn follow(&self, _: &str, _: u64) -> Result<(), DriverError> {
        Ok(())
    }
    async fn pause_writes(&self) -> Result<u64, DriverError> {
        Ok(0)
    }
    async fn offset_of(&self, _: &str) -> Result<u64, DriverError> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replica_and_primary_info() {
        let replica = "# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\nmaster_port:7301\r\nmaster_link_status:up\r\nslave_repl_offset:4242\r\nmaster_repl_offset:4242\r\n# Server\r\nrun_id:abc\r\n";
        let s = parse_info(replica);
        assert_eq!(s.role, Some(Role::Replica));
        assert_eq!(
            (s.offset, s.link_up, s.following.as_deref(), s.run_id.as_str()),
            (4242, true, Some("127.0.0.1:7301"), "abc")
        );
        let primary = "role:master\r\nconnected_slaves:1\r\nmaster_repl_offset:99\r\nrun_id:def\r\n";
        let s = parse_info(primary);
        assert_eq!((s.role, s.offset, s.link_up, s.following), (Some(Role::Primary), 99, false, None));
    }

    #[tokio::test]
    async fn a_failing_exec_hook_is_an_error_with_its_output() {
        let d = ExecDriver::new(
            "g",
            "m",
            ExecHooks {
                promote: "echo \"$QUORATE_GROUP/$QUORATE_MEMBER/$QUORATE_EPOCH/$QUORATE_ROLE\" >&2; exit 3".into(),
                ..Default::default()
            },
        );
        let err = d.promote(7).await.unwrap_err();
        assert!(err.0.contains("promote hook failed") && err.0.contains("g/m/7/primary"), "{err}");
        assert_eq!(d.state().await.role, None, "a failed promotion does not change the role");
        let ok = ExecDriver::new("g", "m", ExecHooks { promote: "true".into(), ..Default::default() });
        ok.promote(1).await.unwrap();
        assert_eq!(ok.state().await.role, Some(Role::Primary));
    }
}

/// The driver an agent runs, chosen at start.
#[derive(Debug)]
pub enum AnyDriver {
    Redis(RedisDriver),
    Exec(ExecDriver),
    None(NoDriver),
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            AnyDriver::Redis($d) => $e,
            AnyDriver::Exec($d) => $e,
            AnyDriver::None($d) => $e,
        }
    };
}

impl RoleDriver for AnyDriver {
    async fn state(&self) -> ServiceState {
        dispatch!(self, d => d.state().await)
    }
    async fn promote(&self, epoch: u64) -> Result<(), DriverError> {
        dispatch!(self, d => d.promote(epoch).await)
    }
    fn fence_ops(&self) -> FenceOps {
        dispatch!(self, d => d.fence_ops())
    }
    async fn follow(&self, primary_data: &str, epoch: u64) -> Result<(), DriverError> {
        dispatch!(self, d => d.follow(primary_data, epoch).await)
    }
    async fn pause_writes(&self) -> Result<u64, DriverError> {
        dispatch!(self, d => d.pause_writes().await)
    }
    async fn offset_of(&self, other_data: &str) -> Result<u64, DriverError> {
        dispatch!(self, d => d.offset_of(other_data).await)
    }
}

//! `quorate agent`: runs beside one member of a failover group.
//!
//! - publishes `SET quorate:hb:{G}:{M} "{incarnation}:{seq}:{unix_ms}" PX ttl`
//!   into the member's own heartbeat store every `heartbeat_interval_ms`
//!   (a new random incarnation at every start);
//! - reads every peer's heartbeat key and reports its view to the
//!   coordinators (`crate::observation`, the same loop coordinator nodes run);
//! - follows changes of the group spec;
//! - in a managed group, runs the role loop ([`role`]) and its fencer
//!   ([`fence`]), which stops the data service's writes at the lease
//!   deadline.
//!
//! Every task is owned by [`run`] and stops when its shutdown future fires.

pub mod driver;
pub mod fence;
pub mod health;
pub mod role;
pub mod systemd;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quorate_core::group::{GroupSpec, heartbeat_key};
use quorate_core::matrix::Observer;
use quorate_core::observe::Beat;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span, warn};

use crate::client::{Client, ClientError};
use crate::config::{AgentConfig, ConfigError, DriverKind};
use crate::notify::Notifier;
use crate::observation::Observe;
use crate::observation::store::{RedisStores, Stores};
use crate::pb::v1 as pb;
use crate::redis_access::RedisAccess;
use crate::tls::transport::Transport;
use crate::wire::convert::spec_from_pb;

/// How often the agent re-reads its group's spec.
const SPEC_REFRESH: Duration = Duration::from_secs(2);

/// The bound on each coordinator call of the agent
/// ([`GroupSpec::agent_call_timeout_ms`]: a sixth of the lease TTL, below
/// its renewal interval, so a call to an unreachable coordinator never holds
/// up what comes after it for as long as one renewal). Renewals are bounded
/// by the keeper's own deadline. The one call that waits by design is the
/// designated member's Acquire (for the old lease to expire): it waits
/// server-side 250 ms at a time, with a second more for its commit, and is
/// then asked again; nothing time-critical waits on it (the fencer and the
/// role loop run apart).
pub fn agent_call_timeout(spec: &GroupSpec) -> Duration {
    Duration::from_millis(spec.agent_call_timeout_ms())
}

/// Why an agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Tls(#[from] crate::tls::config::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// Fetches the group spec, retrying (bounded by `stop`) until the group
/// exists and names this member.
/// Cancelled by dropping it.
async fn fetch_spec(client: &Client, config: &AgentConfig) -> Result<GroupSpec, AgentError> {
    let mut warned = false;
    loop {
        match client.get_group(&config.group, pb::Consistency::Stale).await {
            Ok(resp) => {
                let spec = spec_from_pb(resp.spec.unwrap_or_default());
                if spec.member(&config.member).is_some() {
                    return Ok(spec);
                }
                if !warned {
                    warn!("group {} has no member {}; waiting for the spec to name it", config.group, config.member);
                    warned = true;
                }
            }
            Err(e) if e.code() == tonic::Code::NotFound => {
                if !warned {
                    warn!("group {} does not exist yet; waiting (create it with `quorate group apply`)", config.group);
                    warned = true;
                }
            }
            Err(e) if e.code() == tonic::Code::InvalidArgument => return Err(e.into()),
            Err(e) => warn!("cannot read the group spec, retrying: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The driver for this member, from the config and the group spec.
fn make_driver(
    config: &AgentConfig,
    spec: &GroupSpec,
    redis: &Arc<RedisAccess>,
) -> Result<driver::AnyDriver, AgentError> {
    let data = spec.member(&config.member).and_then(|m| m.data.clone());
    Ok(match (config.driver, data) {
        (DriverKind::Exec, _) => {
            driver::AnyDriver::Exec(driver::ExecDriver::new(&config.group, &config.member, config.hooks.clone()))
        }
        (DriverKind::None, _) => driver::AnyDriver::None(driver::NoDriver),
        (DriverKind::Redis, None) => {
            return Err(ConfigError::Invalid {
                field: "driver",
                message: format!("redis: member {} has no data URL in group {}", config.member, config.group),
            }
            .into());
        }
        (DriverKind::Redis | DriverKind::Auto, Some(url)) => {
            driver::AnyDriver::Redis(driver::RedisDriver::new(&config.group, &url, redis.clone()))
        }
        (DriverKind::Auto, None) => driver::AnyDriver::None(driver::NoDriver),
    })
}

/// A new incarnation: random, so two starts never share one.
pub fn new_incarnation() -> u64 {
    rand::random()
}

/// Runs the agent until `shutdown` completes.
pub async fn run(config: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    config.validate()?;
    // Read once: every Redis connection of the agent uses it.
    let redis = Arc::new(config.redis_options().load_from_env()?);
    let warning = "talking to the coordinators in plain text (--insecure): anyone on the path can read and \
                   forge this member's reports";
    let transport = Transport::from_files(config.tls_files()?, warning)?;
    let endpoints: Vec<String> = config.endpoints.split(',').map(str::to_owned).collect();
    let first = Client::new_with(&endpoints, transport.clone())?.with_call_timeout(Duration::from_millis(250));
    // The process's own notifier: `READY=1`, `STOPPING=1` and watchdog
    // keep-alives to systemd when it set NOTIFY_SOCKET (crate::notify).
    let notifier = Notifier::from_env();
    tokio::pin!(shutdown);
    let spec = tokio::select! {
        s = fetch_spec(&first, &config) => s?,
        () = &mut shutdown => {
            notifier.stopping();
            notifier.close();
            return Ok(());
        }
    };
    let client = Arc::new(Client::new_with(&endpoints, transport)?.with_call_timeout(agent_call_timeout(&spec)));
    let stores = Arc::new(RedisStores::with_access(redis.clone()));
    let result = run_with(config, spec, client, stores, redis, notifier.clone(), shutdown).await;
    notifier.close();
    result
}

/// The agent's tasks over any [`Stores`] (`redis`: how the Redis driver
/// reaches the data service); split out for tests.
pub async fn run_with<S: Stores>(
    config: AgentConfig,
    spec: GroupSpec,
    client: Arc<Client>,
    stores: Arc<S>,
    redis: Arc<RedisAccess>,
    notifier: Arc<Notifier>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let http = match config.http_listen.as_str() {
        "" => None,
        addr => {
            Some(crate::http::bind(addr).await.map_err(|source| AgentError::Bind { addr: addr.to_owned(), source })?)
        }
    };
    let incarnation = new_incarnation();
    let (stop_tx, _) = watch::channel(false);
    info!(group = %config.group, member = %config.member, incarnation = format!("{incarnation:016x}"), "agent starting");
    let managed = spec.is_managed();
    let driver = Arc::new(make_driver(&config, &spec, &redis)?);
    let (spec_tx, spec_rx) = watch::channel(spec);
    let (healthy_tx, healthy_rx) = watch::channel(true);
    let (status_tx, status_rx) = watch::channel(pb::MemberStatus::default());
    // The observation loop takes a list of groups; an agent has one.
    let (specs_tx, specs_rx) = watch::channel(vec![spec_rx.borrow().clone()]);
    let mut tasks = JoinSet::new();
    let span = info_span!("agent", group = %config.group, member = %config.member);
    let metrics = Arc::new(health::AgentMetrics::default());
    let (health_tx, health_rx) = watch::channel(None);
    let (offset_tx, offset_rx) = watch::channel(None);
    if let Some(listener) = http {
        let handler = health::AgentHttp::new(&config, managed, health_rx.clone(), offset_rx, metrics.clone());
        tasks.spawn(crate::http::serve(listener, handler, stop_tx.subscribe()).instrument(span.clone()));
    }
    let publisher = Publisher { config: config.clone(), incarnation, stores: stores.clone(), metrics: metrics.clone() };
    tasks.spawn(publisher.run(spec_rx.clone(), healthy_rx, stop_tx.subscribe()).instrument(span.clone()));
    if managed {
        let role = role::RoleLoop {
            group: config.group.clone(),
            member: config.member.clone(),
            spec: spec_rx.clone(),
            client: client.clone(),
            driver,
            status: status_tx,
            healthy: healthy_tx,
            fence_mode: if config.test_only_no_deadline_fence {
                fence::FenceMode::TestOnlyNever
            } else {
                fence::FenceMode::Normal
            },
            health: health_tx,
            primary_offset: offset_tx,
            metrics,
        };
        tasks.spawn(role.run(stop_tx.subscribe()).instrument(span.clone()));
    }
    tasks.spawn(
        Observe {
            observer: Observer::Member(config.member.clone()),
            incarnation,
            specs: specs_rx,
            status: managed.then_some(status_rx),
            stores,
            sink: client.clone(),
        }
        .run(stop_tx.subscribe())
        .instrument(span.clone()),
    );
    let ready =
        systemd::notify_ready(config.member.clone(), managed, health_rx.clone(), notifier.clone(), stop_tx.subscribe());
    tasks.spawn(ready.instrument(span.clone()));
    tasks.spawn(systemd::watchdog(managed, health_rx, notifier.clone(), stop_tx.subscribe()).instrument(span.clone()));
    tasks.spawn(refresh_spec(config, client, spec_tx, specs_tx, stop_tx.subscribe()).instrument(span));
    shutdown.await;
    notifier.stopping();
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    info!("agent stopped");
    Ok(())
}

/// What publishes this member's heartbeats.
struct Publisher<S> {
    config: AgentConfig,
    incarnation: u64,
    stores: Arc<S>,
    metrics: Arc<health::AgentMetrics>,
}

impl<S: Stores> Publisher<S> {
    /// Runs [`publish`] until `stop`.
    async fn run(self, spec: watch::Receiver<GroupSpec>, healthy: watch::Receiver<bool>, stop: watch::Receiver<bool>) {
        publish(self.config, self.incarnation, spec, healthy, self.stores, self.metrics, stop).await;
    }
}

/// Publishes this member's heartbeat every interval. Heartbeats stop while `healthy` is false (the member's data service is
/// unreachable), so observers judge the member down.
async fn publish<S: Stores>(
    config: AgentConfig,
    incarnation: u64,
    mut spec: watch::Receiver<GroupSpec>,
    healthy: watch::Receiver<bool>,
    stores: Arc<S>,
    metrics: Arc<health::AgentMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let key = heartbeat_key(&config.group, &config.member);
    let mut seq = 0u64;
    let mut failing = false;
    loop {
        let (url, policy) = {
            let s = spec.borrow_and_update();
            (s.member(&config.member).map(|m| m.heartbeat.clone()), s.policy)
        };
        if let Some(url) = url.filter(|_| *healthy.borrow()) {
            seq += 1;
            let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let value = Beat { incarnation, seq, unix_ms }.encode();
            let timeout = Duration::from_millis(policy.store_timeout_ms());
            let res = stores.set(&url, &key, &value, policy.heartbeat_ttl_ms(), timeout).await;
            metrics.heartbeat(res.is_ok());
            match res {
                Ok(()) if failing => {
                    info!("heartbeats published again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    warn!("cannot publish heartbeat: {e}");
                    failing = true;
                }
                Err(_) => {}
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(policy.heartbeat_interval_ms)) => {}
            () = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

/// Follows changes of the group spec.
async fn refresh_spec(
    config: AgentConfig,
    client: Arc<Client>,
    spec_tx: watch::Sender<GroupSpec>,
    specs_tx: watch::Sender<Vec<GroupSpec>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SPEC_REFRESH) => {}
            () = crate::shutdown::stopped(&mut stop) => return,
        }
        match client.get_group(&config.group, pb::Consistency::Stale).await {
            Ok(resp) => {
                let spec = spec_from_pb(resp.spec.unwrap_or_default());
                if spec.member(&config.member).is_none() {
                    warn!("this member is no longer in group {}; keeping the last spec", config.group);
                    continue;
                }
                let changed = spec_tx.send_if_modified(|s| {
                    let changed = *s != spec;
                    if changed {
                        info!("group spec changed");
                        *s = spec.clone();
                    }
                    changed
                });
                if changed {
                    let _ = specs_tx.send(vec![spec]);
                }
            }
            Err(e) => tracing::debug!("spec refresh failed: {e}"),
        }
    }
}

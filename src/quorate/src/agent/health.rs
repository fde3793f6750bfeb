//! An agent's HTTP health endpoints, in Patroni's conventions, and its
//! `/metrics`, served by [`crate::http`] on `http_listen`.
//!
//! Every answer comes from the role runtime's own state: after each step
//! the role loop publishes a [`RoleSnapshot`] (its [`RoleMachine`], the
//! data service's offset, the last driver error) on a watch channel, and
//! the checks evaluate the machine's own predicates
//! ([`RoleMachine::serves_as_primary`], [`RoleMachine::holds_lease`]) at
//! the time of the request, so a primary whose deadline passed while its
//! loop was busy already answers 503. Every check is 200 or 503 with a
//! JSON body; `HEAD` and `OPTIONS` answer the same without one.
//!
//! | path | 200 when |
//! | --- | --- |
//! | `/`, `/primary`, `/read-write` | this member holds the lease, its data service was promoted under it (writes open, not fenced) and reports itself primary |
//! | `/replica[?lag=N]` | its data service is a replica (and, with `lag`, at most N bytes behind the primary's last reported offset) |
//! | `/read-only[?lag=N]` | `/primary` or `/replica` |
//! | `/leader` | it holds the lease, whatever its service's role |
//! | `/health` | its data service answers (unmanaged groups: its heartbeats are published) |
//! | `/liveness` | the role loop ran within twice the lease TTL (unmanaged: always) |
//! | `/readiness[?lag=N]` | `/primary`, or a replica whose link to the primary is up (within `lag`) |

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use quorate_core::election::Role;
use quorate_core::role::RoleMachine;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::http::{Handler, Reply, parse_bytes, query_param};

/// The paths an agent's listener serves.
pub const PATHS: &[&str] =
    &["/primary", "/read-write", "/replica", "/read-only", "/leader", "/health", "/liveness", "/readiness", "/metrics"];

/// What the role loop publishes after every step.
#[derive(Debug, Clone)]
pub struct RoleSnapshot {
    pub machine: RoleMachine,
    /// The origin of the machine's clock (its times are ms since then).
    pub origin: Instant,
    /// When the role loop published this.
    pub at: Instant,
    /// The data service's replication offset.
    pub offset: u64,
    /// The last driver error, if the last action failed.
    pub last_error: Option<String>,
    /// The lease TTL of the group (liveness allows twice as much).
    pub lease_ttl_ms: u64,
}

impl RoleSnapshot {
    /// Whether the role loop ran within twice the lease TTL (at least a
    /// second): `/liveness`, and the systemd watchdog's keep-alives.
    pub fn loop_alive(&self) -> bool {
        self.at.elapsed() < Duration::from_millis(self.lease_ttl_ms.saturating_mul(2).max(1_000))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
}

/// The counters an agent keeps between scrapes.
#[derive(Debug)]
pub struct AgentMetrics {
    pub heartbeat_errors: Counter,
    pub hook_failures: Family<ActionLabel, Counter>,
    /// Lease deadline to fence applied, seconds (0 when before it).
    pub fence_delay: Histogram,
    heartbeat_ok: AtomicBool,
    heartbeats: AtomicU64,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            heartbeat_errors: Counter::default(),
            hook_failures: Family::default(),
            fence_delay: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            heartbeat_ok: AtomicBool::new(false),
            heartbeats: AtomicU64::new(0),
        }
    }
}

impl AgentMetrics {
    /// Records the outcome of one heartbeat publication.
    pub fn heartbeat(&self, ok: bool) {
        self.heartbeat_ok.store(ok, Ordering::Relaxed);
        if ok {
            self.heartbeats.fetch_add(1, Ordering::Relaxed);
        } else {
            self.heartbeat_errors.inc();
        }
    }
}

/// The agent's HTTP handler.
#[derive(Debug, Clone)]
pub struct AgentHttp {
    pub group: String,
    pub member: String,
    pub managed: bool,
    pub snapshot: watch::Receiver<Option<RoleSnapshot>>,
    /// The offset the lease holder last reported to the coordinators.
    pub primary_offset: watch::Receiver<Option<u64>>,
    pub metrics: Arc<AgentMetrics>,
}

/// The member's state at one request.
#[derive(Debug, Clone, Default)]
struct Now {
    primary: bool,
    replica: bool,
    holds_lease: bool,
    reachable: bool,
    role: &'static str,
    link_up: bool,
    offset: u64,
    lag_bytes: Option<u64>,
    epoch: u64,
    lease_remaining_ms: u64,
    holder: Option<String>,
    designated: Option<String>,
    alive: bool,
    last_error: Option<String>,
}

impl AgentHttp {
    /// The handler of `config`'s member.
    pub fn new(
        config: &crate::config::AgentConfig,
        managed: bool,
        snapshot: watch::Receiver<Option<RoleSnapshot>>,
        primary_offset: watch::Receiver<Option<u64>>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Self { group: config.group.clone(), member: config.member.clone(), managed, snapshot, primary_offset, metrics }
    }

    fn now(&self) -> Now {
        let heartbeats = self.metrics.heartbeat_ok.load(Ordering::Relaxed);
        let Some(s) = self.snapshot.borrow().clone() else {
            // Not managed (no role loop), or the loop has not stepped yet.
            return Now {
                role: "unknown",
                alive: !self.managed,
                reachable: !self.managed && heartbeats,
                ..Now::default()
            };
        };
        let now_ms = Instant::now().saturating_duration_since(s.origin).as_millis() as u64;
        let m = &s.machine;
        let svc = m.service();
        let primary = m.serves_as_primary(now_ms);
        let replica = !primary && svc.reachable && svc.role == Some(Role::Replica);
        let held = m.held().filter(|_| m.holds_lease(now_ms));
        Now {
            primary,
            replica,
            holds_lease: held.is_some(),
            reachable: svc.reachable,
            role: svc.role.map_or("unknown", Role::as_str),
            link_up: svc.link_up,
            offset: s.offset,
            lag_bytes: replica.then(|| *self.primary_offset.borrow()).flatten().map(|p| p.saturating_sub(s.offset)),
            epoch: held.map_or_else(|| m.election().map_or(0, |e| e.epoch), |h| h.epoch),
            lease_remaining_ms: held.map_or(0, |h| h.valid_until_ms.saturating_sub(now_ms)),
            holder: m.election().and_then(|e| e.holder.clone()),
            designated: m.election().and_then(|e| e.designated.clone()),
            alive: s.loop_alive(),
            last_error: s.last_error.clone(),
        }
    }

    fn body(&self, n: &Now, check: &str, ok: bool, reason: &str) -> serde_json::Value {
        json!({
            "check": check,
            "ok": ok,
            "reason": reason,
            "group": self.group,
            "member": self.member,
            "managed": self.managed,
            "role": if n.primary { "primary" } else if n.replica { "replica" } else { "none" },
            "data_role": n.role,
            "data_reachable": n.reachable,
            "holds_lease": n.holds_lease,
            "fenced": n.role == "primary" && !n.primary,
            "epoch": n.epoch,
            "lease_remaining_ms": n.lease_remaining_ms,
            "holder": n.holder,
            "designated": n.designated,
            "link_up": n.link_up,
            "offset": n.offset,
            "lag_bytes": n.lag_bytes,
            "alive": n.alive,
            "last_error": n.last_error,
        })
    }

    /// The verdict of check `path` on `n`, and why not when it fails.
    fn verdict(&self, path: &str, query: Option<&str>, n: &Now) -> Option<(bool, String)> {
        let lag = query_param(query, "lag");
        let max_lag = match lag.map(parse_bytes) {
            Some(None) => return Some((false, format!("lag={:?} is not a size (bytes, or 16kB, 1MB, ...)", lag))),
            Some(Some(b)) => Some(b),
            None => None,
        };
        let lag_ok = max_lag.is_none_or(|max| n.lag_bytes.is_some_and(|l| l <= max));
        let why = |ok: bool, reason: &str| (ok, if ok { String::new() } else { reason.to_owned() });
        Some(match path {
            "/" | "/primary" | "/read-write" => why(n.primary, "not the primary (no lease, not promoted, or fenced)"),
            "/replica" => why(n.replica && lag_ok, "not a replica within the lag asked for"),
            "/read-only" => why(n.primary || (n.replica && lag_ok), "neither primary nor a replica within the lag"),
            "/leader" => why(n.holds_lease, "does not hold the lease"),
            "/health" => why(n.reachable, "the data service does not answer"),
            "/liveness" => why(n.alive, "the role loop has not run within twice the lease TTL"),
            "/readiness" => {
                why(n.primary || (n.replica && n.link_up && lag_ok), "neither primary nor a linked replica within lag")
            }
            _ => return None,
        })
    }

    fn render(&self) -> String {
        let n = self.now();
        let labels: [(Cow<'static, str>, Cow<'static, str>); 2] =
            [("group".into(), self.group.clone().into()), ("member".into(), self.member.clone().into())];
        let mut reg = Registry::with_prefix_and_labels("quorate", labels.into_iter());
        let mut gauge = |name: &str, help: &str, v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            reg.register(name, help, g);
        };
        gauge("agent_serving_primary", "1 while /primary answers 200", i64::from(n.primary));
        gauge("agent_replica", "1 while /replica answers 200 (no lag asked)", i64::from(n.replica));
        gauge("agent_redis_master", "1 while the data service reports itself primary", i64::from(n.role == "primary"));
        gauge(
            "agent_fenced",
            "1 while the data service is primary but does not serve",
            i64::from(n.role == "primary" && !n.primary),
        );
        gauge("agent_lease_held", "1 while this member holds the lease", i64::from(n.holds_lease));
        gauge("agent_lease_epoch", "The epoch of the lease held, else of the holder seen", n.epoch as i64);
        gauge("agent_data_reachable", "1 while the data service answers", i64::from(n.reachable));
        gauge("agent_alive", "1 while /liveness answers 200", i64::from(n.alive));
        gauge("agent_replication_offset_bytes", "The data service's replication offset", n.offset as i64);
        if let Some(lag) = n.lag_bytes {
            gauge("agent_replication_lag_bytes", "Bytes behind the primary's last reported offset", lag as i64);
        }
        let remaining = Gauge::<f64, AtomicU64>::default();
        remaining.set(n.lease_remaining_ms as f64 / 1000.0);
        reg.register_with_unit("agent_lease_remaining", "Time left on the lease held", Unit::Seconds, remaining);
        self.register_kept(&mut reg);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }

    fn register_kept(&self, reg: &mut Registry) {
        let m = &self.metrics;
        reg.register("agent_heartbeat_errors", "Heartbeats that could not be published", m.heartbeat_errors.clone());
        reg.register(
            "agent_hook_failures",
            "Role driver actions (promote, fence, follow, switchover) that failed",
            m.hook_failures.clone(),
        );
        reg.register_with_unit(
            "agent_fence_delay",
            "From the lease deadline to the fence applied (0 when applied before it)",
            Unit::Seconds,
            m.fence_delay.clone(),
        );
    }
}

impl Handler for AgentHttp {
    async fn handle(&self, path: &str, query: Option<&str>) -> Reply {
        if path == "/metrics" {
            return Reply::metrics(self.render());
        }
        let n = self.now();
        match self.verdict(path, query, &n) {
            Some((ok, reason)) => Reply::check(ok, &self.body(&n, path, ok, &reason)),
            None => Reply::not_found(PATHS),
        }
    }
}

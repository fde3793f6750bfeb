//! The observation loop, shared by agents and coordinator nodes.
//!
//! Every `heartbeat_interval_ms` it reads every target's heartbeat key (one
//! `MGET` per store, all stores at once, each bounded by a timeout shorter
//! than the interval, so a slow store cannot stall the loop), feeds the
//! readings to one pure [`Tracker`] per target, and hands a report to the
//! reporter when any observation changes state and at least every
//! `report_interval_ms`. The reporter sends the latest report (never a
//! backlog) and retries until it gets through, following the Raft leader.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use quorate_core::group::{GroupSpec, heartbeat_key};
use quorate_core::matrix::Observer;
use quorate_core::observe::{Beat, Reading, Tracker};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::store::Stores;
use crate::api::convert::observation_pb;
use crate::client::{Client, ClientError};
use crate::pb::v1 as pb;

/// Where reports go. [`Client`] sends them to the cluster; tests collect them.
pub trait ReportSink: Send + Sync + 'static {
    fn report(&self, req: pb::ReportRequest) -> impl Future<Output = Result<(), ClientError>> + Send;
}

impl ReportSink for Client {
    async fn report(&self, req: pb::ReportRequest) -> Result<(), ClientError> {
        self.report_view(req).await.map(|_| ())
    }
}

/// Bound on one read round, as a fraction of the heartbeat interval.
fn read_timeout(spec: &GroupSpec) -> Duration {
    Duration::from_millis((spec.policy.heartbeat_interval_ms * 4 / 5).max(20))
}

/// The targets `observer` watches: the other members (or every member, for
/// a coordinator).
fn targets<'a>(
    spec: &'a GroupSpec,
    observer: &'a Observer,
) -> impl Iterator<Item = &'a quorate_core::group::MemberSpec> {
    spec.members.iter().filter(move |m| *observer != Observer::Member(m.id.clone()))
}

/// Runs the observation loop for one group until `stop` flips to true.
/// `spec` carries the group spec and its changes.
pub async fn observe<S: Stores, R: ReportSink>(
    observer: Observer,
    incarnation: u64,
    mut spec: watch::Receiver<GroupSpec>,
    stores: Arc<S>,
    sink: Arc<R>,
    mut stop: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let now_ms = || start.elapsed().as_millis() as u64;
    let (report_tx, report_rx) = watch::channel::<Option<pb::ReportRequest>>(None);
    let reporter = tokio::spawn(report_loop(sink, report_rx, stop.clone()).in_current_span());

    let mut current = spec.borrow_and_update().clone();
    let mut trackers: BTreeMap<String, Tracker> = BTreeMap::new();
    let mut last_report: Option<Instant> = None;
    let mut interval = tokio::time::interval(Duration::from_millis(current.policy.heartbeat_interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            changed = spec.changed() => {
                if changed.is_err() { break; }
                current = spec.borrow_and_update().clone();
                interval = tokio::time::interval(Duration::from_millis(current.policy.heartbeat_interval_ms));
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                debug!(group = %current.name, "spec changed");
                continue;
            }
            () = crate::shutdown::stopped(&mut stop) => break,
        }
        // Keep one tracker per current target.
        trackers.retain(|id, _| current.member(id).is_some());
        for m in targets(&current, &observer) {
            trackers
                .entry(m.id.clone())
                .or_insert_with(|| Tracker::new(current.policy.down_after_ms, now_ms()))
                .set_down_after(current.policy.down_after_ms);
        }
        let readings = read_round(&current, &observer, stores.as_ref()).instrument(info_span!("read_round")).await;
        let now = now_ms();
        let mut changed = false;
        for (id, reading) in readings {
            if let Some(t) = trackers.get_mut(&id)
                && let Some(tr) = t.observe(now, reading)
            {
                changed = true;
                if let Some((from, to)) = tr.restarted {
                    info!(group = %current.name, target = %id, from = format!("{from:016x}"), to = format!("{to:016x}"), "target restarted");
                }
                if tr.from != tr.to {
                    info!(group = %current.name, target = %id, from = tr.from.as_str(), to = tr.to.as_str(), "observation changed");
                }
            }
        }
        let due = last_report.is_none_or(|t| t.elapsed() >= Duration::from_millis(current.policy.report_interval_ms));
        if changed || due {
            last_report = Some(Instant::now());
            let req = pb::ReportRequest {
                group: current.name.clone(),
                observer: observer.to_string(),
                observer_incarnation: incarnation,
                cells: trackers.iter().map(|(id, t)| observation_pb(id, &t.observation(now))).collect(),
            };
            // Latest wins: an unsent older report is simply replaced.
            let _ = report_tx.send(Some(req));
        }
    }
    drop(report_tx);
    let _ = reporter.await;
}

/// One read of every target's key: one MGET per store, all stores at once.
async fn read_round<S: Stores>(spec: &GroupSpec, observer: &Observer, stores: &S) -> Vec<(String, Reading)> {
    let timeout = read_timeout(spec);
    let mut by_store: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for m in targets(spec, observer) {
        by_store.entry(m.heartbeat.as_str()).or_default().push(m.id.as_str());
    }
    let reads = by_store.into_iter().map(|(url, ids)| async move {
        let keys: Vec<String> = ids.iter().map(|id| heartbeat_key(&spec.name, id)).collect();
        let res = stores.get_many(url, &keys, timeout).await;
        match res {
            Ok(values) => ids
                .iter()
                .zip(values)
                .map(|(id, v)| {
                    let reading = match v {
                        None => Reading::Missing,
                        Some(s) => Beat::parse(&s).map_or(Reading::Garbled, Reading::Present),
                    };
                    ((*id).to_owned(), reading)
                })
                .collect::<Vec<_>>(),
            Err(e) => {
                debug!("heartbeat store unreachable: {e}");
                ids.iter().map(|id| ((*id).to_owned(), Reading::Unreachable)).collect()
            }
        }
    });
    futures::future::join_all(reads).await.into_iter().flatten().collect()
}

/// Sends the latest report until it gets through, then waits for the next.
async fn report_loop<R: ReportSink>(
    sink: Arc<R>,
    mut rx: watch::Receiver<Option<pb::ReportRequest>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = crate::shutdown::stopped(&mut stop) => return,
        }
        let Some(req) = rx.borrow_and_update().clone() else { continue };
        match sink.report(req).await {
            Ok(()) => {
                if failures > 0 {
                    info!(after = failures, "reports get through again");
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    warn!(failures, "report failed, will retry: {e}");
                }
                // Retry the latest report shortly (a newer one may replace it).
                rx.mark_changed();
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = crate::shutdown::stopped(&mut stop) => return,
                }
            }
        }
    }
}

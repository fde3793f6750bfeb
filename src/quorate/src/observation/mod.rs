//! The observation loop, shared by agents (one group) and coordinator nodes
//! (every group), and the heartbeat stores it reads ([`store`]).
//!
//! Every heartbeat interval it reads every target's heartbeat key (one
//! `MGET` per store across all groups, all stores at once, each bounded by a
//! timeout shorter than the interval, so a slow store cannot stall the loop),
//! feeds the readings to one pure [`Tracker`] per target, and queues a
//! group's view when one of its observations changes state and at least
//! every `report_interval_ms`. The reporter sends every queued view (the
//! latest view per group, never a backlog), in reports of at most
//! [`REPORT_CHUNK_BYTES`] sent together, so that a coordinator watching
//! thousands of groups never writes an entry larger than the cluster takes,
//! and retries what failed until it gets through.
//!
//! Where reports go is a [`ReportSink`]: an agent's [`Client`] sends them
//! to the cluster, following the Raft leader; a coordinator node hands its
//! own to its service layer in-process (`server::observers`).

pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quorate_core::group::{GroupSpec, Policy, heartbeat_key};
use quorate_core::matrix::Observer;
use quorate_core::observe::{Beat, Reading, Tracker};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use self::store::Stores;
use crate::client::{Client, ClientError};
use crate::pb::v1 as pb;
use crate::wire::MAX_VIEWS_PER_REPORT;
use crate::wire::convert::observation_pb;

/// Where reports go. [`Client`] sends them to the cluster; a coordinator's
/// node takes its own; tests collect them.
pub trait ReportSink: Send + Sync + 'static {
    /// Why a report did not get through (it is retried).
    type Error: std::fmt::Display + Send;
    fn report(&self, req: pb::ReportRequest) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

impl ReportSink for Client {
    type Error = ClientError;
    async fn report(&self, req: pb::ReportRequest) -> Result<(), ClientError> {
        self.report_view(req).await.map(|_| ())
    }
}

/// The most protobuf-encoded view bytes in one report. Reports are stored
/// as JSON, a few times larger, and must fit a log entry
/// ([`crate::raft::MAX_ENTRY_BYTES`]); the leader packs small reports into
/// one entry anyway.
pub const REPORT_CHUNK_BYTES: usize = 64 << 10;

/// Splits `views` into runs of at most [`REPORT_CHUNK_BYTES`] and
/// [`MAX_VIEWS_PER_REPORT`] views (a single larger view goes alone).
fn chunks(views: Vec<pb::GroupView>) -> Vec<Vec<pb::GroupView>> {
    use prost::Message as _;
    let mut out: Vec<Vec<pb::GroupView>> = Vec::new();
    let mut bytes = 0usize;
    for v in views {
        let size = v.encoded_len();
        match out.last_mut() {
            Some(last) if bytes + size <= REPORT_CHUNK_BYTES && last.len() < MAX_VIEWS_PER_REPORT => {
                bytes += size;
                last.push(v);
            }
            _ => {
                bytes = size;
                out.push(vec![v]);
            }
        }
    }
    out
}

/// The policy the loop runs by over `specs`: the tightest of theirs, so
/// that every group is read and refreshed at least as often as it asks.
fn loop_policy(specs: &[GroupSpec]) -> Policy {
    Policy::tightest(specs.iter().map(|s| &s.policy))
}

/// Bound on one read round ([`Policy::store_timeout_ms`]).
fn read_timeout(specs: &[GroupSpec]) -> Duration {
    Duration::from_millis(loop_policy(specs).store_timeout_ms())
}

/// The (group, member, store) triples `observer` watches: the other members
/// of its group, or every member of every group for a coordinator.
fn targets<'a>(specs: &'a [GroupSpec], observer: &'a Observer) -> impl Iterator<Item = (&'a str, &'a str, &'a str)> {
    specs.iter().flat_map(move |spec| {
        spec.members
            .iter()
            .filter(move |m| *observer != Observer::Member(m.id.clone()))
            .map(move |m| (spec.name.as_str(), m.id.as_str(), m.heartbeat.as_str()))
    })
}

/// Views waiting to be reported: the latest per group.
#[derive(Default)]
struct Pending {
    views: Mutex<BTreeMap<String, pb::GroupView>>,
    notify: Notify,
}

impl Pending {
    fn put(&self, views: Vec<pb::GroupView>) {
        let mut p = self.views.lock().unwrap_or_else(|e| e.into_inner());
        for v in views {
            p.insert(v.group.clone(), v);
        }
        drop(p);
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<pb::GroupView> {
        std::mem::take(&mut *self.views.lock().unwrap_or_else(|e| e.into_inner())).into_values().collect()
    }

    /// Puts back views that failed to send, unless newer ones replaced them.
    fn put_back(&self, views: Vec<pb::GroupView>) {
        let mut p = self.views.lock().unwrap_or_else(|e| e.into_inner());
        for v in views {
            p.entry(v.group.clone()).or_insert(v);
        }
    }
}

/// One observer's observation loop: who observes, what, where it reads and
/// where its reports go.
#[derive(Debug)]
pub struct Observe<S, R> {
    pub observer: Observer,
    /// Which start of the observer (random per process start).
    pub incarnation: u64,
    /// The groups to observe and their changes.
    pub specs: watch::Receiver<Vec<GroupSpec>>,
    /// Agents only: the state of the member's own data service, sent with
    /// every report and reported at once when it changes.
    pub status: Option<watch::Receiver<pb::MemberStatus>>,
    pub stores: Arc<S>,
    pub sink: Arc<R>,
}

/// The loop's state between ticks.
struct Round {
    observer: Observer,
    start: Instant,
    /// The groups as last seen.
    current: Vec<GroupSpec>,
    /// One pure tracker per (group, target).
    trackers: BTreeMap<(String, String), Tracker>,
    /// When every group's view was last sent. Refreshes go out together, so
    /// a coordinator observing many groups sends one report per interval.
    last_refresh: Option<Instant>,
    last_status: Option<pb::MemberStatus>,
}

/// A tick of the shortest read interval of `specs` ([`Policy::read_interval_ms`]).
fn tick_of(specs: &[GroupSpec]) -> tokio::time::Interval {
    let ms = loop_policy(specs).read_interval_ms();
    let mut i = tokio::time::interval(Duration::from_millis(ms));
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    i
}

impl<S: Stores, R: ReportSink> Observe<S, R> {
    /// Runs the observation loop until `stop` flips to true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let pending = Arc::new(Pending::default());
        let reporter = tokio::spawn(
            report_loop(
                self.observer.clone(),
                self.incarnation,
                self.sink.clone(),
                pending.clone(),
                self.status.clone(),
                stop.clone(),
            )
            .in_current_span(),
        );
        let mut round = Round {
            observer: self.observer.clone(),
            start: Instant::now(),
            current: self.specs.borrow_and_update().clone(),
            trackers: BTreeMap::new(),
            last_refresh: None,
            last_status: None,
        };
        let mut interval = tick_of(&round.current);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                changed = self.specs.changed() => {
                    if changed.is_err() { break; }
                    round.current = self.specs.borrow_and_update().clone();
                    interval = tick_of(&round.current);
                    debug!(groups = round.current.len(), "specs changed");
                    continue;
                }
                () = crate::shutdown::stopped(&mut stop) => break,
            }
            round.keep_trackers();
            let readings = read_round(&round.current, &round.observer, self.stores.as_ref())
                .instrument(info_span!("read_round"))
                .await;
            let changed = round.track(readings);
            let status_now = self.status.as_ref().map(|s| s.borrow().clone());
            let views = round.views_to_send(&changed, status_now);
            if !views.is_empty() {
                pending.put(views);
            }
        }
        pending.notify.notify_one();
        let _ = reporter.await;
    }
}

impl Round {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Keeps one tracker per current (group, target), each with its
    /// group's `down_after_ms`.
    fn keep_trackers(&mut self) {
        let wanted: BTreeMap<(String, String), u64> = self
            .current
            .iter()
            .flat_map(|s| {
                targets(std::slice::from_ref(s), &self.observer)
                    .map(|(g, m, _)| ((g.to_owned(), m.to_owned()), s.policy.down_after_ms))
                    .collect::<Vec<_>>()
            })
            .collect();
        self.trackers.retain(|k, _| wanted.contains_key(k));
        let now = self.now_ms();
        for (k, down_after) in &wanted {
            self.trackers
                .entry(k.clone())
                .or_insert_with(|| Tracker::new(*down_after, now))
                .set_down_after(*down_after);
        }
    }

    /// Feeds one round of readings to the trackers; the groups whose
    /// observations changed state.
    fn track(&mut self, readings: Vec<((String, String), Reading)>) -> BTreeSet<String> {
        let now = self.now_ms();
        let mut changed = BTreeSet::new();
        for (key, reading) in readings {
            if let Some(t) = self.trackers.get_mut(&key)
                && let Some(tr) = t.observe(now, reading)
            {
                let (group, target) = &key;
                changed.insert(group.clone());
                if let Some((from, to)) = tr.restarted {
                    info!(%group, %target, from = format!("{from:016x}"), to = format!("{to:016x}"), "target restarted");
                }
                if tr.from != tr.to {
                    let reason = t.observation(now).reason.as_str();
                    info!(%group, %target, from = tr.from.as_str(), to = tr.to.as_str(), reason, "observation changed");
                }
            }
        }
        changed
    }

    /// The views to report now: the changed groups', or every group's when
    /// the refresh interval has passed or the member's status changed.
    fn views_to_send(
        &mut self,
        changed: &BTreeSet<String>,
        status_now: Option<pb::MemberStatus>,
    ) -> Vec<pb::GroupView> {
        let refresh_every = loop_policy(&self.current).refresh_interval_ms();
        let status_changed = status_now.is_some() && status_now != self.last_status;
        if status_changed {
            self.last_status = status_now;
        }
        let refresh =
            status_changed || self.last_refresh.is_none_or(|t| t.elapsed() >= Duration::from_millis(refresh_every));
        if refresh {
            self.last_refresh = Some(Instant::now());
        }
        let now = self.now_ms();
        self.current
            .iter()
            .filter(|s| refresh || changed.contains(&s.name))
            .map(|s| pb::GroupView {
                group: s.name.clone(),
                cells: self
                    .trackers
                    .range((s.name.clone(), String::new())..)
                    .take_while(|((g, _), _)| *g == s.name)
                    .map(|((_, id), t)| observation_pb(id, &t.observation(now)))
                    .collect(),
            })
            .collect()
    }
}

/// One read of every target's key: one MGET per store, all stores at once.
async fn read_round<S: Stores>(
    specs: &[GroupSpec],
    observer: &Observer,
    stores: &S,
) -> Vec<((String, String), Reading)> {
    let timeout = read_timeout(specs);
    let mut by_store: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for (group, member, url) in targets(specs, observer) {
        by_store.entry(url).or_default().push((group, member));
    }
    let reads = by_store.into_iter().map(|(url, ids)| async move {
        let keys: Vec<String> = ids.iter().map(|(g, m)| heartbeat_key(g, m)).collect();
        let res = stores.get_many(url, &keys, timeout).await;
        let key = |(g, m): &(&str, &str)| ((*g).to_owned(), (*m).to_owned());
        match res {
            Ok(values) => ids
                .iter()
                .zip(values)
                .map(|(id, v)| {
                    let reading = match v {
                        None => Reading::Missing,
                        Some(s) => Beat::parse(&s).map_or(Reading::Garbled, Reading::Present),
                    };
                    (key(id), reading)
                })
                .collect::<Vec<_>>(),
            Err(e) => {
                debug!("unreachable: {e}");
                ids.iter().map(|id| (key(id), Reading::Unreachable)).collect()
            }
        }
    });
    futures::future::join_all(reads).await.into_iter().flatten().collect()
}

/// Sends every queued view, in reports of bounded size sent together, until
/// they get through; then waits for more. A failed report is retried
/// shortly, merged with newer views.
async fn report_loop<R: ReportSink>(
    observer: Observer,
    incarnation: u64,
    sink: Arc<R>,
    pending: Arc<Pending>,
    status: Option<watch::Receiver<pb::MemberStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = pending.notify.notified() => {}
            () = crate::shutdown::stopped(&mut stop) => return,
        }
        let views = pending.take();
        if views.is_empty() {
            continue;
        }
        let status = status.as_ref().map(|s| s.borrow().clone());
        let sends = chunks(views).into_iter().map(|views| {
            let req = pb::ReportRequest {
                observer: observer.to_string(),
                observer_incarnation: incarnation,
                views,
                status: status.clone(),
            };
            let sink = sink.clone();
            async move { sink.report(req.clone()).await.map_err(|e| (e, req.views)) }
        });
        let mut failed = None;
        for res in futures::future::join_all(sends).await {
            if let Err((e, views)) = res {
                pending.put_back(views);
                failed = Some(e);
            }
        }
        match failed {
            None => {
                if failures > 0 {
                    info!(after = failures, "reports get through again");
                }
                failures = 0;
            }
            Some(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    warn!(failures, "report failed, will retry: {e}");
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => pending.notify.notify_one(),
                    () = crate::shutdown::stopped(&mut stop) => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The loop over in-memory stores, under tokio's paused clock.

    use quorate_core::group::{MemberSpec, Policy};

    use super::*;
    use crate::observation::store::MemStores;

    #[derive(Default)]
    struct Collect {
        reports: Mutex<Vec<(Instant, pb::ReportRequest)>>,
    }

    #[test]
    fn views_are_split_into_reports_of_bounded_size_in_order() {
        use prost::Message as _;
        let view = |i: usize| pb::GroupView {
            group: format!("group-{i:05}"),
            cells: (0..4)
                .map(|m| pb::Observation {
                    target: format!("member-{m}"),
                    state: pb::ObservationState::ObservedUp as i32,
                    reason: "heartbeat advancing".into(),
                    ..Default::default()
                })
                .collect(),
        };
        let views: Vec<pb::GroupView> = (0..10_000).map(view).collect();
        let total: usize = views.iter().map(|v| v.encoded_len()).sum();
        let split = chunks(views.clone());
        assert!(split.len() > 1 && split.len() >= total / REPORT_CHUNK_BYTES);
        for c in &split {
            assert!(c.iter().map(|v| v.encoded_len()).sum::<usize>() <= REPORT_CHUNK_BYTES);
        }
        // Nothing lost, nothing reordered.
        assert_eq!(split.concat(), views);
        // Each chunk, as the command the log stores, stays under the entry
        // limit with room for the batch it may share.
        let biggest = split.iter().map(|c| {
            let views = c
                .iter()
                .map(|v| quorate_core::machine::GroupView {
                    group: v.group.clone(),
                    cells: v.cells.iter().map(|o| crate::wire::convert::observation_from_pb(o).unwrap()).collect(),
                })
                .collect();
            let op = quorate_core::Op::Report {
                observer: Observer::Coordinator(1),
                observer_incarnation: 1,
                views,
                status: None,
            };
            crate::raft::encoded_len(&op)
        });
        assert!(biggest.max().unwrap() < crate::raft::MAX_ENTRY_BYTES / 2);
        // A single view larger than a chunk goes alone; none is empty.
        let mut big = view(0);
        big.group = "x".repeat(REPORT_CHUNK_BYTES + 1);
        let split = chunks(vec![view(1), big.clone(), view(2)]);
        assert_eq!(split.len(), 3);
        assert_eq!(split[1], vec![big]);
        assert!(chunks(Vec::new()).is_empty());
    }

    impl ReportSink for Collect {
        type Error = ClientError;
        async fn report(&self, req: pb::ReportRequest) -> Result<(), ClientError> {
            self.reports.lock().unwrap().push((Instant::now(), req));
            Ok(())
        }
    }

    fn spec(name: &str, members: &[(&str, &str)]) -> GroupSpec {
        GroupSpec {
            name: name.into(),
            members: members
                .iter()
                .map(|(id, url)| MemberSpec {
                    id: (*id).into(),
                    heartbeat: (*url).into(),
                    priority: 1,
                    data: None,
                    announce: None,
                })
                .collect(),
            policy: Policy::default(),
            failover: None,
        }
    }

    /// Publishes `member`'s heartbeat every 100 ms until `until`.
    async fn beat(stores: MemStores, url: &'static str, group: &'static str, member: &'static str, until: Instant) {
        let mut seq = 0;
        while Instant::now() < until {
            seq += 1;
            let v = Beat { incarnation: 7, seq, unix_ms: 0 }.encode();
            stores.set(url, &heartbeat_key(group, member), &v, 500, Duration::from_millis(80)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn state_of(req: &pb::ReportRequest, group: &str, target: &str) -> Option<(i32, String)> {
        let view = req.views.iter().find(|v| v.group == group)?;
        view.cells.iter().find(|c| c.target == target).map(|c| (c.state, c.reason.clone()))
    }

    #[tokio::test(start_paused = true)]
    async fn reports_changes_at_once_and_refreshes_every_report_interval() {
        let stores = MemStores::new();
        let sink = Arc::new(Collect::default());
        let specs =
            vec![spec("g1", &[("a", "redis://s1:1"), ("b", "redis://s1:1")]), spec("g2", &[("c", "redis://s2:1")])];
        let (_specs_tx, specs_rx) = watch::channel(specs);
        let (stop_tx, stop_rx) = watch::channel(false);
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        tokio::spawn(beat(stores.clone(), "redis://s1:1", "g1", "a", far));
        // b stops beating after 2 s.
        tokio::spawn(beat(stores.clone(), "redis://s1:1", "g1", "b", t0 + Duration::from_secs(2)));
        tokio::spawn(beat(stores.clone(), "redis://s2:1", "g2", "c", far));
        // g2's store becomes unreachable at 4 s.
        let s2 = stores.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            s2.set_down("redis://s2:1", true);
        });
        let observe = Observe {
            observer: Observer::Coordinator(1),
            incarnation: 1,
            specs: specs_rx,
            status: None,
            stores: Arc::new(stores.clone()),
            sink: sink.clone(),
        };
        let looping = tokio::spawn(observe.run(stop_rx));
        tokio::time::sleep(Duration::from_secs(7)).await;
        let _ = stop_tx.send(true);
        looping.await.unwrap();

        let reports = sink.reports.lock().unwrap().clone();
        // Both groups travel in the same reports (one report per tick).
        assert!(reports.iter().any(|(_, r)| r.views.len() == 2), "no batched report");
        // b goes down once it stopped for down_after (500 ms) plus a tick.
        let (b_down_at, _) = reports
            .iter()
            .find(|(_, r)| state_of(r, "g1", "b").is_some_and(|(s, _)| s == pb::ObservationState::ObservedDown as i32))
            .expect("b never reported down");
        let after = *b_down_at - (t0 + Duration::from_secs(2));
        assert!(after >= Duration::from_millis(400) && after <= Duration::from_millis(700), "b down after {after:?}");
        // c goes down as unreachable after its store went away.
        let c_down = reports.iter().find_map(|(t, r)| {
            state_of(r, "g2", "c")
                .filter(|(s, _)| *s == pb::ObservationState::ObservedDown as i32)
                .map(|(_, why)| (*t, why))
        });
        let (c_at, why) = c_down.expect("c never reported down");
        assert_eq!(why, "heartbeat store unreachable");
        assert!(c_at - (t0 + Duration::from_secs(4)) <= Duration::from_millis(700));
        // a stays up throughout, and is refreshed about once a second.
        let a_reports: Vec<Instant> =
            reports.iter().filter(|(_, r)| state_of(r, "g1", "a").is_some()).map(|(t, _)| *t).collect();
        let down = pb::ObservationState::ObservedDown as i32;
        assert!(reports.iter().all(|(_, r)| state_of(r, "g1", "a").is_none_or(|(s, _)| s != down)), "a went down");
        assert!((7..=10).contains(&a_reports.len()), "{} reports of g1 in 7 s", a_reports.len());
        for w in a_reports.windows(2) {
            assert!(w[1] - w[0] <= Duration::from_millis(1100), "refresh gap {:?}", w[1] - w[0]);
        }
    }
}

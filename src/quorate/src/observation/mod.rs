//! The observation loop, shared by agents (one group) and coordinator nodes
//! (every group), and the heartbeat stores it reads ([`store`]).
//!
//! Every heartbeat interval it reads every target's heartbeat key (one
//! `MGET` per store across all groups, all stores at once, each bounded by a
//! timeout shorter than the interval, so a slow store cannot stall the loop),
//! feeds the readings to one pure [`Tracker`] per target, and queues a
//! group's view when one of its observations changes state and at least
//! every `report_interval_ms`. What it reads, and which tracker each key
//! feeds, is planned once per change of the groups, not per tick: a
//! coordinator reads every member of every group ten times a second.
//!
//! The reporter ([`report`]) sends every queued view (the latest view per
//! group, never a backlog), in reports of at most [`REPORT_CHUNK_BYTES`]
//! sent together, so that a coordinator watching thousands of groups never
//! writes an entry larger than the cluster takes, and retries what failed
//! until it gets through. A view that says what the last one that got
//! through said goes as a refresh of that one, a few bytes, not again in
//! full.
//!
//! Where reports go is a [`ReportSink`]: an agent's [`Client`] sends them
//! to the cluster, following the Raft leader; a coordinator node hands its
//! own to its service layer in-process (`server::observers`).

mod report;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use quorate_core::group::{GroupSpec, Policy, heartbeat_key};
use quorate_core::matrix::Observer;
use quorate_core::observe::{Beat, Reading, Tracker};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span};

pub use self::report::REPORT_CHUNK_BYTES;
use self::report::{Pending, report_loop};
use self::store::Stores;
use crate::client::{Client, ClientError};
use crate::pb::v1 as pb;
use crate::wire::convert::observation_pb;

/// Where reports go. [`Client`] sends them to the cluster; a coordinator's
/// node takes its own; tests collect them.
pub trait ReportSink: Send + Sync + 'static {
    /// Why a report did not get through (it is retried).
    type Error: std::fmt::Display + Send;
    fn report(&self, req: pb::ReportRequest) -> impl Future<Output = Result<pb::ReportResponse, Self::Error>> + Send;
}

impl ReportSink for Client {
    type Error = ClientError;
    async fn report(&self, req: pb::ReportRequest) -> Result<pb::ReportResponse, ClientError> {
        self.report_view(req).await
    }
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

/// One store's part of a read round: its keys, and the tracker (an index
/// into [`Round::trackers`]) each one feeds, in the same order.
struct StoreRead {
    url: String,
    keys: Vec<String>,
    trackers: Vec<usize>,
}

/// The loop's state between ticks.
struct Round {
    observer: Observer,
    start: Instant,
    /// The groups as last seen.
    current: Vec<GroupSpec>,
    /// The (group, target) of each tracker, sorted, so that a group's
    /// trackers are one run.
    ids: Vec<(String, String)>,
    /// One pure tracker per (group, target), in the order of `ids`.
    trackers: Vec<Tracker>,
    /// What a read round reads, from `current`.
    plan: Vec<StoreRead>,
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
        let mut round = Round::new(self.observer.clone(), self.specs.borrow_and_update().clone());
        let mut interval = tick_of(&round.current);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                changed = self.specs.changed() => {
                    if changed.is_err() { break; }
                    round.set_specs(self.specs.borrow_and_update().clone());
                    interval = tick_of(&round.current);
                    debug!(groups = round.current.len(), "specs changed");
                    continue;
                }
                () = crate::shutdown::stopped(&mut stop) => break,
            }
            let readings = read_round(&round.plan, read_timeout(&round.current), self.stores.as_ref())
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
    fn new(observer: Observer, specs: Vec<GroupSpec>) -> Self {
        let mut round = Round {
            observer,
            start: Instant::now(),
            current: Vec::new(),
            ids: Vec::new(),
            trackers: Vec::new(),
            plan: Vec::new(),
            last_refresh: None,
            last_status: None,
        };
        round.set_specs(specs);
        round
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Takes the groups `specs` and plans reading them: one tracker per
    /// (group, target), each with its group's `down_after_ms` (trackers of
    /// targets still observed keep their state), and per store the keys
    /// to read.
    fn set_specs(&mut self, specs: Vec<GroupSpec>) {
        let now = self.now_ms();
        let mut old: BTreeMap<(String, String), Tracker> =
            std::mem::take(&mut self.ids).into_iter().zip(std::mem::take(&mut self.trackers)).collect();
        let mut wanted: BTreeMap<(String, String), (u64, &str)> = BTreeMap::new();
        for s in &specs {
            for (g, m, url) in targets(std::slice::from_ref(s), &self.observer) {
                wanted.insert((g.to_owned(), m.to_owned()), (s.policy.down_after_ms, url));
            }
        }
        let mut by_store: BTreeMap<&str, StoreRead> = BTreeMap::new();
        for (i, (key, (down_after, url))) in wanted.iter().enumerate() {
            let mut t = old.remove(key).unwrap_or_else(|| Tracker::new(*down_after, now));
            t.set_down_after(*down_after);
            self.trackers.push(t);
            let read = by_store.entry(url).or_insert_with(|| StoreRead {
                url: (*url).to_owned(),
                keys: Vec::new(),
                trackers: Vec::new(),
            });
            read.keys.push(heartbeat_key(&key.0, &key.1));
            read.trackers.push(i);
        }
        self.plan = by_store.into_values().collect();
        self.ids = wanted.into_keys().collect();
        self.current = specs;
    }

    /// Feeds one round of readings (per store of the plan, in its order) to
    /// the trackers; the groups whose observations changed state.
    fn track(&mut self, readings: Vec<Vec<Reading>>) -> BTreeSet<String> {
        let now = self.now_ms();
        let mut changed = BTreeSet::new();
        for (read, values) in self.plan.iter().zip(readings) {
            for (&i, reading) in read.trackers.iter().zip(values) {
                let t = &mut self.trackers[i];
                let Some(tr) = t.observe(now, reading) else { continue };
                let (group, target) = &self.ids[i];
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
            .map(|s| {
                let first = self.ids.partition_point(|(g, _)| *g < s.name);
                let cells = self.ids[first..]
                    .iter()
                    .zip(&self.trackers[first..])
                    .take_while(|((g, _), _)| *g == s.name)
                    .map(|((_, id), t)| observation_pb(id, &t.observation(now)))
                    .collect();
                pb::GroupView { group: s.name.clone(), cells, version: 0 }
            })
            .collect()
    }
}

/// One read of every key of `plan`: one MGET per store, all stores at once;
/// per store, its readings in the order of its keys.
async fn read_round<S: Stores>(plan: &[StoreRead], timeout: Duration, stores: &S) -> Vec<Vec<Reading>> {
    let reads = plan.iter().map(|read| async move {
        match stores.get_many(&read.url, &read.keys, timeout).await {
            Ok(values) => values
                .into_iter()
                .map(|v| match v {
                    None => Reading::Missing,
                    Some(s) => Beat::parse(&s).map_or(Reading::Garbled, Reading::Present),
                })
                .collect(),
            Err(e) => {
                debug!("unreachable: {e}");
                vec![Reading::Unreachable; read.keys.len()]
            }
        }
    });
    futures::future::join_all(reads).await
}

#[cfg(test)]
mod tests {
    //! The loop over in-memory stores, under tokio's paused clock.

    use quorate_core::group::{MemberSpec, Policy};

    use super::report::chunks;
    use super::*;
    use crate::observation::store::MemStores;
    use std::sync::Mutex;

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
            version: 0,
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
                    version: v.version,
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

    /// A leader that stores every view and renews every refresh.
    impl ReportSink for Collect {
        type Error = ClientError;
        async fn report(&self, req: pb::ReportRequest) -> Result<pb::ReportResponse, ClientError> {
            let refreshed = req.refresh.len() as u32;
            self.reports.lock().unwrap().push((Instant::now(), req));
            Ok(pb::ReportResponse { refreshed, ..Default::default() })
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
        // a stays up throughout, and its group is reported about once a
        // second: in full when something changed, else as a refresh of the
        // last view sent in full, by its token.
        let mentions =
            |r: &pb::ReportRequest| state_of(r, "g1", "a").is_some() || r.refresh.iter().any(|f| f.group == "g1");
        let a_reports: Vec<Instant> = reports.iter().filter(|(_, r)| mentions(r)).map(|(t, _)| *t).collect();
        let down = pb::ObservationState::ObservedDown as i32;
        assert!(reports.iter().all(|(_, r)| state_of(r, "g1", "a").is_none_or(|(s, _)| s != down)), "a went down");
        assert!((7..=10).contains(&a_reports.len()), "{} reports of g1 in 7 s", a_reports.len());
        for w in a_reports.windows(2) {
            assert!(w[1] - w[0] <= Duration::from_millis(1100), "refresh gap {:?}", w[1] - w[0]);
        }
        let mut last_token = 0;
        let mut refreshes = 0;
        for (_, r) in &reports {
            if let Some(v) = r.views.iter().find(|v| v.group == "g1") {
                assert_ne!(v.version, 0);
                assert_ne!(v.version, last_token, "a new token for every view sent in full");
                last_token = v.version;
            }
            for f in r.refresh.iter().filter(|f| f.group == "g1") {
                assert_eq!(f.version, last_token, "a refresh names the last view sent in full");
                assert!(r.views.is_empty() && r.status.is_none());
                refreshes += 1;
            }
        }
        assert!(refreshes >= 4, "{refreshes} refreshes of g1 in 7 s");
    }

    /// A leader that renews only some refreshes: none when `old` (a leader
    /// that predates refreshes answers 0), else all but `missed`.
    struct Renews {
        old: bool,
        missed: Vec<String>,
        reports: Mutex<Vec<pb::ReportRequest>>,
    }

    impl ReportSink for Renews {
        type Error = ClientError;
        async fn report(&self, req: pb::ReportRequest) -> Result<pb::ReportResponse, ClientError> {
            let missed: Vec<String> =
                req.refresh.iter().filter(|f| self.missed.contains(&f.group)).map(|f| f.group.clone()).collect();
            let refreshed = (req.refresh.len() - missed.len()) as u32;
            self.reports.lock().unwrap().push(req);
            let resp = pb::ReportResponse { refreshed, unrefreshed: missed, ..Default::default() };
            Ok(if self.old { pb::ReportResponse::default() } else { resp })
        }
    }

    /// Runs a loop over g1 (a, b beating) and g2 (c beating) for 3.5 s.
    async fn run_against(sink: Arc<Renews>) -> Vec<pb::ReportRequest> {
        let stores = MemStores::new();
        let far = Instant::now() + Duration::from_secs(60);
        for (g, m) in [("g1", "a"), ("g1", "b"), ("g2", "c")] {
            tokio::spawn(beat(stores.clone(), "redis://s1:1", g, m, far));
        }
        let specs =
            vec![spec("g1", &[("a", "redis://s1:1"), ("b", "redis://s1:1")]), spec("g2", &[("c", "redis://s1:1")])];
        let (_specs_tx, specs_rx) = watch::channel(specs);
        let (stop_tx, stop_rx) = watch::channel(false);
        let observe = Observe {
            observer: Observer::Coordinator(1),
            incarnation: 1,
            specs: specs_rx,
            status: None,
            stores: Arc::new(stores),
            sink: sink.clone(),
        };
        let looping = tokio::spawn(observe.run(stop_rx));
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        let _ = stop_tx.send(true);
        looping.await.unwrap();
        sink.reports.lock().unwrap().clone()
    }

    fn full_views_of(reports: &[pb::ReportRequest], group: &str) -> usize {
        reports.iter().flat_map(|r| &r.views).filter(|v| v.group == group).count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_view_the_leader_did_not_renew_is_sent_in_full_at_once() {
        let sink = Arc::new(Renews { old: false, missed: vec!["g2".into()], reports: Mutex::default() });
        let reports = run_against(sink).await;
        // g1 goes in full once, then as refreshes; g2's refreshes are
        // missed, and each miss sends it in full right after.
        assert_eq!(full_views_of(&reports, "g1"), 1);
        let g2_full = full_views_of(&reports, "g2");
        let g2_refreshes = reports.iter().flat_map(|r| &r.refresh).filter(|f| f.group == "g2").count();
        assert!(g2_refreshes >= 2 && g2_full == g2_refreshes + 1, "{g2_full} in full, {g2_refreshes} refreshes");
        for (i, r) in reports.iter().enumerate() {
            if r.refresh.iter().any(|f| f.group == "g2") {
                let next = reports.get(i + 1).expect("a missed refresh is followed by the view in full");
                assert!(next.views.iter().any(|v| v.group == "g2"));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_predates_refreshes_gets_every_view_in_full() {
        let sink = Arc::new(Renews { old: true, missed: Vec::new(), reports: Mutex::default() });
        let reports = run_against(sink).await;
        // Once a second, as before refreshes: a refresh at each interval,
        // answered with nothing, then the views in full.
        assert!(full_views_of(&reports, "g1") >= 4 && full_views_of(&reports, "g2") >= 4);
        assert_eq!(full_views_of(&reports, "g1"), full_views_of(&reports, "g2"));
    }
}

//! The reporter half of the observation loop: the queue of views waiting to
//! be reported ([`Pending`]) and the task that sends them ([`report_loop`]).
//!
//! A view whose observations (states, reasons, incarnations, restarts) are
//! the same as those of the last view of its group that got through is not
//! sent again: the reporter sends a refresh instead, the group and the token
//! that view went under (`pb::ViewRefresh`), and the leader renews the
//! stored view's time (`quorate_core::matrix::GroupState::refresh`). A
//! coordinator observing thousands of steady members so sends a few bytes
//! per group and interval instead of every member's cells. Anything else is
//! sent in full under a new token: a change (as soon as the loop sees it,
//! as before), a view the leader could not renew (it says which), and
//! everything when the member's status changed or the leader predates
//! refreshes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quorate_core::matrix::Observer;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::ReportSink;
use crate::pb::v1 as pb;
use crate::wire::MAX_VIEWS_PER_REPORT;

/// The most protobuf-encoded view bytes in one report. Reports are stored
/// as JSON, a few times larger, and must fit a log entry
/// ([`crate::raft::MAX_ENTRY_BYTES`]); the leader packs small reports into
/// one entry anyway.
pub const REPORT_CHUNK_BYTES: usize = 64 << 10;

/// Splits `items` into runs of at most [`REPORT_CHUNK_BYTES`] (by `size`)
/// and [`MAX_VIEWS_PER_REPORT`] items (a single larger item goes alone).
fn chunks_by<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0usize;
    for item in items {
        let n = size(&item);
        match out.last_mut() {
            Some(last) if bytes + n <= REPORT_CHUNK_BYTES && last.len() < MAX_VIEWS_PER_REPORT => {
                bytes += n;
                last.push(item);
            }
            _ => {
                bytes = n;
                out.push(vec![item]);
            }
        }
    }
    out
}

/// Splits `views` into reports of bounded size, in order.
pub(super) fn chunks(views: Vec<pb::GroupView>) -> Vec<Vec<pb::GroupView>> {
    chunks_by(views, prost::Message::encoded_len)
}

/// Views waiting to be reported: the latest per group.
#[derive(Default)]
pub(super) struct Pending {
    views: Mutex<BTreeMap<String, pb::GroupView>>,
    pub(super) notify: Notify,
}

impl Pending {
    pub(super) fn put(&self, views: Vec<pb::GroupView>) {
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

    /// Puts back views that did not get through, unless newer ones
    /// replaced them.
    fn put_back(&self, views: impl IntoIterator<Item = pb::GroupView>) {
        let mut p = self.views.lock().unwrap_or_else(|e| e.into_inner());
        for v in views {
            p.entry(v.group.clone()).or_insert(v);
        }
    }
}

/// Do `a` and `b` say the same of the same targets? Ages and sequence
/// numbers move on every read and are not compared: a refreshed view keeps
/// the older ones, which claims less, never more.
fn same_observations(a: &pb::GroupView, b: &pb::GroupView) -> bool {
    a.cells.len() == b.cells.len()
        && a.cells.iter().zip(&b.cells).all(|(x, y)| {
            x.target == y.target
                && x.state == y.state
                && x.reason_code == y.reason_code
                && x.reason == y.reason
                && x.incarnation == y.incarnation
                && x.restarts == y.restarts
        })
}

/// What got through: per group, the token and the view last stored, and
/// the member status sent with views.
struct Sent {
    views: HashMap<String, (u64, pb::GroupView)>,
    status: Option<pb::MemberStatus>,
    next_version: u64,
}

/// One round's reports: views to send in full (each with its new token),
/// and refreshes with the full view to fall back on.
struct Outgoing {
    full: Vec<pb::GroupView>,
    refresh: Vec<(pb::ViewRefresh, pb::GroupView)>,
}

impl Sent {
    fn new() -> Self {
        // Tokens start at a random point, so that a token of an earlier
        // run of this loop under the same incarnation cannot be mistaken
        // for one of this run; never 0 (no token).
        Self { views: HashMap::new(), status: None, next_version: (rand::random::<u64>() >> 1) | 1 }
    }

    /// Splits `views`: those the leader holds unchanged become refreshes,
    /// unless the status to send differs from the one it holds.
    fn split(&mut self, views: Vec<pb::GroupView>, status: &Option<pb::MemberStatus>) -> Outgoing {
        let mut out = Outgoing { full: Vec::new(), refresh: Vec::new() };
        for mut view in views {
            let stored =
                self.views.get(&view.group).filter(|(_, v)| *status == self.status && same_observations(v, &view));
            match stored {
                Some((version, _)) => {
                    out.refresh.push((pb::ViewRefresh { group: view.group.clone(), version: *version }, view));
                }
                None => {
                    view.version = self.next_version;
                    self.next_version = self.next_version.wrapping_add(1).max(1);
                    out.full.push(view);
                }
            }
        }
        out
    }
}

/// A report of `views` in full.
fn full_request(
    observer: &Observer,
    incarnation: u64,
    views: Vec<pb::GroupView>,
    status: Option<pb::MemberStatus>,
) -> pb::ReportRequest {
    pb::ReportRequest {
        observer: observer.to_string(),
        observer_incarnation: incarnation,
        views,
        status,
        refresh: Vec::new(),
    }
}

/// What one request was, to settle its outcome.
enum Sending {
    Full(Vec<pb::GroupView>),
    Refresh(Vec<pb::GroupView>),
}

/// Sends every queued view, in reports of bounded size sent together, until
/// they get through; then waits for more. A failed report is retried
/// shortly, merged with newer views.
pub(super) async fn report_loop<R: ReportSink>(
    observer: Observer,
    incarnation: u64,
    sink: Arc<R>,
    pending: Arc<Pending>,
    status: Option<watch::Receiver<pb::MemberStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    let mut sent = Sent::new();
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
        let failed = send_round(&observer, incarnation, sink.as_ref(), &pending, &mut sent, views, &status).await;
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

/// Sends one round of `views` (full and refreshes, all requests together)
/// and settles each outcome; the last error, if any request failed.
async fn send_round<R: ReportSink>(
    observer: &Observer,
    incarnation: u64,
    sink: &R,
    pending: &Pending,
    sent: &mut Sent,
    views: Vec<pb::GroupView>,
    status: &Option<pb::MemberStatus>,
) -> Option<R::Error> {
    let Outgoing { full, refresh } = sent.split(views, status);
    let mut requests: Vec<(pb::ReportRequest, Sending)> = chunks(full)
        .into_iter()
        .map(|views| (full_request(observer, incarnation, views.clone(), status.clone()), Sending::Full(views)))
        .collect();
    for part in chunks_by(refresh, |(r, _)| r.group.len() + 8) {
        let (refresh, fallback): (Vec<_>, Vec<_>) = part.into_iter().unzip();
        let mut req = full_request(observer, incarnation, Vec::new(), None);
        req.refresh = refresh;
        requests.push((req, Sending::Refresh(fallback)));
    }
    let sends = requests.into_iter().map(|(req, what)| async move { (sink.report(req).await, what) });
    let mut failed = None;
    for (res, what) in futures::future::join_all(sends).await {
        match (res, what) {
            (Ok(_), Sending::Full(views)) => {
                sent.status.clone_from(status);
                sent.views.extend(views.into_iter().map(|v| (v.group.clone(), (v.version, v))));
            }
            (Ok(resp), Sending::Refresh(fallback)) => {
                let again = unrefreshed(&resp, fallback);
                if !again.is_empty() {
                    for v in &again {
                        sent.views.remove(&v.group);
                    }
                    pending.put_back(again);
                    pending.notify.notify_one();
                }
            }
            (Err(e), Sending::Full(views) | Sending::Refresh(views)) => {
                pending.put_back(views);
                failed = Some(e);
            }
        }
    }
    failed
}

/// The views of a refresh the leader did not renew: those it names, or all
/// of them when its answer does not account for each (a leader that
/// predates refreshes ignores them and answers 0).
fn unrefreshed(resp: &pb::ReportResponse, fallback: Vec<pb::GroupView>) -> Vec<pb::GroupView> {
    let accounted = resp.refreshed as usize + resp.unrefreshed.len() == fallback.len();
    if !accounted {
        return fallback;
    }
    let missed: HashSet<&str> = resp.unrefreshed.iter().map(String::as_str).collect();
    fallback.into_iter().filter(|v| missed.contains(v.group.as_str())).collect()
}

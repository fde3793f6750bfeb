//! Checkers: each a pure function of a history (the deadline-fence check:
//! of the agents' log lines, parsed by a pure function too).
//!
//! Conventions the workloads and the harness follow (all times are host
//! monotonic nanoseconds, see [`crate::history`]):
//!
//! | f | type | value |
//! | --- | --- | --- |
//! | `acquire` | ok | `{group, holder, epoch}` when a client learned it holds the lease |
//! | `hold` | ok | `{group, holder, epoch, start, end}`: the interval the client acted as holder |
//! | `register-write` | ok / fail | `{epoch, invoked}`: accepted / refused by the fenced register |
//! | `get-lease` | ok | `{group, holder, epoch, invoked}` |
//! | `pair-write` | ok | `{member, epoch, key, acked, invoked}` (acked: `WAIT 1` >= 1) |
//! | `plain-write` | ok / fail / info | `{member, key, seq, invoked}`: a plain `SET` on that member's data Redis answered OK / refused (error reply, or never sent) / unknown (timeout, connection lost) |
//! | `final-read` | ok | `{member, present: [keys]}` read on the final primary after healing |
//! | `final-read-plain` | ok | `{member, present: [keys]}`: the acknowledged plain writes found there |
//! | `final-state` | ok | `{holder, epoch, nodes: [{node, holder, epoch}], masters: [member]}` |
//! | nemesis `kill` | info | `{target, primary: bool, member}` (`member`: a member host was killed) |
//! | nemesis `pause` / `resume` | info | `{target}` (`m1-agent`: that member's agent) |
//! | nemesis `partition` | info | `{grudge: {host: [hosts it drops packets from]}}`, until the next `partition` or `heal` |
//! | nemesis `heal` | info | `{restarted, resumed}`: every fault ends |
//!
//! Ops are completions: `t` is when the client learned the outcome, and
//! `invoked` (where present) when it sent the request.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{Op, OpType};

/// A checker's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    Pass,
    Fail(String),
    /// A violation the suite measures but does not fail, because it is a
    /// documented limit (a frozen agent cannot fence; asynchronous
    /// replication loses what a killed primary had not sent). The message
    /// says what was measured and which limit explains it.
    Documented(String),
    /// The history has nothing this checker can judge.
    NotApplicable,
}

impl CheckResult {
    pub fn is_fail(&self) -> bool {
        matches!(self, CheckResult::Fail(_))
    }

    /// "pass", "fail: ...", "documented: ...", "n/a".
    pub fn label(&self) -> String {
        match self {
            CheckResult::Pass => "pass".into(),
            CheckResult::Fail(why) => format!("fail: {why}"),
            CheckResult::Documented(what) => format!("documented: {what}"),
            CheckResult::NotApplicable => "n/a".into(),
        }
    }
}

fn oks<'a>(ops: &'a [Op], f: &'a str) -> impl Iterator<Item = &'a Op> + 'a {
    ops.iter().filter(move |o| o.kind == OpType::Ok && o.f == f)
}

/// No two different holders act as holder at the same moment.
pub fn no_overlapping_leases(ops: &[Op]) -> CheckResult {
    let mut holds: Vec<(u64, u64, String, u64, String)> = oks(ops, "hold")
        .filter_map(|o| {
            Some((
                o.u64("start")?,
                o.u64("end")?,
                o.str("holder")?.to_owned(),
                o.u64("epoch")?,
                o.str("group")?.to_owned(),
            ))
        })
        .collect();
    if holds.is_empty() {
        return CheckResult::NotApplicable;
    }
    holds.sort();
    // Per group: the interval reaching furthest so far.
    let mut furthest: BTreeMap<String, (u64, String, u64)> = BTreeMap::new();
    for (start, end, holder, epoch, group) in holds {
        if let Some((f_end, f_holder, f_epoch)) = furthest.get(&group)
            && start < *f_end
            && *f_holder != holder
        {
            return CheckResult::Fail(format!(
                "{holder} (epoch {epoch}) started holding {group} {:.1} ms before {f_holder} (epoch {f_epoch}) stopped",
                (*f_end - start) as f64 / 1e6
            ));
        }
        if furthest.get(&group).is_none_or(|(f_end, _, _)| end > *f_end) {
            furthest.insert(group, (end, holder, epoch));
        }
    }
    CheckResult::Pass
}

/// Epochs are unique (one holder each) and increase in the order grants
/// were observed.
pub fn epochs_unique_and_increasing(ops: &[Op]) -> CheckResult {
    let mut by_group: BTreeMap<String, Vec<(u64, u64, String)>> = BTreeMap::new();
    for o in oks(ops, "acquire") {
        if let (Some(g), Some(e), Some(h)) = (o.str("group"), o.u64("epoch"), o.str("holder")) {
            by_group.entry(g.to_owned()).or_default().push((o.t, e, h.to_owned()));
        }
    }
    if by_group.is_empty() {
        return CheckResult::NotApplicable;
    }
    for (group, mut grants) in by_group {
        grants.sort();
        let mut owner: BTreeMap<u64, String> = BTreeMap::new();
        let mut last: Option<u64> = None;
        for (_, epoch, holder) in grants {
            if let Some(prev) = owner.insert(epoch, holder.clone())
                && prev != holder
            {
                return CheckResult::Fail(format!("{group}: epoch {epoch} granted to both {prev} and {holder}"));
            }
            if let Some(l) = last
                && epoch <= l
            {
                return CheckResult::Fail(format!("{group}: epoch {epoch} granted after epoch {l}"));
            }
            last = Some(epoch);
        }
    }
    CheckResult::Pass
}

/// The fenced register accepts only the newest epoch: a write invoked after
/// another was accepted never succeeds with an older epoch.
pub fn fenced_register_accepts_only_newest(ops: &[Op]) -> CheckResult {
    let accepted: Vec<(u64, u64, u64)> =
        oks(ops, "register-write").filter_map(|o| Some((o.u64("invoked")?, o.t, o.u64("epoch")?))).collect();
    if accepted.is_empty() {
        return CheckResult::NotApplicable;
    }
    real_time_monotonic(&accepted, "register write")
}

/// Given (invoked, completed, epoch) ops: for A completed before B was
/// invoked, B's epoch must be >= A's.
fn real_time_monotonic(ops: &[(u64, u64, u64)], what: &str) -> CheckResult {
    real_time_monotonic_after(ops, &[], what)
}

/// As [`real_time_monotonic`], where `writes` (completion time, epoch) are
/// also operations every later-invoked one in `ops` must see: a read invoked
/// after a client learned it was granted epoch `e` returns `e` or newer.
fn real_time_monotonic_after(ops: &[(u64, u64, u64)], writes: &[(u64, u64)], what: &str) -> CheckResult {
    let mut by_completion: Vec<(u64, u64)> = ops.iter().map(|(_, done, e)| (*done, *e)).collect();
    by_completion.extend_from_slice(writes);
    by_completion.sort();
    let mut by_invoke: Vec<(u64, u64, u64)> = ops.to_vec();
    by_invoke.sort();
    let mut i = 0;
    let mut max_done: Option<(u64, u64)> = None;
    for (invoked, _, epoch) in by_invoke {
        while i < by_completion.len() && by_completion[i].0 < invoked {
            let (t, e) = by_completion[i];
            if max_done.is_none_or(|(_, m)| e > m) {
                max_done = Some((t, e));
            }
            i += 1;
        }
        if let Some((_, m)) = max_done
            && epoch < m
        {
            return CheckResult::Fail(format!(
                "a {what} with epoch {epoch} succeeded after one with epoch {m} had completed"
            ));
        }
    }
    CheckResult::Pass
}

/// Epochs seen by clients never go backwards between non-overlapping
/// queries, and a read invoked after a grant was acknowledged (`acquire`)
/// sees that grant's epoch or a newer one: linearizable reads, checked
/// against both other reads and writes.
pub fn client_epochs_monotonic(ops: &[Op]) -> CheckResult {
    let mut by_group: BTreeMap<String, Vec<(u64, u64, u64)>> = BTreeMap::new();
    for o in oks(ops, "get-lease") {
        if let (Some(g), Some(inv), Some(e)) = (o.str("group"), o.u64("invoked"), o.u64("epoch")) {
            by_group.entry(g.to_owned()).or_default().push((inv, o.t, e));
        }
    }
    if by_group.is_empty() {
        return CheckResult::NotApplicable;
    }
    let mut grants: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for o in oks(ops, "acquire") {
        if let (Some(g), Some(e)) = (o.str("group"), o.u64("epoch")) {
            grants.entry(g.to_owned()).or_default().push((o.t, e));
        }
    }
    for (group, reads) in by_group {
        let writes = grants.get(&group).map_or(&[][..], Vec::as_slice);
        if let CheckResult::Fail(why) = real_time_monotonic_after(&reads, writes, &format!("{group} lease read")) {
            return CheckResult::Fail(why);
        }
    }
    CheckResult::Pass
}

/// Every write acknowledged by a replica is on the final primary.
pub fn no_acked_write_lost(ops: &[Op]) -> CheckResult {
    let acked: BTreeSet<String> = oks(ops, "pair-write")
        .filter(|o| o.value.get("acked").and_then(serde_json::Value::as_bool) == Some(true))
        .filter_map(|o| o.str("key").map(str::to_owned))
        .collect();
    let Some(final_read) = oks(ops, "final-read").last() else {
        return if acked.is_empty() { CheckResult::NotApplicable } else { CheckResult::Fail("no final read".into()) };
    };
    if acked.is_empty() {
        return CheckResult::NotApplicable;
    }
    let present: BTreeSet<String> = final_read
        .value
        .get("present")
        .and_then(serde_json::Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let lost: Vec<&String> = acked.difference(&present).collect();
    if lost.is_empty() {
        CheckResult::Pass
    } else {
        CheckResult::Fail(format!(
            "{} of {} acknowledged writes lost, e.g. {:?}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(3)]
        ))
    }
}

/// After each kill of the primary: how long until a write succeeded on a
/// new primary (ms), and whether that is within `bound_ms`.
pub fn failover_times(ops: &[Op], bound_ms: u64) -> (CheckResult, Vec<u64>) {
    let kills: Vec<(u64, String)> = ops
        .iter()
        .filter(|o| {
            o.process == "nemesis" && o.f == "kill" && o.value.get("primary").and_then(|v| v.as_bool()) == Some(true)
        })
        .filter_map(|o| Some((o.t, o.str("member")?.to_owned())))
        .collect();
    if kills.is_empty() {
        return (CheckResult::NotApplicable, Vec::new());
    }
    let mut times = Vec::new();
    for (t_kill, member) in &kills {
        let first = oks(ops, "pair-write").find(|o| o.t > *t_kill && o.str("member").is_some_and(|m| m != member));
        match first {
            Some(o) => times.push((o.t - t_kill) / 1_000_000),
            None => return (CheckResult::Fail(format!("no write on a new primary after {member} was killed")), times),
        }
    }
    match times.iter().find(|t| **t > bound_ms) {
        Some(t) => (CheckResult::Fail(format!("a failover took {t} ms (bound {bound_ms} ms)")), times),
        None => (CheckResult::Pass, times),
    }
}

/// The primary member never changed (for faults a quorum sees through).
pub fn no_failover(ops: &[Op]) -> CheckResult {
    let mut members = oks(ops, "pair-write").filter_map(|o| o.str("member"));
    let Some(first) = members.next() else { return CheckResult::NotApplicable };
    match members.find(|m| *m != first) {
        Some(other) => CheckResult::Fail(format!("the primary moved from {first} to {other}")),
        None => CheckResult::Pass,
    }
}

/// A coordinator whose data was wiped while it was down is caught up
/// within `bound_ms` of its restart, and none of the stale reads it
/// answered before showed the pair's lease at an older epoch than the
/// cluster had when it restarted (the nemesis records `restart-wiped`,
/// then `caught-up` or `not-caught-up`, with what it read).
pub fn wiped_node_catches_up(ops: &[Op], bound_ms: u64) -> CheckResult {
    if !ops.iter().any(|o| o.f == "restart-wiped") {
        return CheckResult::NotApplicable;
    }
    let Some(done) = ops.iter().find(|o| o.f == "caught-up" || o.f == "not-caught-up") else {
        return CheckResult::Fail("no outcome recorded for the wiped node".into());
    };
    let older = done.u64("older_reads").unwrap_or(0);
    if older > 0 {
        return CheckResult::Fail(format!(
            "the wiped node answered {older} stale reads older than the cluster's state at its restart"
        ));
    }
    let ms = done.u64("ms").unwrap_or(u64::MAX);
    match (done.f.as_str(), ms <= bound_ms) {
        ("caught-up", true) => CheckResult::Pass,
        ("caught-up", false) => CheckResult::Fail(format!("caught up in {ms} ms, over the {bound_ms} ms bound")),
        _ => CheckResult::Fail(format!("not caught up within {ms} ms")),
    }
}

/// After healing: one Redis master, the lease holder, and every
/// coordinator agrees on holder and epoch.
pub fn single_primary_after_heal(ops: &[Op]) -> CheckResult {
    let Some(fin) = oks(ops, "final-state").last() else { return CheckResult::NotApplicable };
    let holder = fin.str("holder").unwrap_or_default();
    let epoch = fin.u64("epoch").unwrap_or(0);
    let masters: Vec<&str> = fin
        .value
        .get("masters")
        .and_then(serde_json::Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if masters != [holder] {
        return CheckResult::Fail(format!("Redis masters {masters:?}, lease holder {holder:?}"));
    }
    let nodes = fin.value.get("nodes").and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
    for n in &nodes {
        let (h, e) = (n.get("holder").and_then(|v| v.as_str()), n.get("epoch").and_then(|v| v.as_u64()));
        if h != Some(holder) || e != Some(epoch) {
            return CheckResult::Fail(format!(
                "node {} says {h:?} at {e:?}, not {holder} at {epoch}",
                n.get("node").unwrap_or(&serde_json::Value::Null)
            ));
        }
    }
    if nodes.is_empty() {
        return CheckResult::Fail("no coordinator answered after healing".into());
    }
    CheckResult::Pass
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// What the nemesis did and when, as the plain-write checkers need it.
#[derive(Debug, Default)]
struct Timeline {
    /// The first nemesis event: the fault's start.
    start: Option<u64>,
    /// Member -> intervals during which its agent was stopped (SIGSTOP).
    paused: BTreeMap<String, Vec<(u64, u64)>>,
    /// (member, time) of every kill -9 of a member host.
    kills: Vec<(String, u64)>,
    /// (from, until, grudge) of every partition.
    grudges: Vec<(u64, u64, BTreeMap<String, BTreeSet<String>>)>,
}

impl Timeline {
    fn of(ops: &[Op]) -> Self {
        let mut tl = Timeline::default();
        let mut paused_since: BTreeMap<String, u64> = BTreeMap::new();
        let mut grudge: Option<(u64, BTreeMap<String, BTreeSet<String>>)> = None;
        let agent = |target: &str| target.strip_suffix("-agent").map(str::to_owned);
        let resume = |tl: &mut Timeline, target: &str, t: u64, since: &mut BTreeMap<String, u64>| {
            if let Some(m) = agent(target)
                && let Some(from) = since.remove(&m)
            {
                tl.paused.entry(m).or_default().push((from, t));
            }
        };
        for o in ops.iter().filter(|o| o.process == "nemesis") {
            tl.start.get_or_insert(o.t);
            match o.f.as_str() {
                "pause" => {
                    if let Some(m) = o.str("target").and_then(agent) {
                        paused_since.entry(m).or_insert(o.t);
                    }
                }
                "resume" => {
                    if let Some(target) = o.str("target") {
                        resume(&mut tl, target, o.t, &mut paused_since);
                    }
                }
                "kill" => {
                    if let Some(m) = o.str("member") {
                        tl.kills.push((m.to_owned(), o.t));
                    }
                }
                "partition" => {
                    if let Some((from, g)) = grudge.take() {
                        tl.grudges.push((from, o.t, g));
                    }
                    let g: BTreeMap<String, BTreeSet<String>> = o
                        .value
                        .get("grudge")
                        .and_then(serde_json::Value::as_object)
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| {
                                    let srcs = v
                                        .as_array()
                                        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect());
                                    (k.clone(), srcs.unwrap_or_default())
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    grudge = Some((o.t, g));
                }
                // Random loss replaces any partition (see `Net::loss`).
                "loss" => {
                    if let Some((from, g)) = grudge.take() {
                        tl.grudges.push((from, o.t, g));
                    }
                }
                "heal" => {
                    if let Some((from, g)) = grudge.take() {
                        tl.grudges.push((from, o.t, g));
                    }
                    for target in o.value.get("resumed").and_then(serde_json::Value::as_array).into_iter().flatten() {
                        if let Some(target) = target.as_str() {
                            resume(&mut tl, target, o.t, &mut paused_since);
                        }
                    }
                }
                _ => {}
            }
        }
        // Never ended: until the end of the history.
        for (m, from) in paused_since {
            tl.paused.entry(m).or_default().push((from, u64::MAX));
        }
        if let Some((from, g)) = grudge {
            tl.grudges.push((from, u64::MAX, g));
        }
        tl
    }

    /// Whether `member`'s agent was stopped at some moment of [from, to].
    fn agent_paused_during(&self, member: &str, from: u64, to: u64) -> bool {
        self.paused.get(member).into_iter().flatten().any(|(a, b)| *a <= to && from <= *b)
    }

    /// Whether, at `t`, no other member could hear `member` (a partition
    /// cut the link from `member` to each of them, in either direction:
    /// replication is TCP, which needs both).
    fn replicas_cut_off(&self, member: &str, others: &BTreeSet<String>, t: u64) -> bool {
        let cut = |g: &BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
            g.get(a).is_some_and(|s| s.contains(b)) || g.get(b).is_some_and(|s| s.contains(a))
        };
        !others.is_empty()
            && self
                .grudges
                .iter()
                .any(|(from, until, g)| *from <= t && t < *until && others.iter().all(|o| cut(g, member, o)))
    }

    /// "+3.2 s" after the fault started (or after the history's start).
    fn at(&self, ops: &[Op], t: u64) -> String {
        let zero = self.start.or_else(|| ops.first().map(|o| o.t)).unwrap_or(0);
        if t >= zero { format!("+{:.1} s", ms(t - zero) / 1e3) } else { format!("-{:.1} s", ms(zero - t) / 1e3) }
    }
}

/// One plain-write attempt, in the history's terms.
#[derive(Debug, Clone)]
struct PlainWrite {
    member: String,
    key: String,
    invoked: u64,
    done: u64,
    ok: bool,
}

fn plain_writes(ops: &[Op]) -> Vec<PlainWrite> {
    let mut writes: Vec<PlainWrite> = ops
        .iter()
        .filter(|o| o.f == "plain-write" && o.kind != OpType::Invoke)
        .filter_map(|o| {
            Some(PlainWrite {
                member: o.str("member")?.to_owned(),
                key: o.str("key").unwrap_or_default().to_owned(),
                invoked: o.u64("invoked").unwrap_or(o.t),
                done: o.t,
                ok: o.kind == OpType::Ok,
            })
        })
        .collect();
    // Each member's writer is sequential: invocation order is its order.
    writes.sort_by(|a, b| (&a.member, a.invoked, a.done).cmp(&(&b.member, b.invoked, b.done)));
    writes
}

/// A run: consecutive accepted plain writes on one member, no other outcome
/// between them. The node accepted a write no later than the first answer
/// and one no earlier than the last request, so it was accepting at both
/// ends of [first completion, last invocation]; with no refusal or timeout
/// between writes 10 ms apart, it is taken to have accepted all along.
#[derive(Debug, Clone)]
struct PlainRun {
    member: String,
    /// The first write's completion.
    from: u64,
    /// The last write's invocation.
    to: u64,
    /// The first and last write's completion (for attributing writes).
    first_done: u64,
    last_done: u64,
}

fn plain_runs(writes: &[PlainWrite]) -> Vec<PlainRun> {
    let mut runs = Vec::new();
    let mut current: Option<PlainRun> = None;
    let mut member: Option<&str> = None;
    for w in writes {
        if member != Some(w.member.as_str()) {
            runs.extend(current.take());
            member = Some(&w.member);
        }
        match (&mut current, w.ok) {
            (Some(r), true) => {
                r.to = w.invoked;
                r.last_done = w.done;
            }
            (None, true) => {
                current = Some(PlainRun {
                    member: w.member.clone(),
                    from: w.done,
                    to: w.invoked,
                    first_done: w.done,
                    last_done: w.done,
                });
            }
            (_, false) => runs.extend(current.take()),
        }
    }
    runs.extend(current);
    runs
}

/// A moment at which two nodes both accepted plain writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DualPrimaryWindow {
    pub start: u64,
    pub end: u64,
    pub members: BTreeSet<String>,
    /// Why this is a documented limit rather than a failure, if it is.
    pub documented: Option<String>,
}

impl DualPrimaryWindow {
    pub fn ms(&self) -> f64 {
        ms(self.end - self.start)
    }
}

/// No two nodes of the group accept plain writes at the same moment.
///
/// Per member, the runs of consecutive `ok` plain writes (any other outcome
/// on that member ends a run); a run spans [its first write's completion,
/// its last write's invocation], where the node accepted writes (see
/// [`PlainRun`]); a run of one write spans nothing.
/// Two runs on different members that overlap mean two primaries accepted
/// writes at once; the overlaps (merged where they touch) are the dual-primary
/// windows, returned whatever the verdict so the report can show them.
///
/// The documented limit: a frozen agent cannot fence (SIGSTOP of the
/// primary's agent; its Redis accepts plain writes until the agent runs
/// again and fences). A window in which one of the runs was in progress
/// while its own member's agent was stopped is reported as documented, not
/// failed. Any other window fails.
pub fn no_dual_primary_plain(ops: &[Op]) -> (CheckResult, Vec<DualPrimaryWindow>) {
    let writes = plain_writes(ops);
    if !writes.iter().any(|w| w.ok) {
        return (CheckResult::NotApplicable, Vec::new());
    }
    let tl = Timeline::of(ops);
    let runs = plain_runs(&writes);
    let frozen = |r: &PlainRun| tl.agent_paused_during(&r.member, r.first_done, r.last_done);
    let mut overlaps: Vec<DualPrimaryWindow> = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for b in runs.iter().skip(i + 1).filter(|b| b.member != a.member) {
            let (start, end) = (a.from.max(b.from), a.to.min(b.to));
            if end > start {
                let documented = [a, b]
                    .into_iter()
                    .find(|r| frozen(r))
                    .map(|r| format!("frozen agent: {}'s agent was stopped and could not fence", r.member));
                overlaps.push(DualPrimaryWindow {
                    start,
                    end,
                    members: BTreeSet::from([a.member.clone(), b.member.clone()]),
                    documented,
                });
            }
        }
    }
    overlaps.sort_by_key(|w| w.start);
    // Merge overlapping windows: one moment is counted once. A merged
    // window is documented only if all of its parts are.
    let mut windows: Vec<DualPrimaryWindow> = Vec::new();
    for w in overlaps {
        match windows.last_mut() {
            Some(last) if w.start <= last.end => {
                last.end = last.end.max(w.end);
                last.members.extend(w.members);
                if w.documented.is_none() {
                    last.documented = None;
                }
            }
            _ => windows.push(w),
        }
    }
    let longest = |ws: &[&DualPrimaryWindow]| ws.iter().max_by_key(|w| w.end - w.start).map(|w| (*w).clone());
    let failing: Vec<&DualPrimaryWindow> = windows.iter().filter(|w| w.documented.is_none()).collect();
    let documented: Vec<&DualPrimaryWindow> = windows.iter().filter(|w| w.documented.is_some()).collect();
    let describe = |w: &DualPrimaryWindow, n: usize| {
        let members: Vec<&str> = w.members.iter().map(String::as_str).collect();
        format!(
            "{} both accepted plain writes for {:.1} ms from {}{}",
            members.join(" and "),
            w.ms(),
            tl.at(ops, w.start),
            if n > 1 { format!(" (longest of {n} windows)") } else { String::new() }
        )
    };
    let result = if let Some(w) = longest(&failing) {
        CheckResult::Fail(describe(&w, failing.len()))
    } else if let Some(w) = longest(&documented) {
        CheckResult::Documented(format!(
            "window {:.0} ms ({}); {}",
            w.ms(),
            w.documented.clone().unwrap_or_default(),
            describe(&w, documented.len())
        ))
    } else {
        CheckResult::Pass
    };
    (result, windows)
}

/// Counts of the acknowledged plain writes the final primary lacks.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PlainLoss {
    pub acked: usize,
    pub lost: usize,
    /// Lost writes a documented limit explains, by limit.
    pub explained: BTreeMap<String, usize>,
}

/// Why an asynchronously replicated write may be lost without a bug.
const LOST_TO_KILL: &str = "acknowledged just before a kill -9 of their node (asynchronous replication)";
const LOST_TO_CUT: &str = "acknowledged while no replica could hear their node (asynchronous replication)";
const LOST_TO_FROZEN: &str = "acknowledged while their node's agent was stopped (frozen agent)";

/// Every acknowledged (`ok`) plain write is on the final primary, unless a
/// documented limit explains its loss.
///
/// Only a primary (a Redis master) acknowledges a plain write, and it does
/// so before replicating it. So, per lost write on member X acknowledged at
/// `t`, these losses are expected and reported as documented, not failed:
///
/// - **kill**: X's host was killed (-9) after `t`, and every write X
///   acknowledged after this one and before that kill (since its previous
///   kill) is lost too. Redis
///   replicates in order, so a kill loses exactly a suffix of what the node
///   acknowledged (what it had not yet sent); a lost write followed by a
///   surviving later write of the same node is not explained by the kill.
///   No time bound is assumed: how long the suffix is depends on the
///   replica's lag, which quorate bounds only by `max_lag_bytes`.
/// - **cut off**: at `t` a partition cut X from every other member (in
///   either direction). What X acknowledged then could not be replicated,
///   and is gone if another member was promoted before healing.
/// - **frozen agent**: the write belongs to a run of X's accepted writes
///   during which X's agent was stopped (it cannot fence, so X acknowledged
///   writes that the promoted member never received).
///
/// Any other lost write fails the check. In particular a data Redis that
/// restarts empty comes up as a master and acknowledges writes until its
/// agent makes it a replica; the resync then drops them. That is after the
/// kill, not before it, so no rule above covers it.
pub fn no_acked_plain_write_lost(ops: &[Op]) -> (CheckResult, Option<PlainLoss>) {
    let writes = plain_writes(ops);
    let acked: Vec<&PlainWrite> = writes.iter().filter(|w| w.ok).collect();
    if acked.is_empty() {
        return (CheckResult::NotApplicable, None);
    }
    let Some(fin) = oks(ops, "final-read-plain").last() else {
        return (CheckResult::Fail("no final read of the plain writes".into()), None);
    };
    let present: BTreeSet<&str> = fin
        .value
        .get("present")
        .and_then(serde_json::Value::as_array)
        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    let tl = Timeline::of(ops);
    let members: BTreeSet<String> = writes.iter().map(|w| w.member.clone()).collect();
    let runs = plain_runs(&writes);
    let lost = |w: &PlainWrite| !present.contains(w.key.as_str());

    // Writes a kill explains: per kill of X, the trailing lost writes among
    // those X acknowledged since its previous kill.
    let mut killed: BTreeSet<&str> = BTreeSet::new();
    for (member, k) in &tl.kills {
        let since = tl.kills.iter().filter(|(m, t)| m == member && t < k).map(|(_, t)| *t).max().unwrap_or(0);
        let before: Vec<&&PlainWrite> =
            acked.iter().filter(|w| w.member == *member && w.done > since && w.done < *k).collect();
        for w in before.iter().rev().take_while(|w| lost(w)) {
            killed.insert(w.key.as_str());
        }
    }
    let mut loss = PlainLoss { acked: acked.len(), ..PlainLoss::default() };
    let mut unexplained: Vec<&PlainWrite> = Vec::new();
    for w in acked.iter().filter(|w| lost(w)) {
        loss.lost += 1;
        let others: BTreeSet<String> = members.iter().filter(|m| **m != w.member).cloned().collect();
        let frozen = runs.iter().any(|r| {
            r.member == w.member
                && r.first_done <= w.done
                && w.done <= r.last_done
                && tl.agent_paused_during(&r.member, r.first_done, r.last_done)
        });
        let why = if frozen {
            LOST_TO_FROZEN
        } else if killed.contains(w.key.as_str()) {
            LOST_TO_KILL
        } else if tl.replicas_cut_off(&w.member, &others, w.done) {
            LOST_TO_CUT
        } else {
            unexplained.push(w);
            continue;
        };
        *loss.explained.entry(why.to_owned()).or_default() += 1;
    }
    let explained = || loss.explained.iter().map(|(why, n)| format!("{n} {why}")).collect::<Vec<_>>().join("; ");
    let result = if !unexplained.is_empty() {
        let first = unexplained[0];
        CheckResult::Fail(format!(
            "{} of {} acknowledged plain writes lost with no documented cause, e.g. {} on {} at {}{}",
            unexplained.len(),
            loss.acked,
            first.key,
            first.member,
            tl.at(ops, first.done),
            if loss.explained.is_empty() { String::new() } else { format!(" (besides {})", explained()) }
        ))
    } else if loss.lost > 0 {
        CheckResult::Documented(format!(
            "{} of {} acknowledged plain writes lost: {}",
            loss.lost,
            loss.acked,
            explained()
        ))
    } else {
        CheckResult::Pass
    };
    (result, Some(loss))
}

/// The longest stretch without an accepted plain write on any node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WriteGap {
    pub start: u64,
    pub end: u64,
}

impl WriteGap {
    pub fn ms(&self) -> f64 {
        ms(self.end - self.start)
    }
}

/// The longest stretch without an accepted plain write on any node, within
/// [the first nemesis event, the last plain-write outcome]: from the
/// fault's start to the end of the workload, which is the end of the settle
/// period, so a disruption caused by healing counts too. Acceptances are
/// taken at their completion (when the client learned of them); a window
/// starting or ending without one counts from its edge. None when there is
/// no plain write in the window.
pub fn longest_write_gap(ops: &[Op]) -> Option<WriteGap> {
    let writes = plain_writes(ops);
    let tl = Timeline::of(ops);
    let start = tl.start.or_else(|| writes.iter().map(|w| w.done).min())?;
    let end = writes.iter().map(|w| w.done).max()?;
    if end <= start {
        return None;
    }
    let mut accepted: Vec<u64> = writes.iter().filter(|w| w.ok && w.done >= start).map(|w| w.done).collect();
    accepted.sort_unstable();
    let mut edges = vec![start];
    edges.extend(accepted);
    edges.push(end);
    edges.windows(2).map(|p| WriteGap { start: p[0], end: p[1] }).max_by_key(|g| g.end - g.start)
}

/// Writes stay available: the longest write gap (see [`longest_write_gap`])
/// is at most `bound_ms`. For faults a quorum sees through, where the
/// primary must keep accepting writes (or retake its lease quickly).
pub fn write_availability(ops: &[Op], bound_ms: u64) -> (CheckResult, Option<WriteGap>) {
    let Some(gap) = longest_write_gap(ops) else { return (CheckResult::NotApplicable, None) };
    let tl = Timeline::of(ops);
    let result = if gap.ms() > bound_ms as f64 {
        CheckResult::Fail(format!(
            "no node accepted a plain write for {:.0} ms from {} (bound {bound_ms} ms)",
            gap.ms(),
            tl.at(ops, gap.start)
        ))
    } else {
        CheckResult::Pass
    };
    (result, Some(gap))
}

/// A fence an agent applied at its lease deadline, from its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadlineFence {
    pub member: String,
    pub epoch: u64,
    /// From the lease deadline to the fence being applied; negative when
    /// before the deadline.
    pub late_us: i64,
}

/// Removes ANSI escape sequences (tracing colours its output when it
/// thinks it may).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, then one final byte.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The agent's message for a fence applied at its lease deadline.
pub const DEADLINE_FENCE_MESSAGE: &str = "deadline fence applied";

/// Every `deadline fence applied ... epoch=N late_us=I` line of an agent's
/// log (tracing's fmt output, possibly coloured). Fields are read after the
/// message, so a span's fields cannot be mistaken for them.
pub fn parse_deadline_fences(member: &str, log: &str) -> Vec<DeadlineFence> {
    log.lines()
        .filter_map(|line| {
            let line = strip_ansi(line);
            let rest = &line[line.find(DEADLINE_FENCE_MESSAGE)? + DEADLINE_FENCE_MESSAGE.len()..];
            let field = |name: &str| {
                rest.split(|c: char| c.is_whitespace() || c == ',')
                    .find_map(|tok| tok.strip_prefix(name)?.strip_prefix('='))
                    .map(|v| v.trim_matches('"').to_owned())
            };
            Some(DeadlineFence {
                member: member.to_owned(),
                epoch: field("epoch")?.parse().ok()?,
                late_us: field("late_us")?.parse().ok()?,
            })
        })
        .collect()
}

/// How late after its deadline an agent may fence: the grantor's wait
/// exceeds the holder's deadline by about 120 ms with the defaults (drift
/// and margin on both sides), so a fence later than this can overlap the
/// next primary.
pub const FENCE_LATE_LIMIT_MS: u64 = 100;

/// Whether a fence's lateness is the documented limit of a frozen agent:
/// the nemesis stopped that member's agent (SIGSTOP stops its fencer
/// thread too, which fences when the process runs again), and the fence was
/// no later than that pause could make it (the longest pause plus
/// `limit_ms`). The fences carry no monotonic time, so this cannot tell a
/// late fence of the same member at another moment of that scenario apart.
fn late_because_frozen(tl: &Timeline, fence: &DeadlineFence, limit_ms: u64) -> bool {
    let longest_ns = tl.paused.get(&fence.member).into_iter().flatten().map(|(a, b)| b.saturating_sub(*a)).max();
    longest_ns
        .is_some_and(|ns| fence.late_us <= i64::try_from(ns / 1_000).unwrap_or(i64::MAX) + limit_ms as i64 * 1_000)
}

/// Splits fences into those of running agents and those a frozen agent
/// delayed (see [`late_because_frozen`]); only the first measure the
/// fencer's timeliness.
pub fn fences_by_agent_state<'a>(
    ops: &[Op],
    fences: &'a [DeadlineFence],
    limit_ms: u64,
) -> (Vec<&'a DeadlineFence>, Vec<&'a DeadlineFence>) {
    let tl = Timeline::of(ops);
    fences.iter().partition(|f| f.late_us <= limit_ms as i64 * 1_000 || !late_because_frozen(&tl, f, limit_ms))
}

/// Every deadline fence was applied at most `limit_ms` after its deadline.
/// A fence delayed by a frozen agent (see [`late_because_frozen`]) is the
/// documented limit, reported and not failed.
pub fn deadline_fence_on_time(ops: &[Op], fences: &[DeadlineFence], limit_ms: u64) -> CheckResult {
    if fences.is_empty() {
        return CheckResult::NotApplicable;
    }
    let (running, frozen) = fences_by_agent_state(ops, fences, limit_ms);
    let late: Vec<&&DeadlineFence> = running.iter().filter(|f| f.late_us > limit_ms as i64 * 1_000).collect();
    if let Some(worst) = late.iter().max_by_key(|f| f.late_us) {
        CheckResult::Fail(format!(
            "{} of {} deadline fences more than {limit_ms} ms late; worst {} epoch {} at {:.1} ms",
            late.len(),
            running.len(),
            worst.member,
            worst.epoch,
            worst.late_us as f64 / 1e3
        ))
    } else if let Some(worst) = frozen.iter().max_by_key(|f| f.late_us) {
        CheckResult::Documented(format!(
            "{} fence(s) late because the agent was stopped (frozen agent): {} epoch {} at {:.1} ms",
            frozen.len(),
            worst.member,
            worst.epoch,
            worst.late_us as f64 / 1e3
        ))
    } else {
        CheckResult::Pass
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn op(t: u64, process: &str, kind: OpType, f: &str, value: serde_json::Value) -> Op {
        Op { t, process: process.into(), kind, f: f.into(), value }
    }
    fn ok(t: u64, f: &str, value: serde_json::Value) -> Op {
        op(t, "p", OpType::Ok, f, value)
    }
    fn hold(holder: &str, epoch: u64, start: u64, end: u64) -> Op {
        ok(end, "hold", json!({"group":"g","holder":holder,"epoch":epoch,"start":start,"end":end}))
    }

    #[test]
    fn overlapping_leases_are_caught() {
        assert_eq!(no_overlapping_leases(&[]), CheckResult::NotApplicable);
        let fine = [hold("a", 1, 0, 100), hold("b", 2, 100, 200), hold("a", 3, 250, 300)];
        assert_eq!(no_overlapping_leases(&fine), CheckResult::Pass);
        let bad = [hold("a", 1, 0, 100), hold("b", 2, 90, 200)];
        assert!(no_overlapping_leases(&bad).is_fail());
        // A long early interval still catches a late overlap.
        let nested = [hold("a", 1, 0, 1000), hold("b", 2, 10, 20), hold("c", 3, 500, 600)];
        assert!(no_overlapping_leases(&nested).is_fail());
        // The same holder renewing is not an overlap.
        let same = [hold("a", 1, 0, 100), hold("a", 1, 50, 150)];
        assert_eq!(no_overlapping_leases(&same), CheckResult::Pass);
    }

    #[test]
    fn epochs_must_be_unique_and_increase() {
        let acq = |t, h: &str, e: u64| ok(t, "acquire", json!({"group":"g","holder":h,"epoch":e}));
        assert_eq!(epochs_unique_and_increasing(&[acq(1, "a", 1), acq(2, "b", 2)]), CheckResult::Pass);
        assert!(epochs_unique_and_increasing(&[acq(1, "a", 2), acq(2, "b", 2)]).is_fail());
        assert!(epochs_unique_and_increasing(&[acq(1, "a", 3), acq(2, "b", 2)]).is_fail());
    }

    #[test]
    fn the_register_must_only_accept_newer_epochs() {
        let w = |inv, done, e: u64| ok(done, "register-write", json!({"epoch":e,"invoked":inv}));
        assert_eq!(fenced_register_accepts_only_newest(&[w(0, 10, 1), w(20, 30, 2), w(40, 50, 2)]), CheckResult::Pass);
        // Concurrent writes may land in either order.
        assert_eq!(fenced_register_accepts_only_newest(&[w(0, 30, 2), w(10, 40, 1)]), CheckResult::Pass);
        assert!(fenced_register_accepts_only_newest(&[w(0, 10, 2), w(20, 30, 1)]).is_fail());
    }

    #[test]
    fn client_epochs_never_go_back() {
        let r = |inv, done, e: u64| ok(done, "get-lease", json!({"group":"g","holder":"x","epoch":e,"invoked":inv}));
        assert_eq!(client_epochs_monotonic(&[r(0, 10, 1), r(5, 15, 1), r(20, 30, 2)]), CheckResult::Pass);
        assert!(client_epochs_monotonic(&[r(0, 10, 2), r(20, 30, 1)]).is_fail());
        // Overlapping reads may disagree.
        assert_eq!(client_epochs_monotonic(&[r(0, 30, 2), r(10, 20, 1)]), CheckResult::Pass);
        // A read invoked after a grant was acknowledged must see it; one
        // invoked before may not.
        let acq = |done, e: u64| ok(done, "acquire", json!({"group":"g","holder":"y","epoch":e}));
        assert!(client_epochs_monotonic(&[acq(10, 3), r(20, 30, 2)]).is_fail());
        assert_eq!(client_epochs_monotonic(&[acq(10, 3), r(5, 30, 2), r(20, 40, 3)]), CheckResult::Pass);
        // Another group's grant says nothing about this one.
        let other = ok(10, "acquire", json!({"group":"h","holder":"y","epoch":9}));
        assert_eq!(client_epochs_monotonic(&[other, r(20, 30, 2)]), CheckResult::Pass);
    }

    #[test]
    fn acknowledged_writes_must_survive() {
        let pw = |key: &str, acked: bool| ok(1, "pair-write", json!({"member":"m1","epoch":1,"key":key,"acked":acked}));
        let fin = |present: &[&str]| ok(9, "final-read", json!({"member":"m2","present":present}));
        assert_eq!(no_acked_write_lost(&[pw("a", true), pw("b", false), fin(&["a"])]), CheckResult::Pass);
        assert!(no_acked_write_lost(&[pw("a", true), pw("b", true), fin(&["a"])]).is_fail());
        assert!(no_acked_write_lost(&[pw("a", true)]).is_fail(), "no final read is a failure");
    }

    #[test]
    fn failover_times_are_measured_and_bounded() {
        let kill =
            op(1_000_000_000, "nemesis", OpType::Info, "kill", json!({"target":"m1","primary":true,"member":"m1"}));
        let pw = |t, m: &str| ok(t, "pair-write", json!({"member":m,"epoch":2,"key":"k","acked":false}));
        let (r, times) = failover_times(&[kill.clone(), pw(1_500_000_000, "m1"), pw(2_200_000_000, "m2")], 2_500);
        assert_eq!((r, times), (CheckResult::Pass, vec![1_200]));
        let (r, _) = failover_times(&[kill.clone(), pw(5_000_000_000, "m2")], 2_500);
        assert!(r.is_fail());
        let (r, _) = failover_times(&[kill], 2_500);
        assert!(r.is_fail(), "a kill with no failover at all is a failure");
    }

    #[test]
    fn a_moved_primary_is_a_failover() {
        let pw = |m: &str| ok(1, "pair-write", json!({"member":m,"epoch":1,"key":"k","acked":true}));
        assert_eq!(no_failover(&[pw("m1"), pw("m1")]), CheckResult::Pass);
        assert!(no_failover(&[pw("m1"), pw("m2")]).is_fail());
    }

    #[test]
    fn after_healing_everyone_agrees_on_one_primary() {
        let fs = |masters: &[&str], nodes: serde_json::Value| {
            ok(1, "final-state", json!({"holder":"m1","epoch":2,"masters":masters,"nodes":nodes}))
        };
        let agree = json!([{"node":1,"holder":"m1","epoch":2},{"node":2,"holder":"m1","epoch":2}]);
        assert_eq!(single_primary_after_heal(&[fs(&["m1"], agree.clone())]), CheckResult::Pass);
        assert!(single_primary_after_heal(&[fs(&["m1", "m2"], agree.clone())]).is_fail());
        assert!(single_primary_after_heal(&[fs(&["m2"], agree)]).is_fail());
        let split = json!([{"node":1,"holder":"m1","epoch":2},{"node":2,"holder":"m2","epoch":1}]);
        assert!(single_primary_after_heal(&[fs(&["m1"], split)]).is_fail());
    }

    const MS: u64 = 1_000_000;

    /// A plain write on `member`, invoked at `inv` ms and answered at `done` ms.
    fn pw(member: &str, seq: u64, inv: u64, done: u64, kind: OpType) -> Op {
        op(
            done * MS,
            &format!("plain-{member}"),
            kind,
            "plain-write",
            json!({"member": member, "key": format!("p:{member}:{seq}"), "seq": seq, "invoked": inv * MS}),
        )
    }
    /// Accepted writes on `member` every 10 ms over [from, to) ms (2 ms each).
    fn accepting(member: &str, from: u64, to: u64) -> Vec<Op> {
        (from / 10..to / 10).map(|i| pw(member, i, i * 10, i * 10 + 2, OpType::Ok)).collect()
    }
    fn nemesis(t_ms: u64, f: &str, value: serde_json::Value) -> Op {
        op(t_ms * MS, "nemesis", OpType::Info, f, value)
    }
    fn sorted(mut ops: Vec<Op>) -> Vec<Op> {
        ops.sort_by_key(|o| o.t);
        ops
    }

    #[test]
    fn two_nodes_accepting_plain_writes_at_once_is_a_dual_primary() {
        assert_eq!(no_dual_primary_plain(&[]).0, CheckResult::NotApplicable);
        // m1 until 1,000 ms, then blocked (fenced); m2 from 1,500 ms.
        let mut clean = accepting("m1", 0, 1_000);
        clean.push(pw("m1", 999, 1_000, 1_300, OpType::Info));
        clean.extend(accepting("m2", 1_500, 2_000));
        clean.push(pw("m2", 0, 100, 101, OpType::Fail)); // READONLY while a replica
        let (r, windows) = no_dual_primary_plain(&sorted(clean));
        assert_eq!((r, windows.len()), (CheckResult::Pass, 0));

        // m1 keeps accepting until 2,000 ms while m2 accepts from 1,500 ms.
        let mut bad = vec![nemesis(0, "partition", json!({"grudge": {"c1": ["m1"]}}))];
        bad.extend(accepting("m1", 0, 2_000));
        bad.extend(accepting("m2", 1_500, 3_000));
        let (r, windows) = no_dual_primary_plain(&sorted(bad));
        let CheckResult::Fail(why) = r else { panic!("not flagged: {r:?}") };
        assert!(why.contains("m1 and m2") && why.contains("+1.5 s"), "{why}");
        assert_eq!(windows.len(), 1);
        // From m2's first completion (1,502) to m1's last invocation (1,990).
        assert!((windows[0].ms() - 488.0).abs() < 0.01, "{}", windows[0].ms());
    }

    #[test]
    fn a_refused_write_ends_a_run_and_single_writes_prove_nothing() {
        // m1: ok, refused, ok; m2 accepted one write between: each m1 run
        // is a single write, so no moment is proven to have two primaries.
        let ops = sorted(vec![
            pw("m1", 1, 0, 5, OpType::Ok),
            pw("m1", 2, 10, 15, OpType::Fail),
            pw("m1", 3, 20, 25, OpType::Ok),
            pw("m2", 1, 1, 24, OpType::Ok),
        ]);
        assert_eq!(no_dual_primary_plain(&ops).0, CheckResult::Pass);
        // Without the refusal, m1's run spans [5, 20] and m2's single write
        // does not: still nothing proven.
        let ops = sorted(vec![
            pw("m1", 1, 0, 5, OpType::Ok),
            pw("m1", 3, 20, 25, OpType::Ok),
            pw("m2", 1, 1, 24, OpType::Ok),
        ]);
        assert_eq!(no_dual_primary_plain(&ops).0, CheckResult::Pass);
        // Two runs: [5, 20] on m1 and [8, 30] on m2 overlap by 12 ms.
        let ops = sorted(vec![
            pw("m1", 1, 0, 5, OpType::Ok),
            pw("m1", 3, 20, 25, OpType::Ok),
            pw("m2", 1, 1, 8, OpType::Ok),
            pw("m2", 2, 30, 31, OpType::Ok),
        ]);
        let (r, w) = no_dual_primary_plain(&ops);
        assert!(r.is_fail());
        assert!((w[0].ms() - 12.0).abs() < 0.01);
    }

    #[test]
    fn a_frozen_agents_window_is_measured_and_documented() {
        let mut ops = vec![
            nemesis(500, "pause", json!({"target": "m1-agent"})),
            nemesis(3_000, "heal", json!({"restarted": [], "resumed": ["m1-agent"]})),
        ];
        ops.extend(accepting("m1", 0, 3_050));
        ops.extend(accepting("m2", 2_000, 5_000));
        let (r, windows) = no_dual_primary_plain(&sorted(ops.clone()));
        let CheckResult::Documented(what) = &r else { panic!("{r:?}") };
        assert!(what.starts_with("window 1038 ms (frozen agent: m1's agent"), "{what}");
        assert!(r.label().starts_with("documented: window 1038 ms"));
        assert_eq!(windows.len(), 1);
        // The same history without the pause fails.
        let unpaused: Vec<Op> = ops.into_iter().filter(|o| o.process != "nemesis").collect();
        assert!(no_dual_primary_plain(&sorted(unpaused)).0.is_fail());
    }

    fn final_plain(present: &[String]) -> Op {
        ok(100_000 * MS, "final-read-plain", json!({"member": "m2", "present": present}))
    }
    fn keys(ops: &[Op], keep: impl Fn(&str) -> bool) -> Vec<String> {
        ops.iter()
            .filter(|o| o.f == "plain-write" && o.kind == OpType::Ok)
            .filter_map(|o| o.str("key").map(str::to_owned))
            .filter(|k| keep(k))
            .collect()
    }

    #[test]
    fn acknowledged_plain_writes_must_survive() {
        assert_eq!(no_acked_plain_write_lost(&[]).0, CheckResult::NotApplicable);
        let mut ops = accepting("m1", 0, 1_000);
        ops.extend(accepting("m2", 1_500, 2_000));
        assert!(no_acked_plain_write_lost(&ops).0.is_fail(), "no final read is a failure");
        let all = keys(&ops, |_| true);
        let mut fine = ops.clone();
        fine.push(final_plain(&all));
        let (r, loss) = no_acked_plain_write_lost(&fine);
        assert_eq!(r, CheckResult::Pass);
        assert_eq!(loss.map(|l| (l.acked, l.lost)), Some((150, 0)));
        // m1's last write lost with no kill, cut or pause: a failure.
        let mut bad = ops;
        bad.push(final_plain(&keys(&bad, |k| k != "p:m1:99")));
        let (r, loss) = no_acked_plain_write_lost(&bad);
        let CheckResult::Fail(why) = r else { panic!("{r:?}") };
        assert!(why.starts_with("1 of 150") && why.contains("p:m1:99"), "{why}");
        assert_eq!(loss.map(|l| l.lost), Some(1));
    }

    #[test]
    fn a_kill_explains_only_the_unsent_tail_of_the_killed_nodes_writes() {
        let mut ops = accepting("m1", 0, 1_000);
        ops.push(nemesis(1_000, "kill", json!({"target": "m1", "primary": true, "member": "m1"})));
        ops.extend(accepting("m2", 2_000, 3_000));
        // The last three of m1's writes never reached m2: documented.
        let tail = ["p:m1:97", "p:m1:98", "p:m1:99"];
        let mut lost_tail = ops.clone();
        lost_tail.push(final_plain(&keys(&ops, |k| !tail.contains(&k))));
        let (r, loss) = no_acked_plain_write_lost(&sorted(lost_tail));
        let CheckResult::Documented(what) = &r else { panic!("{r:?}") };
        assert!(
            what.starts_with("3 of 200 acknowledged plain writes lost: 3 acknowledged just before a kill -9"),
            "{what}"
        );
        assert_eq!(loss.map(|l| l.explained.values().sum::<usize>()), Some(3));
        // A lost write followed by surviving ones of the same node is not
        // what asynchronous replication loses.
        let mut hole = ops.clone();
        hole.push(final_plain(&keys(&ops, |k| k != "p:m1:50")));
        assert!(no_acked_plain_write_lost(&sorted(hole)).0.is_fail());
        // Nor are the new primary's writes (it was never killed).
        let mut new_primary = ops.clone();
        new_primary.push(final_plain(&keys(&ops, |k| k != "p:m2:299")));
        assert!(no_acked_plain_write_lost(&sorted(new_primary)).0.is_fail());
    }

    #[test]
    fn writes_no_replica_could_hear_or_taken_by_a_frozen_node_are_documented() {
        // m1 keeps accepting after a partition cut it from m2 (the client
        // still reaches it), until it fences at 1,900 ms; m2 is promoted.
        let mut ops = vec![
            nemesis(1_000, "partition", json!({"grudge": {"m1": ["c1", "m2"], "m2": ["m1"]}})),
            nemesis(5_000, "heal", json!({"restarted": [], "resumed": []})),
        ];
        ops.extend(accepting("m1", 0, 1_900));
        ops.extend(accepting("m2", 3_000, 6_000));
        let after_cut = |k: &str| k.strip_prefix("p:m1:").and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s >= 100);
        let mut cut = ops.clone();
        cut.push(final_plain(&keys(&ops, |k| !after_cut(k))));
        let (r, loss) = no_acked_plain_write_lost(&sorted(cut));
        assert!(matches!(r, CheckResult::Documented(ref w) if w.contains("no replica could hear")), "{r:?}");
        assert_eq!(loss.map(|l| l.lost), Some(90));
        // A one-way cut the other direction counts too (TCP needs both).
        let mut other_way = ops.clone();
        other_way[0] = nemesis(1_000, "partition", json!({"grudge": {"m1": ["m2"]}}));
        other_way.push(final_plain(&keys(&ops, |k| !after_cut(k))));
        assert!(matches!(no_acked_plain_write_lost(&sorted(other_way)).0, CheckResult::Documented(_)));
        // Cutting the coordinators only leaves replication alone.
        let mut coords = ops.clone();
        coords[0] = nemesis(1_000, "partition", json!({"grudge": {"c1": ["m1"], "c2": ["m1"]}}));
        coords.push(final_plain(&keys(&ops, |k| !after_cut(k))));
        assert!(no_acked_plain_write_lost(&sorted(coords)).0.is_fail());

        // A frozen agent: m1 accepts throughout, m2 is promoted meanwhile.
        let mut frozen = vec![
            nemesis(500, "pause", json!({"target": "m1-agent"})),
            nemesis(3_000, "heal", json!({"restarted": [], "resumed": ["m1-agent"]})),
        ];
        frozen.extend(accepting("m1", 0, 3_050));
        frozen.extend(accepting("m2", 2_000, 4_000));
        let late = |k: &str| k.strip_prefix("p:m1:").and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s >= 200);
        let present = keys(&frozen, |k| !late(k));
        frozen.push(final_plain(&present));
        let (r, _) = no_acked_plain_write_lost(&sorted(frozen));
        assert!(matches!(r, CheckResult::Documented(ref w) if w.contains("frozen agent")), "{r:?}");
    }

    #[test]
    fn the_longest_write_gap_is_measured_from_the_fault_to_the_end() {
        assert_eq!(write_availability(&[], 500).0, CheckResult::NotApplicable);
        let mut ops = vec![nemesis(1_000, "partition", json!({"grudge": {}}))];
        ops.extend(accepting("m1", 0, 2_000));
        ops.push(pw("m1", 200, 2_000, 2_300, OpType::Info));
        ops.extend(accepting("m1", 2_900, 4_000));
        ops.push(pw("m2", 1, 3_995, 3_996, OpType::Fail));
        let ops = sorted(ops);
        let gap = longest_write_gap(&ops).expect("a gap");
        // From the last ok before the block (1,992) to the first after (2,902).
        assert!((gap.ms() - 910.0).abs() < 0.01, "{}", gap.ms());
        assert!(write_availability(&ops, 500).0.is_fail());
        assert_eq!(write_availability(&ops, 1_000).0, CheckResult::Pass);
        // Nothing accepted after the fault started: the gap runs to the end.
        let mut none = vec![nemesis(1_000, "partition", json!({"grudge": {}}))];
        none.extend(accepting("m1", 0, 900));
        none.push(pw("m1", 500, 5_000, 5_300, OpType::Info));
        let gap = longest_write_gap(&sorted(none)).expect("a gap");
        assert!((gap.ms() - 4_300.0).abs() < 0.01, "{}", gap.ms());
    }

    #[test]
    fn deadline_fences_are_parsed_from_plain_and_coloured_logs() {
        let log = "\
2026-05-09T07:35:00.000001Z  INFO quorate::agent::role: acquired the lease: promoting epoch=2
2026-05-09T07:35:01.000001Z  INFO role{epoch=9}: quorate::agent::role: deadline fence applied epoch=3 late_us=-1520
\u{1b}[2m2026-05-09T07:35:02.000001Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mquorate::agent::role\u{1b}[0m\u{1b}[2m:\u{1b}[0m deadline fence applied \u{1b}[3mepoch\u{1b}[0m\u{1b}[2m=\u{1b}[0m4 \u{1b}[3mlate_us\u{1b}[0m\u{1b}[2m=\u{1b}[0m130300
2026-05-09T07:35:03.000001Z  WARN quorate::agent::role: deadline fence applied (garbled)
";
        let fences = parse_deadline_fences("m1", log);
        assert_eq!(
            fences,
            vec![
                DeadlineFence { member: "m1".into(), epoch: 3, late_us: -1_520 },
                DeadlineFence { member: "m1".into(), epoch: 4, late_us: 130_300 },
            ]
        );
        assert_eq!(deadline_fence_on_time(&[], &[], FENCE_LATE_LIMIT_MS), CheckResult::NotApplicable);
        assert_eq!(deadline_fence_on_time(&[], &fences[..1], FENCE_LATE_LIMIT_MS), CheckResult::Pass);
        let CheckResult::Fail(why) = deadline_fence_on_time(&[], &fences, FENCE_LATE_LIMIT_MS) else { panic!() };
        assert!(why.contains("1 of 2") && why.contains("130.3 ms"), "{why}");
        // Exactly at the limit is on time.
        let at = DeadlineFence { member: "m2".into(), epoch: 5, late_us: 100_000 };
        assert_eq!(deadline_fence_on_time(&[], &[at], FENCE_LATE_LIMIT_MS), CheckResult::Pass);
    }

    #[test]
    fn a_frozen_agents_late_fence_is_documented_not_failed() {
        let frozen_m1 = [
            nemesis(0, "pause", json!({"target": "m1-agent"})),
            nemesis(15_000, "heal", json!({"restarted": [], "resumed": ["m1-agent"]})),
        ];
        let fence =
            |member: &str, late_ms: i64| DeadlineFence { member: member.into(), epoch: 1, late_us: late_ms * 1_000 };
        // Stopped for 15 s, fenced 14.4 s late on resuming: documented.
        let r = deadline_fence_on_time(&frozen_m1, &[fence("m1", 14_417)], FENCE_LATE_LIMIT_MS);
        assert!(matches!(r, CheckResult::Documented(ref w) if w.contains("frozen agent")), "{r:?}");
        let both = [fence("m1", 14_417), fence("m1", -40)];
        let (running, frozen) = fences_by_agent_state(&frozen_m1, &both, 100);
        assert_eq!((running.len(), frozen.len()), (1, 1));
        // Later than the pause explains, or another member's: a failure.
        assert!(deadline_fence_on_time(&frozen_m1, &[fence("m1", 16_000)], FENCE_LATE_LIMIT_MS).is_fail());
        assert!(deadline_fence_on_time(&frozen_m1, &[fence("m2", 300)], FENCE_LATE_LIMIT_MS).is_fail());
        // A paused coordinator is not a frozen agent.
        let c2 = [nemesis(0, "pause", json!({"target": "c2"})), nemesis(4_000, "resume", json!({"target": "c2"}))];
        assert!(deadline_fence_on_time(&c2, &[fence("m1", 300)], FENCE_LATE_LIMIT_MS).is_fail());
    }
}

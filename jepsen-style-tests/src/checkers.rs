//! Checkers: each a pure function of a history.
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
//! | `final-read` | ok | `{member, present: [keys]}` read on the final primary after healing |
//! | `final-state` | ok | `{holder, epoch, nodes: [{node, holder, epoch}], masters: [member]}` |
//! | nemesis `kill` | info | `{target, primary: bool, member}` |

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{Op, OpType};

/// A checker's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    Pass,
    Fail(String),
    /// The history has nothing this checker can judge.
    NotApplicable,
}

impl CheckResult {
    pub fn is_fail(&self) -> bool {
        matches!(self, CheckResult::Fail(_))
    }

    /// "pass", "fail: ...", "n/a".
    pub fn label(&self) -> String {
        match self {
            CheckResult::Pass => "pass".into(),
            CheckResult::Fail(why) => format!("fail: {why}"),
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
    let mut by_completion: Vec<(u64, u64)> = ops.iter().map(|(_, done, e)| (*done, *e)).collect();
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

/// Epochs seen by clients never go backwards between non-overlapping queries.
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
    for (group, reads) in by_group {
        if let CheckResult::Fail(why) = real_time_monotonic(&reads, &format!("{group} lease read")) {
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
}

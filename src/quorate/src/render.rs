//! Human-readable and JSON renderings of API answers, shared by the CLI
//! (`quorate matrix`) and the demo: the matrix as a grid with its verdict
//! row, and as JSON.

use serde_json::{Value, json};

use crate::pb::v1 as pb;

pub fn obs_name(state: i32) -> &'static str {
    match pb::ObservationState::try_from(state) {
        Ok(pb::ObservationState::ObservedUp) => "up",
        Ok(pb::ObservationState::ObservedDown) => "down",
        Ok(pb::ObservationState::ObservedUnknown) => "unknown",
        _ => "none",
    }
}

pub fn verdict_name(state: i32) -> &'static str {
    match pb::VerdictState::try_from(state) {
        Ok(pb::VerdictState::VerdictUp) => "up",
        Ok(pb::VerdictState::VerdictPartial) => "partial",
        Ok(pb::VerdictState::VerdictDown) => "down",
        Ok(pb::VerdictState::VerdictUnknown) => "unknown",
        _ => "none",
    }
}

pub fn cell_json(c: &pb::MatrixCell) -> Value {
    json!({
        "observer": c.observer,
        "target": c.target,
        "state": obs_name(c.state),
        "age_ms": c.age_ms,
        "fresh": c.fresh,
        "reason": c.reason,
        "state_age_ms": c.state_age_ms,
        "incarnation": c.incarnation.map(|i| format!("{i:016x}")),
    })
}

pub fn verdict_json(v: &pb::MemberVerdict) -> Value {
    json!({
        "state": verdict_name(v.state),
        "up_votes": v.up_votes,
        "down_votes": v.down_votes,
        "unknown_votes": v.unknown_votes,
        "silent": v.silent,
        "observers": v.observers,
        "quorum": v.quorum,
        "explanation": v.explanation,
    })
}

pub fn restart_json(r: &pb::Restart) -> Value {
    json!({
        "member": r.member,
        "from_incarnation": format!("{:016x}", r.from_incarnation),
        "to_incarnation": format!("{:016x}", r.to_incarnation),
        "seen_by": r.seen_by,
        "revision": r.revision,
    })
}

/// The matrix as the JSON object `quorate matrix --json` prints.
pub fn matrix_json(m: &pb::Matrix) -> Value {
    let verdicts: serde_json::Map<String, Value> =
        m.verdicts.iter().map(|v| (v.member.clone(), verdict_json(v))).collect();
    json!({
        "group": m.group,
        "observers": m.observers,
        "targets": m.targets,
        "cells": m.cells.iter().map(cell_json).collect::<Vec<_>>(),
        "verdicts": verdicts,
        "cut_links": m.cut_links.iter().map(|c| json!({ "observer": c.observer, "target": c.target })).collect::<Vec<_>>(),
        "isolated": m.isolated,
        "restarts": m.restarts.iter().map(restart_json).collect::<Vec<_>>(),
        "revision": m.revision,
        "served_by": m.served_by,
    })
}

/// Terminal styling, only when writing to a terminal.
struct Style {
    on: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.on { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_owned() }
    }
}

fn age(ms: u64) -> String {
    if ms < 10_000 { format!("{:.1}s", ms as f64 / 1000.0) } else { format!("{}s", ms / 1000) }
}

/// The matrix as a grid: observers as rows, members as columns, the
/// verdict row under it, a legend, cut links, isolated observers, restarts.
pub fn render_matrix(m: &pb::Matrix, color: bool) -> String {
    let st = Style { on: color };
    let col = m.targets.iter().map(String::len).max().unwrap_or(0).max(9) + 2;
    let first = m.observers.iter().map(String::len).max().unwrap_or(0).max(14) + 2;
    let pad = |s: &str, visible: usize, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(visible)));
    let policy = m.policy.unwrap_or_default();
    let mut out = format!(
        "group {}   revision {}, served by node {}, heartbeat {} ms, down after {} ms, fresh for {} ms\n\n",
        m.group, m.revision, m.served_by, policy.heartbeat_interval_ms, policy.down_after_ms, policy.freshness_ms
    );
    out.push_str(&pad("OBSERVER", 8, first));
    for t in &m.targets {
        out.push_str(&pad(t, t.len(), col));
    }
    out.push('\n');
    for o in &m.observers {
        out.push_str(&pad(o, o.len(), first));
        for t in &m.targets {
            let (text, visible) = match m.cells.iter().find(|c| c.observer == *o && c.target == *t) {
                None => (st.paint("2", "·"), 1),
                Some(c) if c.state == pb::ObservationState::Unspecified as i32 => (st.paint("2", "-"), 1),
                Some(c) => {
                    let (sym, code) = match pb::ObservationState::try_from(c.state) {
                        Ok(pb::ObservationState::ObservedUp) => ("●", "32"),
                        Ok(pb::ObservationState::ObservedDown) => ("✗", "31;1"),
                        _ => ("?", "33"),
                    };
                    let a = age(c.age_ms);
                    let plain = format!("{sym} {a}");
                    let painted = if c.fresh { st.paint(code, &plain) } else { st.paint("2", &format!("{sym}~{a}")) };
                    (painted, plain.chars().count())
                }
            };
            out.push_str(&pad(&text, visible, col));
        }
        out.push('\n');
    }
    out.push_str(&pad("VERDICT", 7, first));
    for t in &m.targets {
        let (name, code) = match m.verdicts.iter().find(|v| v.member == *t).map(|v| verdict_name(v.state)) {
            Some("up") => ("UP", "32;1"),
            Some("down") => ("DOWN", "41;97;1"),
            Some("partial") => ("PARTIAL", "33;1"),
            _ => ("UNKNOWN", "35"),
        };
        out.push_str(&pad(&st.paint(code, name), name.len(), col));
    }
    out.push('\n');
    out.push_str(&pad("up/down (q)", 11, first));
    for t in &m.targets {
        let text = m
            .verdicts
            .iter()
            .find(|v| v.member == *t)
            .map_or_else(String::new, |v| format!("{}/{} ({})", v.up_votes, v.down_votes, v.quorum));
        out.push_str(&pad(&text, text.len(), col));
    }
    out.push_str("\n\n");
    out.push_str(&format!(
        "legend: {} up  {} down  {} unknown  - no report  · self   age = since the observer's report;  {} = stale, not counted\n",
        st.paint("32", "●"),
        st.paint("31;1", "✗"),
        st.paint("33", "?"),
        st.paint("2", "~")
    ));
    if !m.cut_links.is_empty() {
        let links: Vec<String> = m.cut_links.iter().map(|c| format!("{} -> {}", c.observer, c.target)).collect();
        out.push_str(&format!("cut links: {}\n", links.join(", ")));
    }
    if !m.isolated.is_empty() {
        out.push_str(&format!("isolated observers: {}\n", m.isolated.join(", ")));
    }
    for r in m.restarts.iter().rev().take(5) {
        out.push_str(&format!(
            "restart: {} {:016x} -> {:016x} (seen by {}, revision {})\n",
            r.member, r.from_incarnation, r.to_incarnation, r.seen_by, r.revision
        ));
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_has_a_row_per_observer_and_a_verdict_row() {
        let cell = |o: &str, t: &str, s: pb::ObservationState, fresh: bool| pb::MatrixCell {
            observer: o.into(),
            target: t.into(),
            state: s as i32,
            age_ms: 120,
            fresh,
            ..Default::default()
        };
        let m = pb::Matrix {
            group: "cache".into(),
            observers: vec!["cache-1".into(), "cache-2".into(), "coordinator-1".into()],
            targets: vec!["cache-1".into(), "cache-2".into()],
            cells: vec![
                cell("cache-1", "cache-2", pb::ObservationState::ObservedDown, true),
                cell("cache-2", "cache-1", pb::ObservationState::ObservedUp, false),
                cell("coordinator-1", "cache-1", pb::ObservationState::ObservedUp, true),
                cell("coordinator-1", "cache-2", pb::ObservationState::ObservedUp, true),
            ],
            verdicts: vec![
                pb::MemberVerdict {
                    member: "cache-1".into(),
                    state: pb::VerdictState::VerdictUp as i32,
                    up_votes: 2,
                    quorum: 2,
                    ..Default::default()
                },
                pb::MemberVerdict {
                    member: "cache-2".into(),
                    state: pb::VerdictState::VerdictPartial as i32,
                    ..Default::default()
                },
            ],
            cut_links: vec![pb::CutLink { observer: "cache-1".into(), target: "cache-2".into() }],
            ..Default::default()
        };
        let text = render_matrix(&m, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[2].starts_with("OBSERVER"), "{text}");
        assert!(lines[3].starts_with("cache-1") && lines[3].contains('·') && lines[3].contains("✗ 0.1s"), "{text}");
        assert!(lines[4].contains("●~0.1s"), "stale cells are marked: {text}");
        assert!(lines[6].starts_with("VERDICT") && lines[6].contains("UP") && lines[6].contains("PARTIAL"), "{text}");
        assert!(text.contains("cut links: cache-1 -> cache-2"), "{text}");
        assert!(!text.contains("\x1b["), "no colour when not asked");
        assert!(render_matrix(&m, true).contains("\x1b[32;1mUP"));
        let j = matrix_json(&m);
        assert_eq!(
            j["cells"][0],
            json!({"observer":"cache-1","target":"cache-2","state":"down","age_ms":120,"fresh":true,"reason":"","state_age_ms":0,"incarnation":null})
        );
        assert_eq!(j["verdicts"]["cache-1"]["state"], "up");
        assert_eq!(j["verdicts"]["cache-1"]["quorum"], 2);
    }
}

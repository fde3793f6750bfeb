//! `quorate history|switchover|maintenance|whatif|failover`.

use std::time::Duration;

use serde_json::{Value, json};

use super::emit;
use crate::client::Client;
use crate::pb::v1 as pb;
use crate::render::verdict_name;

fn candidate_json(c: &pb::Candidate) -> Value {
    json!({
        "member": c.member,
        "priority": c.priority,
        "verdict": verdict_name(c.verdict),
        "offset": c.offset,
        "lag_bytes": c.lag_bytes,
        "eligible": c.eligible,
        "why_not": if c.why_not.is_empty() { Value::Null } else { json!(c.why_not) },
    })
}

fn candidates_text(cs: &[pb::Candidate]) -> String {
    let mut out = format!(
        "{:<14} {:>8} {:<8} {:>12} {:>10}  {}\n",
        "CANDIDATE", "PRIORITY", "VERDICT", "OFFSET", "LAG", "ELIGIBLE"
    );
    for c in cs {
        let why = if c.eligible { "yes".to_owned() } else { format!("no: {}", c.why_not) };
        out.push_str(&format!(
            "{:<14} {:>8} {:<8} {:>12} {:>10}  {why}\n",
            c.member,
            c.priority,
            verdict_name(c.verdict),
            c.offset.map_or("-".into(), |o| o.to_string()),
            c.lag_bytes.map_or("-".into(), |o| o.to_string()),
        ));
    }
    out.trim_end().to_owned()
}

/// The election status as JSON.
pub fn election_json(e: &pb::ElectionStatus) -> Value {
    let lease = e.lease.clone().unwrap_or_default();
    json!({
        "group": e.group,
        "designated": e.designated,
        "primary": if lease.holder.is_empty() { Value::Null } else { json!(lease.holder) },
        "epoch": lease.epoch,
        "maintenance": e.maintenance,
        "failover_blocked_ms": e.failover_blocked_ms,
        "switchover_to": if e.switchover_to.is_empty() { Value::Null } else { json!(e.switchover_to) },
        "decision": e.decision,
        "candidates": e.candidates.iter().map(candidate_json).collect::<Vec<_>>(),
        "members": e.members.iter().map(|m| {
            let s = m.status.clone().unwrap_or_default();
            json!({"member": m.member, "role": s.role, "offset": s.offset, "link_up": s.link_up,
                   "synced_epoch": s.synced_epoch, "healthy": s.healthy,
                   "error": if s.error.is_empty() { Value::Null } else { json!(s.error) }})
        }).collect::<Vec<_>>(),
        "history": e.history.iter().map(history_json).collect::<Vec<_>>(),
    })
}

fn history_json(h: &pb::HistoryEntry) -> Value {
    json!({
        "revision": h.revision,
        "kind": h.kind,
        "from": if h.from.is_empty() { Value::Null } else { json!(h.from) },
        "to": h.to,
        "epoch": h.epoch,
        "reason": h.reason,
        "evidence": h.evidence,
        "wall_ms": h.wall_ms,
    })
}

fn status_text(e: &pb::ElectionStatus) -> String {
    let lease = e.lease.clone().unwrap_or_default();
    let primary =
        if lease.holder.is_empty() { "none".to_owned() } else { format!("{} (epoch {})", lease.holder, lease.epoch) };
    let mut out = format!("group {}: primary {primary}, designated {}", e.group, e.designated);
    if e.maintenance {
        out.push_str(", MAINTENANCE (no automatic failover)");
    }
    if e.failover_blocked_ms > 0 {
        out.push_str(&format!(", automatic failover blocked for {} ms", e.failover_blocked_ms));
    }
    if !e.switchover_to.is_empty() {
        out.push_str(&format!(", switchover to {} pending", e.switchover_to));
    }
    out.push_str(&format!("\nleader's decision now: {}\n", e.decision));
    for m in &e.members {
        let s = m.status.clone().unwrap_or_default();
        out.push_str(&format!(
            "  {:<14} {:<8} offset {:<10} link {:<4} synced epoch {:<4} {}\n",
            m.member,
            s.role,
            s.offset,
            if s.link_up { "up" } else { "down" },
            s.synced_epoch.map_or("-".into(), |x| x.to_string()),
            if s.error.is_empty() { String::new() } else { format!("error: {}", s.error) }
        ));
    }
    out.push_str(&candidates_text(&e.candidates));
    out
}

pub async fn history(client: &Client, group: &str, json_mode: bool) -> anyhow::Result<()> {
    let e = client.get_election(group, pb::Consistency::Linearizable).await?;
    if json_mode {
        for h in &e.history {
            println!("{}", history_json(h));
        }
        return Ok(());
    }
    println!("{:<9} {:<11} {:<12} {:<12} {:<6} {:<24} REASON", "REVISION", "KIND", "FROM", "TO", "EPOCH", "WHEN");
    for h in &e.history {
        let when = h.wall_ms.checked_div(1000).map_or_else(String::new, |s| {
            let t = std::time::UNIX_EPOCH + Duration::from_secs(s);
            humantime(t)
        });
        println!(
            "{:<9} {:<11} {:<12} {:<12} {:<6} {:<24} {}",
            h.revision,
            h.kind,
            if h.from.is_empty() { "-" } else { &h.from },
            h.to,
            h.epoch.map_or("-".into(), |x| x.to_string()),
            when,
            h.reason
        );
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS UTC` without a date library.
fn humantime(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub async fn status(client: &Client, group: &str, json_mode: bool) -> anyhow::Result<()> {
    let e = client.get_election(group, pb::Consistency::Linearizable).await?;
    emit(json_mode, &election_json(&e), || status_text(&e));
    Ok(())
}

pub async fn maintenance(client: &Client, group: &str, on: bool, json_mode: bool) -> anyhow::Result<()> {
    let e = client.set_maintenance(group, on).await?;
    emit(json_mode, &election_json(&e), || {
        format!("maintenance {} for {group}\n{}", if on { "ON: no automatic failover" } else { "off" }, status_text(&e))
    });
    Ok(())
}

pub async fn unblock(client: &Client, group: &str, json_mode: bool) -> anyhow::Result<()> {
    let e = client.unblock_failover(group).await?;
    emit(json_mode, &election_json(&e), || format!("automatic failover unblocked for {group}\n{}", status_text(&e)));
    Ok(())
}

pub async fn switchover(
    client: &Client,
    group: &str,
    to: Option<&str>,
    wait: Duration,
    json_mode: bool,
) -> anyhow::Result<()> {
    let r = client.switchover(group, to, wait).await?;
    emit(json_mode, &json!({ "group": group, "to": r.to, "epoch": r.epoch, "took_ms": r.took_ms }), || {
        format!("switched {group} over to {} at epoch {} in {} ms", r.to, r.epoch, r.took_ms)
    });
    Ok(())
}

pub async fn whatif(client: &Client, group: &str, down: &[String], json_mode: bool) -> anyhow::Result<()> {
    let r = client.whatif(group, down).await?;
    let value = json!({
        "group": group,
        "down": down,
        "decision": r.decision,
        "to": if r.to.is_empty() { Value::Null } else { json!(r.to) },
        "candidates": r.candidates.iter().map(candidate_json).collect::<Vec<_>>(),
    });
    emit(json_mode, &value, || {
        let who =
            if r.to.is_empty() { "nobody would be promoted".to_owned() } else { format!("{} would be promoted", r.to) };
        format!("if {} were down: {who}\n{}\n\n{}", down.join(", "), r.decision, candidates_text(&r.candidates))
    });
    Ok(())
}

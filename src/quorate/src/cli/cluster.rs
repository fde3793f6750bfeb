//! `quorate cluster members|add-node|remove-node`.

use std::time::Duration;

use serde_json::{Value, json};

use super::emit;
use crate::client::Client;
use crate::pb::v1 as pb;

/// The members as JSON: `{"voters":[..],"learners":[..],"nodes":[..],...}`.
pub fn members_json(m: &pb::ClusterMembersResponse) -> Value {
    let nodes: Vec<Value> = m
        .nodes
        .iter()
        .map(|n| {
            json!({"id": n.id, "addr": n.addr, "role": n.role, "voter": n.voter, "currency": n.currency,
                   "lag_entries": n.lag_entries, "last_contact_ms": n.last_contact_ms, "safe_to_stop": n.safe_to_stop})
        })
        .collect();
    json!({
        "voters": m.voters,
        "learners": m.learners,
        "nodes": nodes,
        "leader": m.leader_id,
        "joint": m.joint,
        "removed": m.removed,
        "safe_to_stop_now": safe_now(m),
    })
}

/// The nodes that may be stopped now, followers and learners first and
/// the leader last (a rolling restart takes them in this order, one at a
/// time, each once it says yes again).
fn safe_now(m: &pb::ClusterMembersResponse) -> Vec<u64> {
    let mut safe: Vec<&pb::ClusterMember> = m.nodes.iter().filter(|n| n.safe_to_stop == "yes").collect();
    safe.sort_by_key(|n| (n.role == "leader", n.id));
    safe.into_iter().map(|n| n.id).collect()
}

fn ids(v: &[u64]) -> String {
    if v.is_empty() { "none".into() } else { v.iter().map(u64::to_string).collect::<Vec<_>>().join(",") }
}

pub async fn members(client: &Client, json_mode: bool) -> anyhow::Result<()> {
    let m = client.cluster_members().await?;
    emit(json_mode, &members_json(&m), || {
        let mut out = format!(
            "leader: {}; voters {}; learners {}{}\n",
            m.leader_id.map_or_else(|| "none".into(), |l| format!("node {l}")),
            ids(&m.voters),
            ids(&m.learners),
            if m.joint { "; a membership change is under way" } else { "" }
        );
        out.push_str(&format!(
            "{:<4} {:<22} {:<9} {:<9} {:>6} {:>13}  {}",
            "ID", "ADDR", "ROLE", "CURRENCY", "LAG", "LAST-CONTACT", "SAFE-TO-STOP"
        ));
        for n in &m.nodes {
            out.push_str(&format!(
                "\n{:<4} {:<22} {:<9} {:<9} {:>6} {:>13}  {}",
                n.id,
                n.addr,
                n.role,
                n.currency,
                n.lag_entries.map_or_else(|| "-".into(), |l| l.to_string()),
                n.last_contact_ms.map_or_else(|| "-".into(), |c| format!("{c} ms")),
                n.safe_to_stop,
            ));
        }
        let safe = safe_now(&m);
        out.push_str(&match safe.first() {
            Some(next) => format!(
                "\nsafe to take down now: {} (one at a time; next: node {next}; wait for yes again before the next)",
                ids(&safe)
            ),
            None => "\nNOT safe to take any voter down now: wait until every node is current".into(),
        });
        if !m.removed.is_empty() {
            out.push_str(&format!("\nremoved for good (ids never reused): {}", ids(&m.removed)));
        }
        out
    });
    Ok(())
}

pub async fn add_node(client: &Client, id: u64, addr: &str, wait: Duration, json_mode: bool) -> anyhow::Result<()> {
    let a = client.add_node(id, addr, wait).await?;
    let value = json!({"added": a.id, "addr": addr, "was_member": a.was_member, "caught_up_ms": a.caught_up_ms,
                       "took_ms": a.took_ms});
    emit(json_mode, &value, || {
        format!(
            "node {id} at {addr} is a voter: caught up as a learner in {} ms, a voter after {} ms",
            a.caught_up_ms, a.took_ms
        )
    });
    Ok(())
}

pub async fn remove_node(client: &Client, id: u64, json_mode: bool) -> anyhow::Result<()> {
    let r = client.remove_node(id).await?;
    let value = json!({"removed": r.id, "was_voter": r.was_voter, "took_ms": r.took_ms});
    emit(json_mode, &value, || {
        format!(
            "node {id} removed in {} ms; its id is never to be used again (stop its process; a new node needs a new id)",
            r.took_ms
        )
    });
    Ok(())
}

//! `quorate status`: ask every node, print one view of the cluster.

use serde_json::json;

use super::emit;
use crate::client::Client;
use crate::client::cluster::cluster_view;

pub async fn run(client: &Client, json_mode: bool) -> anyhow::Result<()> {
    let view = cluster_view(client).await;
    let value = json!(view);
    emit(json_mode, &value, || {
        let mut out = match view.leader {
            Some(l) => format!("leader: node {l}, term {}\n", view.term),
            None => format!("leader: none known (highest term seen: {})\n", view.term),
        };
        out.push_str(&format!(
            "{:<4} {:<22} {:<10} {:<10} {:<10} {}",
            "ID", "ADDR", "ROLE", "REACHABLE", "APPLIED", "CAUGHT-UP"
        ));
        for n in &view.nodes {
            let id = n.id.map_or_else(|| "?".to_owned(), |i| i.to_string());
            let reach = if n.reachable { "yes" } else { "NO" };
            let applied = n.applied.map_or_else(|| "-".to_owned(), |a| a.to_string());
            let caught_up = match n.caught_up {
                Some(true) => "yes",
                Some(false) => "NO (no reads)",
                None => "-",
            };
            out.push_str(&format!("\n{id:<4} {:<22} {:<10} {reach:<10} {applied:<10} {caught_up}", n.addr, n.role));
        }
        out
    });
    if view.nodes.iter().all(|n| !n.reachable) {
        anyhow::bail!("no node answered at {}", client.endpoints().join(","));
    }
    Ok(())
}

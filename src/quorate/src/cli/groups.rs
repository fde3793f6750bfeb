//! `quorate group apply|get|list`, `quorate matrix`, `quorate explain`.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Context as _;
use quorate_core::group::GroupSpec;
use serde_json::json;

use super::emit;
use crate::client::Client;
use crate::pb::v1 as pb;
use crate::render::{cell_json, matrix_json, obs_name, render_matrix, restart_json, verdict_json};
use crate::wire::convert::{spec_from_pb, spec_pb};

pub async fn apply(client: &Client, file: &Path, json_mode: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let spec: GroupSpec =
        toml::from_str(&text).with_context(|| format!("{} is not a valid group spec", file.display()))?;
    spec.validate().with_context(|| format!("{} is not a valid group spec", file.display()))?;
    let resp = client.apply_group(spec_pb(&spec)).await?;
    let verb = if resp.created { "created" } else { "updated" };
    emit(json_mode, &json!({ "group": spec.name, "created": resp.created, "revision": resp.revision }), || {
        format!("group {} {verb} (revision {}, {} members)", spec.name, resp.revision, spec.members.len())
    });
    Ok(())
}

pub async fn get(client: &Client, name: &str, json_mode: bool) -> anyhow::Result<()> {
    let resp = client.get_group(name, pb::Consistency::Linearizable).await?;
    let spec = spec_from_pb(resp.spec.unwrap_or_default());
    let mut value = serde_json::to_value(&spec)?;
    value["revision"] = json!(resp.revision);
    emit(json_mode, &value, || {
        format!("# revision {}\n{}", resp.revision, toml::to_string(&spec).unwrap_or_else(|e| e.to_string()).trim_end())
    });
    Ok(())
}

pub async fn list(client: &Client, json_mode: bool) -> anyhow::Result<()> {
    let names = client.list_groups().await?.names;
    emit(
        json_mode,
        &json!({ "groups": names }),
        || if names.is_empty() { "no groups".into() } else { names.join("\n") },
    );
    Ok(())
}

pub async fn matrix(client: &Client, group: &str, consistency: pb::Consistency, json_mode: bool) -> anyhow::Result<()> {
    let m = client.get_matrix(group, consistency).await?;
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    emit(json_mode, &matrix_json(&m), || render_matrix(&m, color));
    Ok(())
}

pub async fn explain(client: &Client, group: &str, member: &str, json_mode: bool) -> anyhow::Result<()> {
    let r = client.explain(group, member).await?;
    let value = json!({
        "group": group,
        "member": member,
        "sentence": r.sentence,
        "verdict": r.verdict.as_ref().map(verdict_json),
        "evidence": r.evidence.iter().map(cell_json).collect::<Vec<_>>(),
        "restarts": r.restarts.iter().map(restart_json).collect::<Vec<_>>(),
    });
    emit(json_mode, &value, || {
        let mut out = format!(
            "{}\n\n{:<18} {:<8} {:<34} {:>10}  {}\n",
            r.sentence, "OBSERVER", "SAYS", "WHY", "REPORT AGE", "COUNTS"
        );
        for e in &r.evidence {
            let counts = if e.fresh { "yes" } else { "no (stale or none)" };
            let age = if e.state == pb::ObservationState::Unspecified as i32 {
                "-".to_owned()
            } else {
                format!("{} ms", e.age_ms)
            };
            out.push_str(&format!(
                "{:<18} {:<8} {:<34} {:>10}  {counts}\n",
                e.observer,
                obs_name(e.state),
                e.reason,
                age
            ));
        }
        for x in &r.restarts {
            out.push_str(&format!(
                "restarted: {:016x} -> {:016x}, seen by {} at revision {}\n",
                x.from_incarnation, x.to_incarnation, x.seen_by, x.revision
            ));
        }
        out.trim_end().to_owned()
    });
    Ok(())
}

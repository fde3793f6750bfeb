//! `quorate group delete`, `quorate snapshot save` and `quorate server
//! --check-config`.

use std::path::Path;

use anyhow::Context as _;
use serde_json::json;

use super::emit;
use crate::backup;
use crate::client::Client;
use crate::config::ServerConfig;

pub async fn delete_group(client: &Client, name: &str, force: bool, json_mode: bool) -> anyhow::Result<()> {
    let resp = client.delete_group(name, force).await?;
    let epoch = resp.lease.as_ref().map_or(0, |l| l.epoch);
    let value = json!({ "group": name, "deleted": true, "revision": resp.revision, "epoch": epoch, "forced": force });
    emit(json_mode, &value, || {
        format!(
            "group {name} deleted (revision {}); its lease is free, the next grant of {name} gets epoch {}",
            resp.revision,
            epoch + 1
        )
    });
    Ok(())
}

/// Fetches a snapshot from the leader, checks it as a restore would (header,
/// checksum, content), then writes it atomically: a file that is there is
/// a whole, good snapshot.
pub async fn save_snapshot(client: &Client, file: &Path, json_mode: bool) -> anyhow::Result<()> {
    let got = client.save_snapshot().await?;
    let b = backup::decode(&got.bytes).context("the snapshot received does not check out; nothing was written")?;
    backup::write_file_atomic(file, &got.bytes)?;
    let sha256 = backup::sha256_hex(&got.bytes);
    let (groups, leases, max_epoch) = (b.machine.groups().count(), b.machine.lease_count(), b.machine.max_epoch());
    let value = json!({
        "file": file.display().to_string(),
        "bytes": got.bytes.len(),
        "sha256": sha256,
        "format_version": backup::FORMAT_VERSION,
        "revision": b.revision,
        "served_by": b.served_by,
        "groups": groups,
        "leases": leases,
        "max_epoch": max_epoch,
    });
    emit(json_mode, &value, || {
        format!(
            "saved {} ({} bytes, sha256 {sha256}): {groups} groups, {leases} leases, epochs up to {max_epoch}, \
             read at revision {} on node {}",
            file.display(),
            got.bytes.len(),
            b.revision,
            b.served_by
        )
    });
    Ok(())
}

/// Loads `file` as `--config` would and validates it; the error names the
/// field at fault.
pub fn check_config(file: &Path, json_mode: bool) -> anyhow::Result<()> {
    let config = ServerConfig::from_file(file)?;
    config.validate()?;
    emit(json_mode, &json!({ "config": file.display().to_string(), "ok": true }), || format!("{}: OK", file.display()));
    Ok(())
}

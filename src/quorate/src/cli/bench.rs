//! `quorate bench` against etcd (`--target etcd`), and `bench read-gap` and
//! `bench leader` on either target: the side-by-side comparison of
//! `deploy/bench/`. The other kinds stay in `cli/mod.rs`'s `bench`.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use super::{BenchArgs, ConnArgs, ConsistencyArg, client, emit};
use crate::bench::BenchKind;
use crate::bench::etcd::{self, Etcd, Target};
use crate::bench::read_gap::{self, ReadGapOptions};

/// Whether this module runs `args` (else the quorate-only code does).
pub fn is_theirs(args: &BenchArgs) -> bool {
    args.target == Target::Etcd || matches!(args.kind, BenchKind::ReadGap | BenchKind::Leader)
}

pub async fn run(conn: &ConnArgs, args: &BenchArgs, json_mode: bool) -> anyhow::Result<()> {
    // etcd is reached over plain text with its own endpoints: no quorate
    // client (nor its TLS files) is needed for it.
    let quorate = || client(conn);
    let etcd = || Etcd::from_list(&args.etcd_endpoints).context("--etcd-endpoints");
    let serializable = match (args.target, args.consistency) {
        (Target::Etcd, ConsistencyArg::LeaseRead) => {
            anyhow::bail!("etcd has no lease reads: --consistency linearizable or stale (serializable)")
        }
        (_, c) => matches!(c, ConsistencyArg::Stale),
    };
    match (args.kind, args.target) {
        (BenchKind::Leader, Target::Quorate) => {
            let l = read_gap::quorate_leader(&quorate()?).await?;
            emit(json_mode, &serde_json::to_value(&l)?, || format!("leader: node {} at {}", l.node_id, l.endpoint));
        }
        (BenchKind::Leader, Target::Etcd) => {
            let l = etcd::leader(&etcd()?).await?;
            emit(json_mode, &serde_json::to_value(&l)?, || {
                format!("leader: etcd member {} at {} (term {})", l.member_id, l.endpoint, l.raft_term)
            });
        }
        (BenchKind::ReadGap, target) => {
            let opts = ReadGapOptions {
                duration: Duration::from_secs(args.duration_s),
                interval: Duration::from_millis(args.interval_ms.max(1)),
                call_timeout: Duration::from_millis(args.call_timeout_ms.max(1)),
                consistency: args.consistency.to_pb(),
                group: args.group.clone(),
            };
            let report = match target {
                Target::Quorate => read_gap::run(target, Some(&quorate()?), None, &opts).await?,
                Target::Etcd => read_gap::run(target, None, Some(&etcd()?), &opts).await?,
            };
            emit(json_mode, &serde_json::to_value(&report)?, || report.to_string());
        }
        (kind @ (BenchKind::LeaseGet | BenchKind::AcquireRenew), Target::Etcd) => {
            let report =
                etcd::run(&etcd()?, kind, args.clients, Duration::from_secs(args.duration_s), serializable).await?;
            let mut value = serde_json::to_value(&report)?;
            value["target"] = json!("etcd");
            emit(json_mode, &value, || format!("etcd {report}"));
        }
        (kind, Target::Etcd) => {
            anyhow::bail!("--target etcd runs lease-get, acquire-renew, read-gap and leader, not {kind:?}")
        }
        (kind, Target::Quorate) => anyhow::bail!("bench {kind:?} against quorate is not run here"),
    }
    Ok(())
}

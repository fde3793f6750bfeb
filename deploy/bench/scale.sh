#!/usr/bin/env bash
# Scale: how many members 3 coordinators keep fresh at the default
# heartbeat interval with their CPU under half the machine, against what
# etcd's keep-alives would sustain. Usage: deploy/bench/scale.sh OUT_DIR
#
# quorate: `quorate bench ingest --members N` (simulated members in pairs
# beating into one heartbeat Redis every 100 ms, simulated agents reporting
# their views, the coordinators doing their real work) on a local 3-node
# cluster, for N = SCALE_MEMBERS (default "10000 8000 4000"), largest first,
# stopping at the first N where every sampled group is fresh and the
# coordinators' CPU is under 50% of the machine. The cluster is plain text:
# the bench plays thousands of members over a few connections, which over
# TLS would each need a certificate of their own.
#
# Anchor: etcd 3.4 keeps a lease alive by one keep-alive every TTL / 3
# (clientv3's lease keeper), so its keep-alive rate at 8 clients, measured
# by deploy/bench/throughput.sh in the same run (OUT_DIR/throughput/
# renew-8-etcd.json), divided by 3 is the number of 1 s leases it sustains.
#
# Appends rows to OUT_DIR/rows.tsv; each run's JSON is in OUT_DIR/scale/.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
source deploy/lib/deps.sh
source deploy/bench/quorate.sh
need_redis_server
need_cmd jq jq
bench_binary

BASE=${SCALE_BASE_PORT:-24401}
work=$out/scale
rm -rf "$work"
mkdir -p "$work"
qdir=$work/quorate
trap 'quorate_down "$qdir"' EXIT
# 10,000 members in pairs are 5,000 groups: above the default max_groups
# (2048), so these nodes take more (every node `local up` starts reads it).
echo 'max_groups = 20000' >"$work/server.toml"
QUORATE_SERVER_CONFIG=$work/server.toml BENCH_QUORATE_INSECURE=1 quorate_up "$qdir" "$BASE"

kept=0 fresh_pct=0 cpu=0 tried=
for n in ${SCALE_MEMBERS:-10000 8000 4000}; do
  tried=$n
  "$QUORATE" --json bench ingest --members "$n" --duration-s "${SCALE_SECONDS:-10}" >"$work/ingest-$n.json"
  fresh=$(jq -r '.fresh_groups' "$work/ingest-$n.json")
  sampled=$(jq -r '.sampled_groups' "$work/ingest-$n.json")
  cpu=$(jq -r '.coordinator_cpu_pct_of_machine * 10 | round / 10' "$work/ingest-$n.json")
  fresh_pct=$(jq -r '(100 * .fresh_groups / ([.sampled_groups, 1] | max)) | round' "$work/ingest-$n.json")
  echo "ingest $n members: fresh $fresh/$sampled, coordinator CPU $cpu% of the machine," \
    "$(jq -r '.entries_per_s | round' "$work/ingest-$n.json") Raft entries/s" >&2
  if [ "$fresh" = "$sampled" ] && [ "$sampled" -gt 0 ] && awk -v c="$cpu" 'BEGIN { exit !(c < 50) }'; then
    kept=$n
    break
  fi
done

anchor_rate=nan
etcd_json=$out/throughput/renew-8-etcd.json
[ -f "$etcd_json" ] && anchor_rate=$(jq -r '.ops_per_s / 3 | round' "$etcd_json")
anchor="etcd-keepalives-per-s-div-3"
bench_row "$out" members_kept_fresh "$kept" "$anchor_rate" "$anchor" "higher"
bench_row "$out" "members_${tried}_fresh_pct" "$fresh_pct" "nan" "-" "higher"
bench_row "$out" "members_${tried}_coordinator_cpu_pct" "$cpu" "nan" "-" "lower"

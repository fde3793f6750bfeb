#!/usr/bin/env bash
# Throughput, quorate vs etcd, with the same Rust client code on both
# sides (`quorate bench --target quorate|etcd`). Usage:
# deploy/bench/throughput.sh OUT_DIR
#
# Starts a local 3-node quorate cluster (ports 24101..), runs quorate's
# points and stops it, then does the same with a 3-member etcd 3.4 (ports
# 23790..23795): each system is measured with the machine to itself (an
# idle cluster of the other kind took up to half a core, which showed most
# at 64 clients). BENCH_SECONDS (default 5) a point:
# - linearizable reads at 1, 8 and 64 clients: quorate GetLease vs etcd
#   Range (linearizable, etcd's default), and p99 at 64. quorate's leader
#   confirms them by its leader lease while a quorum acknowledged recently
#   (else a quorum round); etcd always runs a ReadIndex round. So quorate
#   with `--consistency read-index` (a quorum round every time, etcd's way)
#   is measured too, at 1 and 8 clients;
# - lease renewals at 8 clients: quorate Renew (a Raft commit each) vs
#   etcd LeaseKeepAlive on each client's stream (the leader extends the
#   lease in memory, no Raft entry: see src/quorate/src/bench/etcd.rs).
# Appends rows to OUT_DIR/rows.tsv (metric, quorate, anchor, anchor name,
# goal); each run's JSON is in OUT_DIR/throughput/. Everything started
# here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
source deploy/lib/deps.sh
source deploy/bench/etcd.sh
source deploy/bench/quorate.sh
need_redis_server
need_etcd
need_cmd jq jq
need_cmd curl curl
bench_binary

BENCH_SECONDS=${BENCH_SECONDS:-5}
QUORATE_BASE=${QUORATE_BASE_PORT:-24101}
ETCD_BASE=${ETCD_BASE_PORT:-23790}
work=$out/throughput
rm -rf "$work"
mkdir -p "$work"
qdir=$work/quorate edir=$work/etcd
cleanup() {
  quorate_down "$qdir"
  etcd_down "$edir"
}
trap cleanup EXIT

anchor="etcd-$(etcd_version)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $anchor;" \
  "quorate $([ -n "${BENCH_QUORATE_INSECURE:-}" ] && echo plain text || echo mutual TLS), etcd plain text;" \
  "${BENCH_SECONDS} s a point" >&2

# run NAME SYSTEM ARGS...: one bench run, its JSON in $work/NAME-SYSTEM.json.
run() {
  local name=$1 system=$2
  shift 2
  "$QUORATE" --json bench "$@" --target "$system" --duration-s "$BENCH_SECONDS" >"$work/$name-$system.json"
  echo "$name $system: $(jq -r '"\(.ops_per_s | floor) ops/s, p50 \(.p50_ms) ms, p99 \(.p99_ms) ms, \(.errors) errors"' \
    "$work/$name-$system.json")" >&2
}
# val NAME SYSTEM FIELD: a field of a run's JSON, to 1 decimal (3 for ms).
val() {
  jq -r --arg f "$3" 'if ($f | endswith("_ms")) then (.[$f] * 1000 | round) / 1000 else (.[$f] * 10 | round) / 10 end' \
    "$work/$1-$2.json"
}

quorate_up "$qdir" "$QUORATE_BASE"
for c in 1 8 64; do run "get-$c" quorate lease-get --clients "$c"; done
for c in 1 8; do run "get-ri-$c" quorate lease-get --clients "$c" --consistency read-index; done
run renew-8 quorate acquire-renew --clients 8
quorate_down "$qdir"

etcd_up "$edir" "$ETCD_BASE"
export ETCD_ENDPOINTS
ETCD_ENDPOINTS=$(cat "$edir/endpoints")
for c in 1 8 64; do run "get-$c" etcd lease-get --clients "$c"; done
run renew-8 etcd acquire-renew --clients 8
etcd_down "$edir"

for c in 1 8 64; do
  bench_row "$out" "linearizable_read_${c}c_ops_per_s" "$(val "get-$c" quorate ops_per_s)" \
    "$(val "get-$c" etcd ops_per_s)" "$anchor" "higher"
done
for c in 1 8; do
  bench_row "$out" "read_index_read_${c}c_ops_per_s" "$(val "get-ri-$c" quorate ops_per_s)" \
    "$(val "get-$c" etcd ops_per_s)" "$anchor" "higher"
done
bench_row "$out" linearizable_read_64c_p99_ms "$(val get-64 quorate p99_ms)" "$(val get-64 etcd p99_ms)" "$anchor" "lower"
bench_row "$out" lease_renew_8c_ops_per_s "$(val renew-8 quorate ops_per_s)" "$(val renew-8 etcd ops_per_s)" \
  "$anchor" "higher"
bench_row "$out" lease_renew_8c_p99_ms "$(val renew-8 quorate p99_ms)" "$(val renew-8 etcd p99_ms)" "$anchor" "lower"

#!/usr/bin/env bash
# Leader change, quorate vs etcd: how long reads stop when the Raft leader
# is killed (kill -9). Usage: deploy/bench/leader-change.sh OUT_DIR
#
# Starts a local 3-node quorate cluster (ports 24101..) and a 3-member
# etcd 3.4 (ports 23790..23795) side by side, then TRIALS times (default
# 5), interleaved (quorate, etcd, quorate, ...): two readers start, one
# linearizable and one stale (etcd: serializable), each reading every
# 1 ms for READ_GAP_S seconds (default 8) with `quorate bench read-gap`;
# after KILL_AFTER_S (default 2) the current leader is killed; once the
# readers are done, the killed node is restarted and the cluster waited
# for until healthy. Each reader's longest gap between two successful
# reads is one sample. Appends to OUT_DIR/rows.tsv the median and max of
# both systems (metric, quorate, anchor, anchor name, goal); the trials
# are in OUT_DIR/leader-change-trials.tsv, the readers' JSON and every
# log under OUT_DIR/leader-change/. etcd's heartbeat and election
# timeout are its defaults unless ETCD_HEARTBEAT_MS / ETCD_ELECTION_MS.
# Everything started here is stopped on exit.
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

TRIALS=${TRIALS:-5}
READ_GAP_S=${READ_GAP_S:-8}
KILL_AFTER_S=${KILL_AFTER_S:-2}
QUORATE_BASE=${QUORATE_BASE_PORT:-24101}
ETCD_BASE=${ETCD_BASE_PORT:-23790}
work=$out/leader-change
rm -rf "$work"
mkdir -p "$work"
qdir=$work/quorate edir=$work/etcd
readers=()
cleanup() {
  local p
  for p in "${readers[@]}"; do kill "$p" 2>/dev/null || true; done
  quorate_down "$qdir"
  etcd_down "$edir"
}
trap cleanup EXIT

quorate_up "$qdir" "$QUORATE_BASE"
etcd_up "$edir" "$ETCD_BASE"
export ETCD_ENDPOINTS
ETCD_ENDPOINTS=$(cat "$edir/endpoints")
anchor="etcd-$(etcd_version)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $anchor" \
  "heartbeat ${ETCD_HEARTBEAT_MS:-100} ms, election ${ETCD_ELECTION_MS:-1000} ms; quorate" \
  "$([ -n "${BENCH_QUORATE_INSECURE:-}" ] && echo plain text || echo mutual TLS), etcd plain text" >&2
trials=$out/leader-change-trials.tsv
printf 'system\ttrial\tconsistency\tkilled\tkill_unix_ms\tlongest_gap_ms\tgap_at_unix_ms\tended_in_gap\terrors\n' >"$trials"

# trial SYSTEM N: one kill of SYSTEM's leader under two readers.
trial() {
  local system=$1 n=$2 leader id pid kill_ms c f p
  readers=()
  for c in linearizable stale; do
    "$QUORATE" --json bench read-gap --target "$system" --duration-s "$READ_GAP_S" --interval-ms 1 \
      --consistency "$c" >"$work/$system-$n-$c.json" 2>"$work/$system-$n-$c.err" &
    readers+=($!)
  done
  sleep "$KILL_AFTER_S"
  if [ "$system" = quorate ]; then leader=$(quorate_leader "$qdir"); else leader=$(etcd_leader "$edir"); fi
  read -r id pid _ <<<"$leader"
  kill_ms=$(date +%s%3N)
  kill -9 "$pid"
  for p in "${readers[@]}"; do wait "$p" || echo "a $system reader failed: see $work/$system-$n-*.err" >&2; done
  readers=()
  for c in linearizable stale; do
    f=$work/$system-$n-$c.json
    jq -r --arg s "$system" --arg n "$n" --arg c "$c" --arg id "$id" --arg k "$kill_ms" \
      '[$s, $n, $c, $id, $k, .longest_gap_ms, .longest_gap_at_unix_ms, .ended_in_gap, .errors] | @tsv' "$f" >>"$trials"
  done
  if [ "$system" = quorate ]; then quorate_restart "$qdir" "$QUORATE_BASE"; else etcd_restart_member "$edir" "$id"; fi
  echo "$system trial $n: killed $id; $(jq -r '"\(.consistency) \(.longest_gap_ms | floor) ms"' "$work/$system-$n-"*.json | paste -sd' ')" >&2
}

for n in $(seq "$TRIALS"); do
  trial quorate "$n"
  trial etcd "$n"
done

# gaps SYSTEM CONSISTENCY: the longest gap of every trial, one a line.
gaps() {
  awk -F'\t' -v s="$1" -v c="$2" 'NR > 1 && $1 == s && $3 == c {print $6}' "$trials"
}
for c in linearizable stale; do
  m=leader_kill_read_gap
  [ "$c" = stale ] && m=leader_kill_stale_read_gap
  bench_row "$out" "${m}_median_ms" "$(gaps quorate $c | median)" "$(gaps etcd $c | median)" "$anchor" "lower"
  bench_row "$out" "${m}_max_ms" "$(gaps quorate $c | maximum)" "$(gaps etcd $c | maximum)" "$anchor" "lower"
done

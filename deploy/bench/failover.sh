#!/usr/bin/env bash
# Failover, side by side: quorate against Redis Sentinel, same machine, same
# run, same client code (`quorate bench failover-probe`, src/quorate/src/
# bench/failover.rs) measuring both.
#
#   deploy/bench/failover.sh OUTDIR
#
# quorate: `quorate local up --nodes 3 --redis-pair bench --base-port 27101`
# (3 coordinators; members bench-1/bench-2, each a data Redis, a heartbeat
# Redis and an agent; mutual TLS, the default). Redis Sentinel: a primary/
# replica pair on 16390/16391 and 3 sentinels on 26390-26392 (quorum 2,
# down-after-milliseconds 500), from deploy/bench/sentinel.sh.
#
# Trials alternate (quorate, sentinel, quorate, ...), TRIALS (5) of each.
# Each kill -9s the primary's host (quorate: its data Redis, heartbeat Redis
# and agent; Sentinel: its redis-server) and measures from the kill:
#   writable: the replica accepts a SET (polled every 1 ms);
#   told:     a client following the system's notification learns the new
#             primary: quorate's Watch stream naming the new lease holder;
#             Sentinel's +switch-master on a sentinel subscription (the
#             earliest of the 3). For quorate, +switch-master from its
#             Sentinel-compatible endpoints is recorded too.
# Between trials the killed member comes back as a replica (quorate: `local
# up` again, which restarts what is not running; Sentinel: a redis-server
# replicating from the master the sentinels name), the system is waited on
# until healthy and synced (quorate: also until min_failover_interval_ms,
# 30 s by default, no longer blocks a failover), then SETTLE_S (3) seconds.
#
# Appends to OUTDIR/rows.tsv (metric, quorate, anchor, anchor_name, goal):
#   failover_writable_p50_ms   goal "<= 650 and <= 0.75x"
#   failover_told_p50_ms       goal "<= 0.4x"
# and writes every trial to OUTDIR/failover-trials.jsonl (quorate's with a
# timeline: verdict down, designation and lease as its watch saw them, the
# survivor's agent acquiring and promoting from its log) and the medians to
# OUTDIR/failover-summary.json. A time not seen within the probe's timeout
# is null in a trial and counts as the slowest in a median.
#
# Builds nothing: expects QUORATE_BIN (default target/release/quorate).
# env: TRIALS (5), SETTLE_S (3), PROBE_TIMEOUT_S (30), KEEP_WORK (0).
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/lib/deps.sh
source deploy/bench/sentinel.sh
need_redis_server
command -v jq >/dev/null 2>&1 || apt_install jq

out=${1:?usage: deploy/bench/failover.sh OUTDIR}
q=${QUORATE_BIN:-target/release/quorate}
[ -x "$q" ] || { echo "no $q: build it first (cargo build --release --locked -p quorate)" >&2; exit 1; }
q=$(realpath "$q")
trials=${TRIALS:-5}
settle_s=${SETTLE_S:-3}
probe_timeout_s=${PROBE_TIMEOUT_S:-30}
mkdir -p "$out"
out=$(realpath "$out")
work=$(mktemp -d /tmp/quorate-failover-bench.XXXXXX)
qdir=$work/quorate sdir=$work/sentinel
group=bench base=27101
redis_ports=(16390 16391) sentinel_ports=(26390 26391 26392)
trials_file=$out/failover-trials.jsonl
: >"$trials_file"

cleanup() {
  timeout 60 "$q" local down --dir "$qdir" >/dev/null 2>&1 || true
  sentinel_down "$sdir"
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work dir kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis_version=$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')
echo "== quorate $("$q" --version | awk '{print $2}') vs Redis Sentinel $redis_version: $trials trials each"

# -- quorate -------------------------------------------------------------
q_up() {
  "$q" local up --nodes 3 --dir "$qdir" --base-port "$base" --redis-pair "$group" --json >"$work/up.json"
}
q_up
export QUORATE_ENDPOINTS QUORATE_CA QUORATE_CERT QUORATE_KEY
QUORATE_ENDPOINTS=$(jq -r .endpoints "$qdir/cluster.json")
QUORATE_CA=$(jq -r .tls.ca "$qdir/cluster.json")
QUORATE_CERT=$(jq -r .tls.admin_cert "$qdir/cluster.json")
QUORATE_KEY=$(jq -r .tls.admin_key "$qdir/cluster.json")
mapfile -t q_sentinels < <(jq -r '.nodes[].sentinel_addr' "$qdir/cluster.json")

q_status() { timeout 10 "$q" --json failover status "$group" 2>/dev/null; }

# q_healthy TIMEOUT_S: until a primary holds the lease as the designated
# member, every other member is a replica with its link up and synced at the
# current epoch, and no failover is blocked (min_failover_interval_ms).
q_healthy() {
  local start=$SECONDS s
  while [ $((SECONDS - start)) -lt "$1" ]; do
    if s=$(q_status) && jq -e '
        .primary as $p | .epoch as $e
        | $p != null and .designated == $p and (.failover_blocked_ms // 0) == 0
          and ([.members[] | select(.member != $p)] | length) >= 1
          and all(.members[] | select(.member != $p); .role == "replica" and .link_up and .synced_epoch == $e)' \
        <<<"$s" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  echo "quorate did not become healthy within $1 s; last status:" >&2
  q_status >&2 || true
  return 1
}

# q_member FIELD MEMBER: a field of a member's entry in cluster.json.
q_member() { jq -r --arg m "$2" ".members[] | select(.id == \$m) | .$1" "$qdir/cluster.json"; }

# q_log_ms T0_UNIX_MS PATTERN FILE...: ms after t0 of the earliest line at or
# after t0, in any FILE, that contains PATTERN (by tracing's UTC
# timestamps), or null.
q_log_ms() {
  python3 - "$@" <<'PY'
import calendar, re, sys
t0, pat, paths = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
ansi = re.compile(r"\x1b\[[0-9;]*m")
stamp = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")
best = None
for path in paths:
    try:
        lines = open(path, errors="replace").readlines()
    except OSError:
        continue
    for line in lines:
        line = ansi.sub("", line)
        m = stamp.match(line)
        if not m or pat not in line:
            continue
        secs = calendar.timegm(__import__("time").strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
        t = (secs + float(m.group(2) or 0)) * 1000
        if t >= t0:
            best = t - t0 if best is None else min(best, t - t0)
            break
print("null" if best is None else "%.1f" % best)
PY
}

q_trial() {
  local i=$1 s primary other epoch
  s=$(q_status)
  primary=$(jq -r .primary <<<"$s") epoch=$(jq .epoch <<<"$s")
  other=$(jq -r --arg p "$primary" '.members[] | select(.id != $p) | .id' "$qdir/cluster.json")
  local pids=(
    "$(q_member data_redis_pid "$primary")" "$(q_member heartbeat_redis_pid "$primary")" "$(q_member agent_pid "$primary")"
  )
  local args=() p
  for p in "${pids[@]}"; do args+=(--kill-pid "$p"); done
  for p in "${q_sentinels[@]}"; do args+=(--sentinel "$p"); done
  local r
  r=$(timeout $((probe_timeout_s + 30)) "$q" --json bench failover-probe "${args[@]}" \
    --write-to "$(q_member data_redis_addr "$other")" --watch-group "$group" --master-name "$group" \
    --timeout-s "$probe_timeout_s")
  local t0 verdict designated acquired promoted designating
  t0=$(jq .t0_unix_ms <<<"$r")
  verdict=$(jq --arg m "$primary" '[.watch_events[] | select(.kind == "verdict" and .detail == ($m + " down"))][0].ms' <<<"$r")
  designated=$(jq --arg m "$other" '[.watch_events[] | select(.kind == "election" and .detail == ("designated " + $m))][0].ms' <<<"$r")
  designating=$(q_log_ms "$t0" "designating a new primary" "$qdir"/node-*.log)
  acquired=$(q_log_ms "$t0" "acquired the lease" "$qdir/$other-agent.log")
  promoted=$(q_log_ms "$t0" "holding the lease: promoting" "$qdir/$other-agent.log")
  jq -c --argjson i "$i" --arg from "$primary" --arg to "$other" --argjson epoch "$epoch" \
    --argjson verdict "$verdict" --argjson designating "$designating" --argjson designated "$designated" \
    --argjson acquired "$acquired" --argjson promoted "$promoted" '
    {system: "quorate", trial: $i, from: $from, to: $to, epoch_before: $epoch,
     writable_ms, told_ms: .told_watch_ms, told_watch_ms, told_sentinel_ms, told_sentinel_each_ms,
     timeline_ms: {verdict_down_seen: $verdict, leader_designating_log: $designating,
                   designated_seen: $designated, agent_acquired_log: $acquired,
                   agent_promoting_log: $promoted, lease_seen: .told_watch_ms, writable: .writable_ms},
     holder_after, switch_master, write_attempts, last_write_error, t0_unix_ms, watch_events}' \
    <<<"$r" | tee -a "$trials_file" | jq -c '{system, trial, writable_ms, told_ms, told_sentinel_ms, timeline_ms}'
  # The killed host comes back as a replica (`local up` restarts what is
  # not running), then quorate settles.
  q_up
  q_healthy 90
  sleep "$settle_s"
}

# -- Redis Sentinel --------------------------------------------------------
s_trial() {
  local i=$1 master replica
  master=$(sentinel_master_port "${sentinel_ports[0]}" "$group")
  if [ "$master" = "${redis_ports[0]}" ]; then replica=${redis_ports[1]}; else replica=${redis_ports[0]}; fi
  local pid
  pid=$(cat "$sdir/$master.pid")
  sentinel_pid_alive "$pid" || { echo "sentinel trial $i: no redis-server at pid $pid" >&2; return 1; }
  local args=() p
  for p in "${sentinel_ports[@]}"; do args+=(--sentinel "127.0.0.1:$p"); done
  local r
  r=$(timeout $((probe_timeout_s + 30)) "$q" --json bench failover-probe --kill-pid "$pid" "${args[@]}" \
    --write-to "127.0.0.1:$replica" --master-name "$group" --timeout-s "$probe_timeout_s")
  jq -c --argjson i "$i" --arg from "$master" --arg to "$replica" '
    {system: "sentinel", trial: $i, from: $from, to: $to,
     writable_ms, told_ms: .told_sentinel_ms, told_sentinel_ms, told_sentinel_each_ms,
     switch_master, write_attempts, last_write_error, t0_unix_ms}' \
    <<<"$r" | tee -a "$trials_file" | jq -c '{system, trial, writable_ms, told_ms}'
  # Until every sentinel names the new master (bounded), then the killed
  # one comes back as its replica and the sentinels settle.
  local start=$SECONDS
  until [ "$(for p in "${sentinel_ports[@]}"; do sentinel_master_port "$p" "$group"; done | sort -u)" = "$replica" ]; do
    [ $((SECONDS - start)) -lt 60 ] || { echo "sentinels do not agree on $replica" >&2; return 1; }
    sleep 0.2
  done
  sentinel_restart_as_replica "$sdir" "$master" "$group" "${sentinel_ports[0]}"
  sentinel_settled "$group" 60 "${sentinel_ports[@]}"
  sleep "$settle_s"
}

echo "== starting quorate (in $qdir) and Redis Sentinel (in $sdir)"
q_healthy 60
sentinel_up "$sdir" "$group" "${redis_ports[@]}" "${sentinel_ports[@]}"
sleep "$settle_s"

for i in $(seq 1 "$trials"); do
  echo "== trial $i/$trials: quorate"
  q_trial "$i"
  echo "== trial $i/$trials: sentinel"
  s_trial "$i"
done

# -- medians and rows ----------------------------------------------------
python3 - "$trials_file" "$out" "redis-sentinel-$redis_version" <<'PY'
import json, sys
path, out, anchor_name = sys.argv[1], sys.argv[2], sys.argv[3]
trials = [json.loads(l) for l in open(path) if l.strip()]

def median(values):
    # Not seen within the timeout counts as the slowest.
    v = sorted(float("inf") if x is None else x for x in values)
    if not v:
        return None
    m = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return None if m == float("inf") else round(m, 1)

def of(system, key):
    return [t[key] for t in trials if t["system"] == system]

summary = {"trials_per_system": len(of("quorate", "writable_ms")), "anchor_name": anchor_name}
for system in ("quorate", "sentinel"):
    summary[system] = {k + "_p50": median(of(system, k)) for k in ("writable_ms", "told_ms", "told_sentinel_ms")}
    summary[system]["trials"] = {k: of(system, k) for k in ("writable_ms", "told_ms", "told_sentinel_ms")}
steps = ["verdict_down_seen", "leader_designating_log", "designated_seen", "agent_acquired_log",
         "agent_promoting_log", "lease_seen", "writable"]
summary["quorate"]["timeline_p50_ms"] = {
    s: median([t["timeline_ms"][s] for t in trials if t["system"] == "quorate"]) for s in steps}
json.dump(summary, open(out + "/failover-summary.json", "w"), indent=2)

fmt = lambda v: "null" if v is None else "%.1f" % v
rows = [
    ("failover_writable_p50_ms", summary["quorate"]["writable_ms_p50"], summary["sentinel"]["writable_ms_p50"],
     "<= 650 and <= 0.75x"),
    ("failover_told_p50_ms", summary["quorate"]["told_ms_p50"], summary["sentinel"]["told_ms_p50"], "<= 0.4x"),
]
with open(out + "/rows.tsv", "a") as f:
    for metric, q, a, goal in rows:
        f.write("\t".join([metric, fmt(q), fmt(a), anchor_name, goal]) + "\n")
for metric, q, a, goal in rows:
    print("%-26s quorate %8s  %s %8s  (goal %s)" % (metric, fmt(q), anchor_name, fmt(a), goal))
print("per trial (ms):")
for system in ("quorate", "sentinel"):
    for k, v in summary[system]["trials"].items():
        print("  %-8s %-17s %s" % (system, k, v))
print("quorate timeline p50 (ms after the kill):", json.dumps(summary["quorate"]["timeline_p50_ms"]))
PY
echo "rows appended to $out/rows.tsv; trials in $trials_file"

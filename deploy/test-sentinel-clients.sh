#!/usr/bin/env bash
# Unmodified Redis Sentinel clients against quorate's Sentinel-compatible
# endpoint: redis-py's `Sentinel`, ioredis in Sentinel mode (both in
# deploy/sentinel-clients/) and redis-rs's `sentinel::SentinelClient` (the
# quorate crate's example, src/quorate/examples/redis_rs_sentinel_client.rs)
# each discover the primary of a local managed pair (`quorate local up
# --redis-pair db`), write in a loop, and must write to the new primary
# within SENTINEL_CLIENT_BOUND_S (15) seconds of a kill -9 of the primary's
# host processes (data Redis, heartbeat Redis, agent).
# Prints kill -> first write for each client and exits non-zero past the
# bound. Then (SENTINEL_COMPARE=1, the default) the same clients and the same
# kill against real Redis Sentinel (3 sentinels, `redis-server --sentinel`,
# down-after-milliseconds 500, like quorate's default down_after_ms) on a
# primary/replica pair (deploy/bench/sentinel.sh starts them), and the
# numbers side by side (informational).
#
# env: QUORATE_BIN (default target/debug/quorate; built if missing),
#      REDIS_RS_CLIENT_BIN (default examples/redis_rs_sentinel_client beside
#      QUORATE_BIN; built with cargo if missing),
#      SENTINEL_CLIENT_DEPS (where redis-py and ioredis are installed;
#      default target/sentinel-clients), SENTINEL_CLIENT_BASE_PORT (28101),
#      SENTINEL_CLIENT_BOUND_S (15), SENTINEL_COMPARE (1), KEEP_WORK (0).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/deps.sh
source deploy/bench/sentinel.sh
need_redis_server

q=${QUORATE_BIN:-target/debug/quorate}
deps=${SENTINEL_CLIENT_DEPS:-target/sentinel-clients}
base=${SENTINEL_CLIENT_BASE_PORT:-28101}
bound_s=${SENTINEL_CLIENT_BOUND_S:-15}
compare=${SENTINEL_COMPARE:-1}
if [ ! -x "$q" ]; then
  cargo build -p quorate --locked
fi
q=$(realpath "$q")
rs_client=${REDIS_RS_CLIENT_BIN:-$(dirname "$q")/examples/redis_rs_sentinel_client}
if [ ! -x "$rs_client" ]; then
  cargo build --locked -p quorate --example redis_rs_sentinel_client
fi
if [ ! -x "$rs_client" ]; then
  # cargo built it into its own target directory, which is not QUORATE_BIN's.
  echo "no $rs_client after cargo build: set REDIS_RS_CLIENT_BIN, or CARGO_TARGET_DIR to QUORATE_BIN's" >&2
  exit 1
fi
rs_client=$(realpath "$rs_client")
mkdir -p "$deps"
deps=$(realpath "$deps")
work=$(mktemp -d)
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  "$q" local down --dir "$work/quorate" >/dev/null 2>&1 || true
  [ -z "${rs:-}" ] || sentinel_down "$rs"
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work dir kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

echo "== Sentinel clients: installing redis-py and ioredis if missing (into $deps)"
if ! PYTHONPATH="$deps/py" python3 -c 'import redis.sentinel' 2>/dev/null; then
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  # A target directory of its own; Debian's pip refuses even that without
  # the override (PEP 668), which touches nothing of the system's.
  python3 -m pip install -q --target "$deps/py" redis 2>/dev/null \
    || python3 -m pip install -q --break-system-packages --target "$deps/py" redis
fi
if ! command -v node >/dev/null 2>&1; then
  apt_install nodejs npm
fi
if [ ! -d "$deps/node/node_modules/ioredis" ]; then
  npm install --silent --no-audit --no-fund --prefix "$deps/node" ioredis >/dev/null
fi
export PYTHONPATH="$deps/py" NODE_PATH="$deps/node/node_modules"
echo "redis-py $(python3 -c 'import redis; print(redis.__version__)'), ioredis $(node -p 'require("ioredis/package.json").version'), node $(node --version), redis-rs $("$rs_client" --lib-version)"

# ok_lines FILE: successful writes so far.
ok_lines() {
  local n
  n=$(grep -c '"ok": *true' "$1" 2>/dev/null) || true
  echo "${n:-0}"
}

# first_write FILE KILL_T OLD_PORT: ms from KILL_T to the first successful
# write after it to another port than OLD_PORT (empty if none), and the
# failed writes in between.
first_write() {
  python3 - "$@" <<'PY'
import json, sys
path, kill, old = sys.argv[1], float(sys.argv[2]), sys.argv[3]
failed = 0
for line in open(path):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if d["t"] <= kill:
        continue
    if d["ok"] and not d.get("master", "").endswith(":" + old):
        print("%d %d" % (round((d["t"] - kill) * 1000), failed))
        break
    if not d["ok"]:
        failed += 1
PY
}

# master_port SENTINEL_ADDR: the port get-master-addr-by-name db answers.
master_port() {
  python3 - "$1" <<'PY'
import sys, redis
h, p = sys.argv[1].rsplit(":", 1)
print(redis.Redis(host=h, port=int(p), socket_timeout=1).sentinel_get_master_addr_by_name("db")[1])
PY
}

declare -A result
clients=(redis-py ioredis redis-rs)
# run_pass NAME SENTINELS VICTIMS_FUNCTION: starts the clients, waits for
# steady writes, kill -9s the primary's host processes (VICTIMS_FUNCTION
# PORT prints their pids), measures. The pids are found before the clock
# starts and the clock is bash's own ($EPOCHREALTIME), so that neither pass
# is charged for a helper process starting.
run_pass() {
  local name=$1 sentinels=$2 victims_fn=$3 c
  local out="$work/$name"
  mkdir -p "$out"
  python3 deploy/sentinel-clients/redis_py_client.py --sentinels "$sentinels" --group db --duration-s 90 \
    >"$out/redis-py.jsonl" 2>"$out/redis-py.err" &
  pids+=($!)
  node deploy/sentinel-clients/ioredis_client.js --sentinels "$sentinels" --group db --duration-s 90 \
    >"$out/ioredis.jsonl" 2>"$out/ioredis.err" &
  pids+=($!)
  "$rs_client" --sentinels "$sentinels" --group db --duration-s 90 \
    >"$out/redis-rs.jsonl" 2>"$out/redis-rs.err" &
  pids+=($!)
  local start=$SECONDS
  for c in "${clients[@]}"; do
    while [ "$(ok_lines "$out/$c.jsonl")" -lt 25 ]; do
      if [ $((SECONDS - start)) -gt 40 ]; then
        echo "$name: $c never wrote steadily; its output:" >&2
        tail -5 "$out/$c.jsonl" "$out/$c.err" >&2
        return 1
      fi
      sleep 0.2
    done
  done
  local old
  old=$(master_port "${sentinels%%,*}")
  local victims kill_t
  victims=$("$victims_fn" "$old")
  [ -n "$victims" ] || { echo "$name: no process serves port $old" >&2; return 1; }
  kill_t=$EPOCHREALTIME
  # shellcheck disable=SC2086
  kill -9 $victims
  echo "$name: killed the primary (port $old) at $kill_t"
  start=$SECONDS
  for c in "${clients[@]}"; do
    local r=""
    while [ -z "$r" ] && [ $((SECONDS - start)) -le $((bound_s + 1)) ]; do
      sleep 0.2
      r=$(first_write "$out/$c.jsonl" "$kill_t" "$old")
    done
    if [ -z "$r" ]; then
      result[$name,$c]="none"
      echo "$name: $c did not write to a new primary within ${bound_s}s; last lines:" >&2
      tail -3 "$out/$c.jsonl" >&2
    else
      result[$name,$c]=${r% *}
      echo "$name: $c: kill -9 -> first write to the new primary ${r% *} ms (${r#* } failed writes in between)"
    fi
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pids=()
}

echo "== quorate: local up --redis-pair db (base port $base), the Sentinel endpoint on every node"
"$q" local up --nodes 3 --dir "$work/quorate" --base-port "$base" --redis-pair db >/dev/null
sentinels=$(python3 -c 'import json,sys; print(",".join(n["sentinel_addr"] for n in json.load(open(sys.argv[1]))["nodes"]))' \
  "$work/quorate/cluster.json")
echo "sentinels: $sentinels"

# The member whose data Redis serves port $1: its data Redis, heartbeat
# Redis and agent (its whole host).
quorate_host_pids() {
  python3 - "$work/quorate/cluster.json" "$1" <<'PY'
import json, sys
f, port = json.load(open(sys.argv[1])), sys.argv[2]
for m in f["members"]:
    if m.get("data_redis_addr", "").endswith(":" + port):
        print(m["data_redis_pid"], m["heartbeat_redis_pid"], m["agent_pid"])
PY
}
run_pass quorate "$sentinels" quorate_host_pids

if [ "$compare" = 1 ]; then
  echo "== real Redis Sentinel: 3 sentinels (redis-server --sentinel) on a primary/replica pair"
  rs="$work/redis-sentinel"
  p1=$((base + 800)) p2=$((base + 801))
  sentinel_ports=($((base + 811)) $((base + 812)) $((base + 813)))
  rs_sentinels=$(printf '127.0.0.1:%s,' "${sentinel_ports[@]}")
  rs_sentinels=${rs_sentinels%,}
  # Until every sentinel knows the others and the replica (bounded).
  if ! sentinel_up "$rs" db "$p1" "$p2" "${sentinel_ports[@]}"; then
    echo "real Sentinel did not settle; skipping the comparison" >&2
    compare=0
  fi
  if [ "$compare" = 1 ]; then
    redis_primary_pid() { cat "$rs/$1.pid"; }
    run_pass redis-sentinel "$rs_sentinels" redis_primary_pid || compare=0
  fi
fi

echo
echo "== kill -9 of the primary -> first write to the new primary (ms)"
printf '%-10s %12s %16s\n' client quorate redis-sentinel
status=0
for c in "${clients[@]}"; do
  printf '%-10s %12s %16s\n' "$c" "${result[quorate,$c]:-none}" "${result[redis-sentinel,$c]:-n/a}"
  v=${result[quorate,$c]:-none}
  if [ "$v" = none ] || [ "$v" -gt $((bound_s * 1000)) ]; then
    status=1
  fi
done
if [ "$status" != 0 ]; then
  echo "FAILED: a client did not write to quorate's new primary within ${bound_s}s" >&2
fi
exit "$status"

#!/usr/bin/env bash
# The quick start: build quorate, start 3 coordinators and a failover group of
# two members (a heartbeat redis-server and an agent each), then:
#   1. pause one member's agent: every observer loses it, the verdict is DOWN;
#   2. resume it: UP again;
#   3. take a lease, kill -9 the Raft leader: a new leader answers with the
#      same holder and fencing epoch, and no verdict flips.
# Everything it starts is stopped on exit.
#
#   deploy/quickstart.sh [--keep-running]
#
# Needs the Rust toolchain; installs redis-server with apt-get if missing.
# Uses ports 7101-7103 and 7201-7202 (QUORATE_BASE_PORT moves them) and
# the directory .quorate-local/.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/deps.sh
keep=false
[ "${1:-}" = "--keep-running" ] && keep=true

base=${QUORATE_BASE_PORT:-7101}
dir=$PWD/.quorate-local
q=$PWD/target/release/quorate
export QUORATE_ENDPOINTS=127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
field() { python3 -c "import json,sys; d=json.load(open('$dir/cluster.json')); print($1)"; }
verdict() { "$q" matrix cache --json | python3 -c "import json,sys; print(json.load(sys.stdin)['verdicts']['$1']['state'])"; }
wait_verdict() { # member state
  local start=$(date +%s%N)
  for _ in $(seq 1 300); do
    [ "$(verdict "$1" 2>/dev/null)" = "$2" ] && { echo "$1 is $2 after $(( ($(date +%s%N) - start) / 1000000 )) ms"; return 0; }
    sleep 0.05
  done
  echo "$1 did not become $2" >&2; return 1
}

need_redis_server
say "building (cargo build --release)"
cargo build --release --locked -p quorate

paused=
holder_pid=
cleanup() {
  [ -n "$paused" ] && kill -CONT "$paused" 2>/dev/null || true
  [ -n "$holder_pid" ] && kill "$holder_pid" 2>/dev/null || true
  if ! $keep; then "$q" local down --dir "$dir" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

say "3 coordinators and group 'cache' (2 members): quorate local up --nodes 3 --group cache --members 2"
rm -rf "$dir"
"$q" local up --nodes 3 --dir "$dir" --base-port "$base" --group cache --members 2
# Every connection is mutual TLS: act as the admin identity local up issued.
export QUORATE_CA=$dir/tls/ca.crt QUORATE_CERT=$dir/tls/admin.crt QUORATE_KEY=$dir/tls/admin.key
"$q" status
wait_verdict cache-1 up >/dev/null; wait_verdict cache-2 up >/dev/null
"$q" matrix cache

agent=$(field "d['members'][0]['agent_pid']")
say "pausing cache-1's agent (SIGSTOP pid $agent): its heartbeat stops advancing"
kill -STOP "$agent"; paused=$agent
wait_verdict cache-1 down
"$q" matrix cache
"$q" explain cache cache-1

say "resuming it (SIGCONT)"
kill -CONT "$agent"; paused=
wait_verdict cache-1 up

say "a service takes the lease of group 'orders' and keeps renewing it (as local up's client identity)"
QUORATE_CERT=$dir/tls/client.crt QUORATE_KEY=$dir/tls/client.key \
  "$q" lease acquire orders --holder client@orders-svc-1 --ttl-ms 3000 > "$dir/holder.log" 2>&1 &
holder_pid=$!
sleep 1.5
"$q" lease get orders

leader=$("$q" status --json | python3 -c "import json,sys; print(json.load(sys.stdin)['leader'])")
pid=$(field "[n['pid'] for n in d['nodes'] if n['id']==$leader][0]")
say "kill -9 of the Raft leader (node $leader, pid $pid)"
kill -9 "$pid"
start=$(date +%s%N)
until out=$("$q" lease get orders 2>/dev/null); do sleep 0.02; done
echo "answered $(( ($(date +%s%N) - start) / 1000000 )) ms after the kill: $out"
sleep 1
"$q" status || true
say "the holder kept renewing through the leader change, and no verdict flipped:"
tail -n 3 "$dir/holder.log"
"$q" matrix cache

say "restarting the killed node on its data: quorate local up"
"$q" local up --nodes 3 --dir "$dir" --group cache --members 2 >/dev/null
"$q" status

if $keep; then
  say "the cluster keeps running; try:"
  echo "  export QUORATE_ENDPOINTS=$QUORATE_ENDPOINTS"
  echo "  export QUORATE_CA=$QUORATE_CA QUORATE_CERT=$QUORATE_CERT QUORATE_KEY=$QUORATE_KEY"
  echo "  $q matrix cache"
  echo "  $q watch cache"
  echo "  $q lease get orders --json"
  echo "  $q local down --dir $dir"
else
  say "done; stopping everything"
fi

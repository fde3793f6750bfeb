#!/usr/bin/env bash
# HAProxy in front of a managed Redis pair, routed by the agents' health
# endpoints (deploy/haproxy/haproxy.cfg): starts `quorate local up
# --redis-pair db`, checks the health endpoints with curl (200/503 on the
# primary's and the replica's agent, HEAD, /metrics on a node and an
# agent), starts haproxy with the shipped config on this run's ports, writes
# through it with redis-cli in a loop, kill -9s the primary's processes
# (agent, data Redis, heartbeat Redis; pids from cluster.json), and fails
# unless writes through HAProxy resume on the new primary within
# $QUORATE_HAPROXY_BOUND_S seconds (30 by default).
#
#   deploy/test-haproxy.sh
#
# Installs haproxy, redis-server, curl and jq with apt-get when missing.
# Uses ports QUORATE_HAPROXY_BASE_PORT (27401) and up, in a temporary
# directory; everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/deps.sh
need_redis_server
need_haproxy
need_cmd curl curl
need_cmd jq jq

base=${QUORATE_HAPROXY_BASE_PORT:-27401}
bound_s=${QUORATE_HAPROXY_BOUND_S:-30}
q=$PWD/target/debug/quorate
[ -x "$q" ] || cargo build --locked -p quorate --bin quorate
dir=$(mktemp -d)
haproxy_pid=
writer_pid=
cleanup() {
  [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null || true
  [ -n "$haproxy_pid" ] && kill "$haproxy_pid" 2>/dev/null || true
  "$q" local down --dir "$dir" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$dir"/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done
  exit 1
}

echo "== quorate local up --redis-pair db (base port $base)"
"$q" local up --redis-pair db --base-port "$base" --dir "$dir" >/dev/null
cj=$dir/cluster.json
member() { jq -r ".members[] | select(.id == \"$1\") | .$2" "$cj"; }
a1=$(member db-1 agent_http_addr)
a2=$(member db-2 agent_http_addr)
n1=$(jq -r '.nodes[0].http_addr' "$cj")
d1=$(member db-1 data_redis_addr)
d2=$(member db-2 data_redis_addr)
[ "$a1" != null ] && [ "$n1" != null ] || fail "cluster.json has no HTTP addresses"
code() { curl -s -o /dev/null -m 2 -w '%{http_code}' "$@" || true; }
wait_code() { # url want seconds
  for _ in $(seq 1 $(($3 * 10))); do
    [ "$(code "$1")" = "$2" ] && return 0
    sleep 0.1
  done
  fail "$1 did not answer $2 within $3 s (last: $(code "$1"))"
}

echo "== health endpoints"
wait_code "http://$a1/primary" 200 60
wait_code "http://$a2/replica" 200 60
[ "$(code "http://$a2/primary")" = 503 ] || fail "the replica's agent answers /primary with $(code "http://$a2/primary")"
[ "$(code "http://$a1/replica")" = 503 ] || fail "the primary's agent answers /replica"
[ "$(code -I "http://$a1/primary")" = 200 ] || fail "HEAD /primary on the primary's agent"
curl -s -m 2 "http://$a1/primary" | jq -e '.member == "db-1" and .holds_lease == true' >/dev/null ||
  fail "the /primary body: $(curl -s "http://$a1/primary")"
wait_code "http://$n1/readyz" 200 30
[ "$(code "http://$n1/livez")" = 200 ] || fail "/livez of node 1"
curl -s -m 2 "http://$n1/metrics" | grep -q '^quorate_raft_has_leader 1' || fail "node /metrics has no quorate_raft_has_leader 1"
curl -s -m 2 "http://$a1/metrics" | grep -q '^quorate_agent_serving_primary{.*} 1' ||
  fail "agent /metrics: $(curl -s "http://$a1/metrics" | head -20)"
echo "   /primary 200 on db-1 and 503 on db-2, /replica the opposite, HEAD, JSON, /readyz, /metrics: ok"

echo "== haproxy with deploy/haproxy/haproxy.cfg"
hw=$((base + 449))
hr=$((base + 450))
port() { echo "${1##*:}"; }
sed -e "s/127.0.0.1:7550/127.0.0.1:$hw/" -e "s/127.0.0.1:7551/127.0.0.1:$hr/" \
  -e "s/127.0.0.1:7301 check port 7801/$d1 check port $(port "$a1")/" \
  -e "s/127.0.0.1:7302 check port 7802/$d2 check port $(port "$a2")/" \
  deploy/haproxy/haproxy.cfg >"$dir/haproxy.cfg"
grep -q "check port $(port "$a2")" "$dir/haproxy.cfg" || fail "could not render the haproxy config"
haproxy -c -f "$dir/haproxy.cfg" >/dev/null || fail "haproxy -c rejects the config"
haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
haproxy_pid=$!
rcli() { timeout 2 redis-cli -h 127.0.0.1 -p "$@" 2>/dev/null || true; }
# HAProxy starts with every server up until its checks say otherwise
# (fall 2 x inter 500ms): until then a write may reach the replica, which
# refuses it (READONLY). Wait for ten writes in a row to succeed.
ok=0
for _ in $(seq 1 200); do
  if [ "$(rcli "$hw" set probe 1)" = OK ]; then ok=$((ok + 1)); else ok=0; fi
  [ "$ok" -ge 10 ] && break
  sleep 0.1
done
[ "$ok" -ge 10 ] || fail "no steady writes through haproxy on $hw: $(rcli "$hw" set probe 1)"

echo "== writes through haproxy, then kill -9 of the primary's processes"
: >"$dir/writes"
(
  i=0
  while true; do
    i=$((i + 1))
    if [ "$(rcli "$hw" set "k$i" "$i")" = OK ]; then echo "$(date +%s%N) $i" >>"$dir/writes"; fi
    sleep 0.05
  done
) &
writer_pid=$!
sleep 2
before=$(wc -l <"$dir/writes")
[ "$before" -gt 5 ] || fail "only $before writes in 2 s before the crash"
killed_at=$(date +%s%N)
for pid in $(member db-1 agent_pid) $(member db-1 data_redis_pid) $(member db-1 heartbeat_redis_pid); do
  kill -9 "$pid" 2>/dev/null || true
done
# A write that db-1 acknowledged just before it died can be logged just
# after the kill; none can be logged 500 ms after it (db-1 is gone, and
# db-2 refuses writes until it is promoted).
after=$((killed_at + 500000000))
resumed=
for _ in $(seq 1 $((bound_s * 10))); do
  first=$(awk -v t="$after" '$1 > t { print; exit }' "$dir/writes")
  if [ -n "$first" ]; then
    resumed=$(((${first%% *} - killed_at) / 1000000))
    break
  fi
  sleep 0.1
done
[ -n "$resumed" ] || fail "writes through haproxy did not resume within $bound_s s of the crash"
sleep 1
n=${first##* }
got=$(rcli "$(port "$d2")" get "k$n")
[ "$got" = "$n" ] || fail "write k$n acknowledged through haproxy is not on db-2 (got '$got')"
rcli "$(port "$d2")" info replication | grep -q '^role:master' || fail "db-2 is not master"
[ "$(code "http://$a2/primary")" = 200 ] || fail "db-2's agent does not answer /primary with 200"
echo "   writes resumed on db-2 through haproxy $resumed ms after the crash (bound ${bound_s} s)"
echo "haproxy failover test: 1 passed, 0 failed"

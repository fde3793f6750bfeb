#!/usr/bin/env bash
# The quick start: build quorate, start a local 3-node cluster, take a lease,
# kill -9 the Raft leader, and show that the lease (holder and fencing epoch)
# survives on the new leader. Everything it starts is stopped on exit.
#
#   deploy/quickstart.sh [--keep-running]
#
# Needs only the Rust toolchain (protoc is vendored). Uses ports 7101-7103
# (override with QUORATE_BASE_PORT) and the directory .quorate-local/.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false
[ "${1:-}" = "--keep-running" ] && keep=true

base=${QUORATE_BASE_PORT:-7101}
dir=$PWD/.quorate-local
q=$PWD/target/release/quorate
export QUORATE_ENDPOINTS=127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building (cargo build --release)"
cargo build --release --locked -p quorate

holder_pid=
cleanup() {
  [ -n "$holder_pid" ] && kill "$holder_pid" 2>/dev/null || true
  if ! $keep; then "$q" local down --dir "$dir" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

say "starting a 3-node cluster: quorate local up --nodes 3 --dir $dir --base-port $base"
rm -rf "$dir"
"$q" local up --nodes 3 --dir "$dir" --base-port "$base"

say "quorate status"
"$q" status

say "a service takes the lease of group 'orders' and keeps renewing it"
"$q" lease acquire orders --holder orders-svc-1 --ttl-ms 3000 > "$dir/holder.log" 2>&1 &
holder_pid=$!
sleep 1.5
"$q" lease get orders

leader=$("$q" status --json | sed -n 's/.*"leader":\([0-9]*\).*/\1/p')
pid=$(sed -n "/\"id\": $leader,/{n;s/.*\"pid\": \([0-9]*\).*/\1/p}" "$dir/cluster.json")
say "kill -9 of the Raft leader (node $leader, pid $pid)"
kill -9 "$pid"
start=$(date +%s%N)
until out=$("$q" lease get orders 2>/dev/null); do sleep 0.02; done
echo "answered $(( ($(date +%s%N) - start) / 1000000 )) ms after the kill: $out"
sleep 1
"$q" status || true

say "the holder kept renewing through the leader change:"
tail -n 4 "$dir/holder.log"

say "restarting the killed node on its data: quorate local up --dir $dir"
"$q" local up --nodes 3 --dir "$dir" >/dev/null
"$q" status

if $keep; then
  say "the cluster keeps running; try:"
  echo "  export QUORATE_ENDPOINTS=$QUORATE_ENDPOINTS"
  echo "  $q lease get orders --json"
  echo "  $q watch orders"
  echo "  $q local down --dir $dir"
else
  say "done; stopping everything"
fi

#!/usr/bin/env bash
# The cost of mutual TLS, side by side in one run (issue 11): `bench
# lease-get` at 1 and 64 clients against a local 3-node cluster on mutual
# TLS and one started --insecure, then the demo's failover time with TLS
# and with --insecure (RUNS times each, alternating). Builds a release
# binary; takes about 5 minutes. Ports 27701-27703, 27711-27713 and the
# demo's 27801-28002 (27101 + 700 and up).
#
#   deploy/bench-tls.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/deps.sh
need_redis_server
runs=${1:-3}
cargo build --release --locked -p quorate >&2
q=$PWD/target/release/quorate
work=$(mktemp -d)
trap '"$q" local down --dir "$work/tls" >/dev/null 2>&1 || true; "$q" local down --dir "$work/plain" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

"$q" local up --nodes 3 --dir "$work/tls" --base-port 27701 >/dev/null
"$q" --insecure local up --nodes 3 --dir "$work/plain" --base-port 27711 >/dev/null
tls_env=(QUORATE_ENDPOINTS=127.0.0.1:27701,127.0.0.1:27702,127.0.0.1:27703
  QUORATE_CA="$work/tls/tls/ca.crt" QUORATE_CERT="$work/tls/tls/reader.crt" QUORATE_KEY="$work/tls/tls/reader.key")
plain_env=(QUORATE_ENDPOINTS=127.0.0.1:27711,127.0.0.1:27712,127.0.0.1:27713 QUORATE_INSECURE=true)
bench() { env "$@" "$q" --json bench lease-get --clients "$clients" --duration-s "${BENCH_S:-10}"; }
field() { python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print(d$1)"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-34s %12s %12s %8s\n' "what" "mutual TLS" "--insecure" "TLS cost"
for clients in 1 64; do
  t=$(bench "${tls_env[@]}"); p=$(bench "${plain_env[@]}")
  # The cost: how much slower TLS is (fewer ops/s, longer latencies).
  for k in ops_per_s p50_ms p99_ms; do
    a=$(echo "$t" | field "['$k']"); b=$(echo "$p" | field "['$k']")
    row=$(python3 -c "a,b=$a,$b; k='$k'; c=(1-a/b) if k=='ops_per_s' else (a/b-1); f='{:.0f}' if k=='ops_per_s' else '{:.3f}'; print(f.format(a), f.format(b), f'{c*100:+.1f}%')")
    # shellcheck disable=SC2086
    printf '%-34s %12s %12s %8s\n' "lease-get, $clients clients, $k" $row
  done
done
"$q" local down --dir "$work/tls" >/dev/null
"$q" local down --dir "$work/plain" >/dev/null

tls_ms=(); plain_ms=()
for i in $(seq 1 "$runs"); do
  tls_ms+=("$("$q" demo --json --base-port 27801 --dir "$work/demo" | field "['failover_ms']")")
  plain_ms+=("$("$q" --insecure demo --json --base-port 27801 --dir "$work/demo" | field "['failover_ms']")")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
a=$(median "${tls_ms[@]}"); b=$(median "${plain_ms[@]}")
printf '%-34s %12s %12s %8s\n' "demo failover ms (median of $runs)" "$a" "$b" \
  "$(python3 -c "print(f'{($a/$b-1)*100:+.1f}%')")"
echo "demo failover ms, every run: TLS ${tls_ms[*]}; --insecure ${plain_ms[*]}"

#!/usr/bin/env bash
# The quorate-only figures of the README (no anchor): builds a
# release binary, starts a local 3-node cluster on ports 27101-27103, runs
# every benchmark, stops the cluster. Takes about five minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/lib/deps.sh
need_redis_server
cargo build --release --locked -p quorate
q=$PWD/target/release/quorate
dir=$(mktemp -d)
trap '"$q" local down --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
"$q" local up --nodes 3 --dir "$dir" --base-port 27101 >/dev/null
export QUORATE_ENDPOINTS=127.0.0.1:27101,127.0.0.1:27102,127.0.0.1:27103
# On mutual TLS, the default, as local up's client identity (it may read
# and hold leases, as client@INSTANCE).
export QUORATE_CA=$dir/tls/ca.crt QUORATE_CERT=$dir/tls/client.crt QUORATE_KEY=$dir/tls/client.key
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for c in 1 16 64; do "$q" bench lease-get --clients "$c" --duration-s 5; done
"$q" bench lease-get --clients 64 --duration-s 5 --consistency lease-read
"$q" bench lease-get --clients 64 --duration-s 5 --consistency stale
for c in 1 16 64; do "$q" bench acquire-renew --clients "$c" --duration-s 5; done
# The ingest benchmark plays thousands of members over a few connections,
# which only a plain-text cluster lets one process do (over TLS each member
# reports with its own certificate): it runs on a cluster started --insecure.
"$q" local down --dir "$dir" >/dev/null
rm -rf "$dir"
unset QUORATE_CA QUORATE_CERT QUORATE_KEY
export QUORATE_INSECURE=true
# 10,000 members in groups of 2 are 5,000 groups: above the default
# max_groups (2048), so these nodes take more (every node reads the file).
servers=$(mktemp)
trap '"$q" local down --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir" "$servers"' EXIT
echo 'max_groups = 20000' >"$servers"
QUORATE_SERVER_CONFIG=$servers "$q" local up --nodes 3 --dir "$dir" --base-port 27101 >/dev/null
for n in 1000 2000 4000 8000 10000; do "$q" bench ingest --members "$n" --duration-s 10; done

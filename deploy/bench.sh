#!/usr/bin/env bash
# The side-by-side benchmark: quorate against its anchors, on this machine,
# in one run, and one table with ratios and the goals. Usage:
#   deploy/bench.sh [OUT_DIR]        (default: a new directory under /tmp)
#
# Builds the release binary (unless SKIP_BUILD=1), installs what is missing
# (redis-server, which also runs Redis Sentinel; etcd-server, Debian's etcd
# 3.4; jq, curl, python3), then runs, each on its own local clusters, all
# stopped when it ends:
#   deploy/bench/throughput.sh    linearizable reads at 1, 8 and 64 clients
#                                 and renewals at 8, quorate vs etcd;
#   deploy/bench/leader-change.sh kill -9 of the Raft leader under readers,
#                                 quorate vs etcd (TRIALS, default 5);
#   deploy/bench/failover.sh      kill -9 of a Redis primary's host, quorate
#                                 vs Redis Sentinel (down-after 500 ms,
#                                 TRIALS, default 5);
#   deploy/bench/scale.sh         members kept fresh by 3 coordinators
#                                 (bench ingest at 10,000 members), vs the
#                                 1 s leases etcd's keep-alives sustain.
# Each appends its rows to OUT_DIR/rows.tsv; deploy/bench/table.py prints
# the table (also saved as OUT_DIR/table.md). About 10 minutes. The
# quorate-only figures (lease-read, stale reads, ingest) are
# deploy/bench/quorate-only.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d /tmp/quorate-bench.XXXXXX)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
: >"$out/rows.tsv"
source deploy/lib/deps.sh
need_cmd python3 python3
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --locked -p quorate
fi
export SKIP_BUILD=1 QUORATE_BIN=${QUORATE_BIN:-$PWD/target/release/quorate}
export QUORATE=$QUORATE_BIN
echo "== $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); results in $out"
echo "== throughput (quorate vs etcd)"
deploy/bench/throughput.sh "$out"
echo "== leader change (quorate vs etcd)"
deploy/bench/leader-change.sh "$out" 2> >(grep -v ' Killed ' >&2)
echo "== failover (quorate vs Redis Sentinel)"
deploy/bench/failover.sh "$out"
echo "== scale (quorate members kept fresh vs etcd keep-alives)"
deploy/bench/scale.sh "$out"
echo
python3 deploy/bench/table.py "$out" | tee "$out/table.md"

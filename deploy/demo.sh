#!/usr/bin/env bash
# The main job, on a fresh Debian machine with the Rust toolchain: installs
# redis-server if it is missing, builds quorate, and runs `quorate demo`:
# three coordinators and a managed Redis primary/replica pair, a fenced
# writer, a kill -9 failover, the old primary rejoining, a switchover back,
# and a short agent pause that must not fail over. Extra arguments go to
# `quorate demo` (--json, --keep-running, --base-port P, --dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/deps.sh
need_redis_server
cargo build --release --locked -p quorate >&2
exec target/release/quorate demo "$@"

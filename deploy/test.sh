#!/usr/bin/env bash
# The test command: unit, property, exhaustive and integration tests of the
# workspace. Works on a fresh Debian machine with only the Rust toolchain:
# it installs redis-server when it is missing (the integration tests start
# their own redis-server and `quorate` processes on free ports, in
# temporary directories); protoc is vendored.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/deps.sh
need_redis_server
cargo test --workspace --locked "$@"

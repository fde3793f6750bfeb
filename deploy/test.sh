#!/usr/bin/env bash
# The test command: unit, property and integration tests of the workspace.
# Works on a fresh Debian machine with only the Rust toolchain: protoc is
# vendored (protoc-bin-vendored), and the integration tests start their own
# `quorate server` processes on free ports in temporary directories.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"

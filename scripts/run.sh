#!/usr/bin/env bash
# Builds and runs flow-proxy with its embedded registry, installing HAProxy if missing.
# Extra arguments go to flow-proxy, e.g. `scripts/run.sh --http-port 8081`.
# The build command is the one haproxy/Dockerfile runs (tests/api/packaging.rs checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-haproxy.sh
cargo build --release --locked
exec target/release/flow-proxy "$@"

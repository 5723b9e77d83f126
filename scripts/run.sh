#!/usr/bin/env bash
# Builds and runs flow-proxy with its embedded registry, installing HAProxy if missing.
# Extra arguments go to flow-proxy, e.g. `scripts/run.sh --http-port 8081`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-haproxy.sh
exec cargo run --release -- "$@"

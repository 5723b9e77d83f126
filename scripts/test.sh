#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs HAProxy (and Pebble, for the ACME tests) if
# missing, then format, lint and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-haproxy.sh
scripts/install-chromium.sh
scripts/install-pebble.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --lib --test api

#!/usr/bin/env bash
# Installs Debian's pebble package (Let's Encrypt's test ACME server, with pebble-challtestsrv)
# when it is not on PATH yet; tests/api/acme.rs runs both on loopback.
set -euo pipefail
# Debian installs the binaries under /usr/bin; some releases only under /usr/lib/go/bin.
if command -v pebble >/dev/null 2>&1 && command -v pebble-challtestsrv >/dev/null 2>&1; then
    exit 0
fi
sudo_if_needed=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_if_needed=(sudo)
fi
if command -v apt-get >/dev/null 2>&1; then
    "${sudo_if_needed[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_if_needed[@]}" apt-get install -y -qq pebble >/dev/null
else
    echo "pebble missing and this script only knows apt-get: install Let's Encrypt's pebble and pebble-challtestsrv yourself." >&2
    exit 1
fi
command -v pebble >/dev/null 2>&1 || { echo "the pebble package installed no pebble on PATH" >&2; exit 1; }
command -v pebble-challtestsrv >/dev/null 2>&1 || { echo "the pebble package installed no pebble-challtestsrv on PATH" >&2; exit 1; }

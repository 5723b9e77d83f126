#!/usr/bin/env bash
# Installs HAProxy from the OS packages when it is not on PATH yet (Debian/Ubuntu: apt-get).
set -euo pipefail
if command -v haproxy >/dev/null 2>&1; then
    exit 0
fi
sudo_if_needed=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_if_needed=(sudo)
fi
if command -v apt-get >/dev/null 2>&1; then
    "${sudo_if_needed[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_if_needed[@]}" apt-get install -y -qq haproxy >/dev/null
else
    echo "HAProxy is missing and this script only knows apt-get: install haproxy (2.6 or later) yourself." >&2
    exit 1
fi
# The package may start its own haproxy service; flow-proxy runs its own HAProxy.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet haproxy 2>/dev/null; then
    "${sudo_if_needed[@]}" systemctl stop haproxy || true
fi
haproxy -v | head -n 1

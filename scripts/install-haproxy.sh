#!/usr/bin/env bash
# Installs HAProxy, and curl (examples/blue-green.sh, which a test runs, needs it), from the OS
# packages when they are not on PATH yet (Debian/Ubuntu: apt-get).
set -euo pipefail
missing=()
for tool in haproxy curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
sudo_if_needed=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_if_needed=(sudo)
fi
if command -v apt-get >/dev/null 2>&1; then
    "${sudo_if_needed[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_if_needed[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "${missing[*]} missing and this script only knows apt-get: install them yourself (HAProxy 2.6 or later)." >&2
    exit 1
fi
# The package may start its own haproxy service; flow-proxy runs its own HAProxy.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet haproxy 2>/dev/null; then
    "${sudo_if_needed[@]}" systemctl stop haproxy || true
fi
haproxy -v | head -n 1

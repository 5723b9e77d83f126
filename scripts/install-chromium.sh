#!/usr/bin/env bash
# Installs Chromium from the OS packages when it is not on PATH yet (Debian/Ubuntu: apt-get). The
# status page's test (tests/api/status_page.rs) loads the page in headless Chromium.
set -euo pipefail
for candidate in chromium chromium-browser; do
    if command -v "$candidate" >/dev/null 2>&1; then
        exit 0
    fi
done
sudo_if_needed=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_if_needed=(sudo)
fi
if command -v apt-get >/dev/null 2>&1; then
    "${sudo_if_needed[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_if_needed[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
    echo "chromium missing and this script only knows apt-get: install Chromium yourself." >&2
    exit 1
fi
chromium --version

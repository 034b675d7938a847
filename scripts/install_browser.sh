#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium (and its WebDriver) for the web-page tests in
# tests/serve. Idempotent: does nothing when /usr/bin/chromium is already there. Playwright drives
# this system browser (`executable_path=/usr/bin/chromium`); `playwright install` is never run, since
# it would download a browser build of its own.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no apt-get on this machine; install chromium by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install_browser.sh: not root and no sudo; cannot install chromium" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-liberation
echo "installed $(chromium --version)"

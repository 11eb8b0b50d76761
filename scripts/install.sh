#!/usr/bin/env bash
# One-command install for a fresh machine (Python 3.11, CPU only is fine).
# torch is pinned to the CPU build that pip finds locally; everything else comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[dev]"
# The browser test drives Debian's Chromium headless; skip quietly where apt is unavailable.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "install.sh: chromium not installed; the browser test will be skipped"
fi

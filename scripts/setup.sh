#!/usr/bin/env bash
# One-step set-up on a fresh Debian machine: system library for the Mooncake client, then the
# package with pinned versions (torch 2.13.0 is the CPU build; an unpinned torch pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq libibverbs1) >/dev/null 2>&1 \
      || echo "setup: could not install libibverbs1; the Mooncake tier will not load" >&2
  else
    echo "setup: libibverbs1 is missing (needed by the Mooncake tier): apt-get install libibverbs1" >&2
  fi
fi
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,store,bench]"

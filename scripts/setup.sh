#!/usr/bin/env bash
# Set up a virtual environment in .venv with dota and everything it runs on.
#   bash scripts/setup.sh          # runtime: dota, torch 2.13.0 (CPU), Ray, CT readers, MCsquare
#   bash scripts/setup.sh --dev    # + test tools (pytest, pymedphys) and headless Chromium if missing
# Idempotent: re-running only installs what is missing. Users with a GPU may install their own torch
# build first (pip install torch==... --index-url ...); the pin below keeps the CPU build otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  # pinned: a plain 'torch' requirement would pull a multi-GB CUDA build
  python -m pip install -q "torch==2.13.0"
fi
if [ "$DEV" = 1 ]; then
  echo "[setup] installing dota-dose with the dev extras"
  python -m pip install -q -e ".[dev]"
else
  echo "[setup] installing dota-dose"
  python -m pip install -q -e ".[ray,ct]"
fi
echo "[setup] installing the MCsquare Monte Carlo engine (from the opentps-core wheel on PyPI)"
dota mcsquare install || echo "[setup] warning: MCsquare could not be installed; 'dota generate --engine mcsquare' will say why"
if [ "$DEV" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for the report's browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[setup] warning: chromium could not be installed; browser tests will be skipped"
  else
    echo "[setup] note: chromium not found and not root; browser tests will be skipped"
  fi
fi
echo "[setup] done: activate with '. .venv/bin/activate'"

#!/usr/bin/env bash
# Install mcit and its dependencies into a virtual environment (./.venv unless one is active). Idempotent.
# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
if ! python -c "import mcit, peft, deepspeed, pycocoevalcap, pytest, pytest_timeout, importlinter" 2>/dev/null; then
  python -m pip install --quiet -e ".[test]"
fi

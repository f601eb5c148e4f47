#!/usr/bin/env bash
# README command 1: install, then run the quickstart recipe end to end on CPU (SynthCIT-mini, tiny base).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -z "${VIRTUAL_ENV:-}" ] && source .venv/bin/activate
mcit train recipes/synthcit/quickstart.yaml "$@"

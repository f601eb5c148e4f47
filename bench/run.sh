#!/usr/bin/env bash
# Run every benchmark (quality at `small` size, 39 minutes measured on 2 free cores) and write docs/BENCHMARKS.md.
# Extra arguments go to `python -m bench` (e.g. `bash bench/run.sh quality --quality full`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && source .venv/bin/activate
python -m bench "$@"

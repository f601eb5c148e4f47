#!/usr/bin/env bash
# README command 2: install, then run the whole test suite (2 workers). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -z "${VIRTUAL_ENV:-}" ] && source .venv/bin/activate
lint-imports  # the layers contract in pyproject.toml: an upward import fails here
set +e
python -m pytest -n 2 --durations=15 "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$code"

#!/usr/bin/env bash
# lmms-eval interoperability (docs/EXPORT.md): lmms-eval in its own virtual environment (./.venv-lmms), so its pins
# (filelock < 4, no torchvision beside a CPU torch) never change the main one; then the tests that run its command
# line offline on exports of a tiny run. Idempotent; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-lmms/bin/python ]; then
  python3 -m venv .venv-lmms
fi
py=.venv-lmms/bin/python
if ! "$py" -c "import lmms_eval, mcit, decord, pytest_timeout" 2>/dev/null; then
  "$py" -m pip install --quiet "torch==2.13.0"
  "$py" -m pip install --quiet -e ".[test]" torch==2.13.0
  "$py" -m pip install --quiet "lmms-eval==0.7.3" torch==2.13.0 decord "filelock<4"
  "$py" -m pip uninstall --quiet -y torchvision || true  # a CUDA build that fails to import beside a CPU torch
fi
MCIT_REQUIRE_LMMS_EVAL=1 exec "$py" -m pytest -p no:cacheprovider -q tests/export/test_lmms_eval.py "$@"

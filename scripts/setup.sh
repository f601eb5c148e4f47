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

# Caption scoring runs pycocoevalcap's PTBTokenizer and METEOR, both java programs (the papers' numbers come from
# them; mcit has no Python stand-in). Install Debian's headless JRE where we may; otherwise say what is missing.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}
if ! command -v java >/dev/null 2>&1; then
  if [ -r /etc/debian_version ] && command -v apt-get >/dev/null 2>&1 \
      && { [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; }; then
    if ! apt-cache show default-jre-headless >/dev/null 2>&1; then
      as_root apt-get update -qq || true  # package lists missing or stale; the install below reports the outcome
    fi
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        default-jre-headless; then
      echo "setup: installing default-jre-headless failed; caption scoring (PTBTokenizer, METEOR) needs java" >&2
    fi
  else
    echo "setup: java not found; caption scoring (pycocoevalcap PTBTokenizer, METEOR) needs java: install a Java" \
         "runtime (e.g. Debian's default-jre-headless)" >&2
  fi
fi

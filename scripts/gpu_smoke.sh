#!/usr/bin/env bash
# GPU smoke test: the real device path on one CUDA GPU, in under 6 minutes. One line per check: PASS/FAIL name (s).
#   1-2  single process, 2 SynthCIT tasks: lora_ft and disco (model placed on the GPU, bf16 autocast on CUDA)
#   3    mcit eval of a stage checkpoint          4  mcit export of the run's adapter
#   5-6  1-process DeepSpeed on NCCL at ZeRO-2 and ZeRO-3 (mcit launch --nproc 1)
#   7    lora_ft on builtin:tiny-qwen2vl (another family: variable image-token counts, image_grid_thw, 3-D RoPE)
#   with MCIT_SMOKE_BENCH=1, then: the training bench on the GPU (bench.train_speed: matmul peak, mcit at the shipped
#   width and at a 1024-wide random-init base with FLOPs counted, the tuned Trainer at 1024), JSON under $OUT/bench
# Needs only this checkout and the Python of the GPU machine (torch with CUDA, transformers, peft). Packages that
# are missing there (deepspeed, ...) are installed from a wheel folder carried with the checkout, never a network:
#   here:   bash scripts/gpu_smoke.sh --wheels-only   (fills .gpu-wheels/ for the GPU machine's Python)
#   there:  bash scripts/gpu_smoke.sh                 (uses .gpu-wheels/ when something is missing)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHEELS=${MCIT_WHEELS:-$ROOT/.gpu-wheels}
PY=${MCIT_PYTHON:-python3}  # GPU machines' images often have python3 only

if [ "${1:-}" = "--wheels-only" ]; then  # run where an index is reachable; PY_VERSION: the GPU machine's (e.g. 3.11)
  mkdir -p "$WHEELS"
  DS_BUILD_OPS=0 python -m pip wheel --no-deps -w "$WHEELS" "deepspeed==$(python -c 'import deepspeed; print(deepspeed.__version__)')"
  python -m pip download --only-binary=:all: --python-version "${PY_VERSION:-3.11}" --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d "$WHEELS" \
    pycocoevalcap sacrebleu sentencepiece datasets matplotlib tensorboard hjson ninja py-cpuinfo msgpack pydantic einops
  exit $?
fi

OUT=${MCIT_SMOKE_OUT:-$(mktemp -d /tmp/mcit-gpu-smoke.XXXX)}
mkdir -p "$OUT"
export MCIT_CACHE=$OUT/cache PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
failures=0
check() {  # check NAME COMMAND...: run, print one line, keep the log
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - t0)) s)"
  else
    echo "FAIL $name ($((SECONDS - t0)) s): tail of $OUT/$name.log"; tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
    failures=$((failures + 1))
  fi
}
mcit() { "$PY" -m mcit "$@"; }

# what the checks below import (caption metrics and `datasets` are not on their path)
missing=$("$PY" - <<'PY'
import importlib.util
names = {"deepspeed": "deepspeed", "sacrebleu": "sacrebleu", "sentencepiece": "sentencepiece",
         "matplotlib": "matplotlib", "tensorboard": "tensorboard"}
print(" ".join(p for m, p in names.items() if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  check install "$PY" -m pip install --no-index --find-links "$WHEELS" $missing
fi

check environment "$PY" - <<'PY'
import os, torch, transformers, peft
cpu = os.environ.get("MCIT_SMOKE_ALLOW_CPU") == "1"  # a dry run of this script on a machine without a GPU
assert cpu or torch.cuda.is_available(), "no CUDA GPU visible"
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (MCIT_SMOKE_ALLOW_CPU=1)"
print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, name)
PY
echo "     $(tail -n 1 "$OUT/environment.log")"
check synthcit mcit data build synthcit
on_gpu() {  # on_gpu RUN: the run's model computed on a GPU and the run finished
  "$PY" - "$1" <<'PY'
import json, os, sys
log = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl")]
device = [r for r in log if r["event"] == "device"]
assert device and (device[0]["device"].startswith("cuda") or os.environ.get("MCIT_SMOKE_ALLOW_CPU") == "1"), device
results = json.load(open(f"{sys.argv[1]}/results.json"))
assert all(row is not None for row in results["matrix"]), results["matrix"]
print("final row", results["matrix"][-1])
PY
}
train_on_gpu() { local run=$1; shift; mcit train recipes/smoke/gpu.yaml output_dir="$run" "$@" && on_gpu "$run"; }
check lora_ft train_on_gpu "$OUT/lora_ft" method.name=lora_ft
check disco train_on_gpu "$OUT/disco" method.name=disco
check eval mcit eval --checkpoint "$OUT/lora_ft/checkpoints/stage-02-mc-color" --benchmark synthcit-mini \
  --tasks shape --output "$OUT/eval"
check export mcit export "$OUT/lora_ft" --out "$OUT/export"
CPU_FLAG=$([ "${MCIT_SMOKE_ALLOW_CPU:-}" = 1 ] && echo --cpu)
launch_on_gpu() { local run=$1 zero=$2; mcit launch recipes/smoke/gpu.yaml output_dir="$run" \
  train.deepspeed="$zero" model.dtype=bf16 $CPU_FLAG --nproc 1 --master-port $((29500 + RANDOM % 1000)) && on_gpu "$run"; }
check deepspeed_zero2 launch_on_gpu "$OUT/zero2" zero2
check deepspeed_zero3 launch_on_gpu "$OUT/zero3" zero3
check qwen2vl train_on_gpu "$OUT/qwen2vl" method.name=lora_ft model.name_or_path=builtin:tiny-qwen2vl

if [ "${MCIT_SMOKE_BENCH:-}" = 1 ]; then
  bench() { local name=$1; shift; "$PY" -m bench.train_speed "$@" --out "$OUT/bench/$name.json"; }  # bench NAME SIDE ...
  check bench_peak bench peak peak --sizes 1024,4096,8192
  check bench_trainer_tuned_w1024 bench trainer_tuned_w1024 trainer-tuned --steps 40 --batch 32 --width 1024
  check bench_mcit_w1024 bench mcit_w1024 mcit --autocast bf16 --steps 40 --batch 32 --width 1024 --flops
  check bench_trainer_tuned_shipped bench trainer_tuned_shipped trainer-tuned --steps 40 --batch 32
  check bench_mcit_shipped bench mcit_shipped mcit --autocast bf16 --steps 40 --batch 32 --flops
  check bench_mcit_w1024_b128 bench mcit_w1024_b128 mcit --autocast bf16 --steps 20 --batch 128 --width 1024 --flops
fi
echo "logs: $OUT   failures: $failures"
exit $((failures > 0))

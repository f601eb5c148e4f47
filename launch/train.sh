#!/usr/bin/env bash
# Start `python -m mcit train` under the DeepSpeed launcher: N processes on this node (GPUs, or CPU with gloo),
# or one share of a multi-node job. All arguments go to `mcit train` unchanged. See docs/DISTRIBUTED.md.
#
#   launch/train.sh recipes/x.yaml train.deepspeed=zero3                        # this node, every GPU (or 2 CPU procs)
#   NPROC=2 launch/train.sh ...                                                 # processes on this node
#   HOSTFILE=launch/hostfile launch/train.sh ...                                # all nodes via passwordless ssh + pdsh
#   HOSTFILE=launch/hostfile NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/train.sh   # run on each node yourself (no ssh)
#
# Environment: NPROC, MASTER_PORT (default 29500; pick another when two jobs share a host), MASTER_ADDR, HOSTFILE,
# NODE_RANK, SCRIPT (a .py file to run instead of the mcit module), DS_ACCELERATOR (cpu is set automatically
# when torch sees no GPU), OMP_NUM_THREADS (default on CPU: cores / NPROC).
set -euo pipefail

PYTHON="${PYTHON:-python}"
DEEPSPEED="${DEEPSPEED:-$(dirname "$(command -v "$PYTHON")")/deepspeed}"
[ -x "$DEEPSPEED" ] || DEEPSPEED=deepspeed
MASTER_PORT="${MASTER_PORT:-29500}"

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ "${DS_ACCELERATOR:-}" = "cpu" ] || [ "$GPUS" = "0" ]; then
  export DS_ACCELERATOR=cpu
  NPROC="${NPROC:-2}"
  # Each rank would otherwise use every core and the ranks would compete for them.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
else
  NPROC="${NPROC:-$GPUS}"
fi

# mcit reads LOCAL_RANK from the environment, so the launcher must not append --local_rank to its arguments.
ARGS=(--master_port "$MASTER_PORT" --no_local_rank)
if [ -n "${HOSTFILE:-}" ]; then
  ARGS+=(--hostfile "$HOSTFILE")
  [ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
  if [ -n "${NODE_RANK:-}" ]; then
    [ -n "${MASTER_ADDR:-}" ] || { echo "NODE_RANK needs MASTER_ADDR (the address of node 0)" >&2; exit 2; }
    ARGS+=(--no_ssh --node_rank "$NODE_RANK")
  fi
else
  ARGS+=(--num_gpus "$NPROC")
fi

if [ -n "${SCRIPT:-}" ]; then
  exec "$DEEPSPEED" "${ARGS[@]}" "$SCRIPT" "$@"
fi
exec "$DEEPSPEED" "${ARGS[@]}" --module mcit train "$@"

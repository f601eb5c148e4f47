"""Ranks and the process group: who am I, how many are we, wait for the others, end the job when one rank fails.

Every part of mcit that needs to know about other processes asks this module, so the same code runs as one plain
process, under `deepspeed --num_gpus N` on GPUs (NCCL), and under the same launcher on CPU with gloo
(docs/DISTRIBUTED.md). A rank that raises must end the job rather than leave its peers waiting in a collective:
`exit_on_error`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch

# Variables the deepspeed launcher (and torchrun) set for every process it starts.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")

def launched() -> bool:
    """True in a process started by the deepspeed launcher or torchrun (all of their variables are set)."""
    return all(key in os.environ for key in _LAUNCHER_ENV)


def is_distributed() -> bool:
    """True once a process group with more than one rank is up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def rank() -> int:
    """Global rank: from the process group once it is up, else from the launcher's RANK, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """Rank within this node (selects the GPU); the launcher's LOCAL_RANK, else 0."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """Number of ranks: from the process group once it is up, else from the launcher's WORLD_SIZE, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0: the only rank that writes files, logs and results."""
    return rank() == 0


def barrier() -> None:
    """Wait for all ranks; a no-op in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def collective_device() -> torch.device:
    """Where the process group's tensors must live: this rank's GPU under NCCL (which has no CPU path), else CPU."""
    if (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_backend() == "nccl"):
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def mean_across_ranks(value: float) -> float:
    """The mean of a Python number over all ranks (collective; the value itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / torch.distributed.get_world_size()


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable Python data, never tensors of a model), in rank order, on every rank
    (collective; `[value]` when not distributed). The objects travel through the backend's device (NCCL: this
    rank's GPU)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def on_main(compute: Callable[[], Any]) -> Any:
    """`compute()` run by the main rank alone, its value returned on every rank (collective). For work every rank
    would otherwise repeat with the same result and a real cost per process: caption scoring starts two java
    processes (METEOR holds 2 GB), which eight ranks of a node would each start at once."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return compute()
    return all_gather_objects(compute() if is_main() else None)[0]


def _timeout() -> timedelta:
    # One knob for how long a rank waits in a collective before giving up: DeepSpeed's DEEPSPEED_TIMEOUT (minutes),
    # overridable in seconds by MCIT_DIST_TIMEOUT_S (tests use a short one).
    if "MCIT_DIST_TIMEOUT_S" in os.environ:
        return timedelta(seconds=float(os.environ["MCIT_DIST_TIMEOUT_S"]))
    return timedelta(minutes=int(os.environ.get("DEEPSPEED_TIMEOUT", 10)))


def init_distributed() -> bool:
    """Join the process group the launcher described; return whether this process is part of one.

    A plain `python -m mcit train` (no RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK) is a no-op and returns
    False. Under `deepspeed` or `torchrun` the group uses NCCL on CUDA and gloo on CPU (set DS_ACCELERATOR=cpu to
    force CPU). Waiting in a collective gives up after DEEPSPEED_TIMEOUT minutes (default 10) or MCIT_DIST_TIMEOUT_S
    seconds. Calling it twice is harmless.
    """
    if not launched():
        return False
    if torch.distributed.is_initialized():
        return True
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's accelerator (DS_ACCELERATOR, else detected) decides, so that a CPU run on a GPU host stays on CPU.
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        _prepare_cpu_ranks()
        backend = "gloo"  # DeepSpeed would pick oneCCL when its bindings are installed; gloo needs nothing
    else:
        accelerator.set_device(local_rank())
        backend = accelerator.communication_backend_name()  # nccl on CUDA
    deepspeed.init_distributed(dist_backend=backend, timeout=_timeout(), verbose=False)
    return True


def _prepare_cpu_ranks() -> None:
    import deepspeed.ops

    # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce at process-group creation (~40 s with gcc on first
    # use, cached under ~/.cache/torch_extensions). Only tensor-parallel inference uses it, never ZeRO training, so
    # skip it unless asked for. Editing this dict is how DeepSpeed itself caches the probe.
    if os.environ.get("MCIT_DS_SHM_COMM", "0") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Every rank would otherwise start one thread per core and the ranks would fight over the same cores.
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """End this process at once, with exit status 1, when the body raises; wrap the whole entrypoint in it.

    A rank that raises while its peers wait in a collective would otherwise leave them hanging until the process
    group timeout. The deepspeed launcher (and torchrun) kill every rank as soon as one exits non-zero, so exiting
    promptly is enough; `os._exit` skips interpreter teardown, which can itself block on the process group.
    Outside a launched job the exception propagates unchanged.
    """
    try:
        yield
    except SystemExit as stop:
        if not launched() or stop.code in (None, 0):
            raise
        _die(f"exited with {stop.code!r}", stop.code if isinstance(stop.code, int) else 1)
    except BaseException:  # any failure on one rank, KeyboardInterrupt included, must end the whole job
        if not launched():
            raise
        _die(traceback.format_exc(), 1)


def _die(message: str, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"[mcit rank {rank()}/{world_size()}] fatal error, ending the job:\n{message}\n")
    sys.stderr.flush()
    os._exit(code)

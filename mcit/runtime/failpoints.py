"""Failpoints: crash a run at an exact point, so the reliability tests can prove that a crash there costs nothing.

A failpoint is a named line in the code (`failpoints.hit("checkpoint.write")`). It does nothing unless the variable
`MCIT_FAILPOINT` names it:

    MCIT_FAILPOINT=checkpoint.write:2            SIGKILL this process the 2nd time a checkpoint is about to be renamed
    MCIT_FAILPOINT=train.step:3@rank1:raise      raise on rank 1 only, after its 3rd optimizer step
    MCIT_FAILPOINT=checkpoint.write:4:enospc     fail that write as a full disk would (OSError ENOSPC)
    MCIT_FAILPOINT=eval.task:3,train.step:9      several, comma-separated

Grammar: `NAME:COUNT[@rankR][:ACTION]`, ACTION one of `kill` (default; SIGKILL, nothing is flushed or cleaned up,
exactly like `kill -9` or the out-of-memory killer), `raise` (RuntimeError) and `enospc`. COUNT counts the hits of
NAME in this process. The rank is the launcher's `RANK` variable (0 outside a launched job).

Points in the code: `train.step` (after an optimizer step, mcit/train/loop.py), `eval.task` (after one task of an
evaluation row is scored and its predictions written, mcit/evaluation/evaluate.py), `checkpoint.write` (every file
and the manifest of a checkpoint written and fsynced, before the rename that publishes it, mcit/runs/checkpoint.py),
`suite.cell` (after a cell of `mcit eval SUITE --checkpoints ...` is written, mcit/workflows/suite.py).
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

from mcit.errors import McitError

ENV = "MCIT_FAILPOINT"
ACTIONS = ("kill", "raise", "enospc")

_hits: dict[str, int] = {}


class FailpointError(RuntimeError):
    """The failure a `raise` failpoint injects (deliberately not an McitError: it stands for an unexpected bug)."""


@dataclass(frozen=True)
class Failpoint:
    name: str
    count: int
    rank: int | None
    action: str


def parse(spec: str) -> list[Failpoint]:
    """The failpoints of an `MCIT_FAILPOINT` value; a malformed value is an error naming the bad part."""
    points = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        pieces = part.split(":")
        if len(pieces) not in (2, 3) or not pieces[0]:
            raise McitError(f"{ENV}: {part!r} is not NAME:COUNT[@rankR][:ACTION] (e.g. checkpoint.write:2)")
        name, where = pieces[0], pieces[1]
        action = pieces[2] if len(pieces) == 3 else "kill"
        count_text, _, rank_text = where.partition("@")
        if not count_text.isdigit() or int(count_text) < 1:
            raise McitError(f"{ENV}: {part!r}: COUNT must be a positive integer, got {count_text!r}")
        if rank_text and not (rank_text.startswith("rank") and rank_text[4:].isdigit()):
            raise McitError(f"{ENV}: {part!r}: expected @rankN after the count, got @{rank_text}")
        if action not in ACTIONS:
            raise McitError(f"{ENV}: {part!r}: unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
        points.append(Failpoint(name, int(count_text), int(rank_text[4:]) if rank_text else None, action))
    return points


def hit(name: str) -> None:
    """Mark that the code reached failpoint `name`; fail here if `MCIT_FAILPOINT` asks for this hit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _hits[name] = _hits.get(name, 0) + 1
    rank = int(os.environ.get("RANK", "0") or 0)
    for point in parse(spec):
        if point.name != name or point.count != _hits[name] or point.rank not in (None, rank):
            continue
        where = f"failpoint {name} (hit {point.count}, rank {rank})"
        if point.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if point.action == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {where})")
        raise FailpointError(f"injected failure at {where}")

"""log.jsonl (every event of a run) and TensorBoard scalars, written by the main process only."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mcit.runtime import dist


class RunLog:
    def __init__(self, log_file: Path, tensorboard_dir: Path):
        self.enabled = dist.is_main()
        self.path = Path(log_file)
        self.tb = None
        if self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and record.get("event") == "train":
            self.tb.add_scalar(f"loss/{record['task']}", record["loss"], record["step"])
            self.tb.add_scalar(f"lr/{record['task']}", record["lr"], record["step"])
        if self.tb is not None and record.get("event") == "eval":
            self.tb.add_scalar(f"eval/{record['task']}", record["score"], record.get("stage", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

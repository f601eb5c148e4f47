"""Recipe files for tests that run `mcit train` (in a subprocess or through ContinualRunner): a fast recipe over the
small SynthCIT that `conftest.synthcit_root` builds. A fixture module, imported by tests; it holds no tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_recipe(path: Path, root: Path, **sections) -> Path:
    """A fast test recipe over the small SynthCIT: tiny base, 2 tasks by default, few steps. A section given as a dict
    updates that section's defaults key by key; anything else replaces it."""
    data = {
        "name": sections.pop("name", "test"), "output_dir": str(sections.pop("output_dir", path.parent / "run")),
        "seed": 0,
        "model": {"name_or_path": "builtin:tiny-llava", "autocast": "bf16"},
        "benchmark": {"card": "synthcit-mini", "root": str(root), "tasks": ["shape", "mc-color"], "max_train": 64,
                      "max_test": 16},
        "method": {"name": "lora_ft", "lora": {"r": 4, "alpha": 8}},
        "train": {"batch_size": 16, "lr": 1e-3, "save_steps": 2, "log_steps": 1, "max_length": 128},
        "eval": {"batch_size": 32, "max_new_tokens": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path

"""Optimizer state without pickle: tensors to safetensors, the structure to JSON (step checkpoints)."""

from __future__ import annotations

from typing import Any

import torch


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, layout = {}, {}
    for index, entries in state["state"].items():
        layout[str(index)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
                layout[str(index)][key] = "tensor"
            else:
                layout[str(index)][key] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"state": layout, "param_groups": groups}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    state = {}
    for index, entries in meta["state"].items():
        state[int(index)] = {key: tensors[f"{index}.{key}"] if value == "tensor" else value
                             for key, value in entries.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

"""A GPU that is not there: tensors "on cuda:0" that compute on the CPU and refuse to meet CPU tensors.

Inside `simulated_cuda()`, every tensor placed on a CUDA device (a factory call with `device="cuda..."`, `.to(cuda)`,
`.cuda()`, `module.to(cuda)`) is a CPU tensor of the subclass `SimulatedCudaTensor`, whose `.device` says `cuda:0`.
Any operation that mixes such a tensor with a plain CPU tensor of one or more dimensions raises, with the message a
real GPU gives ("Expected all tensors to be on the same device"). Zero-dimensional CPU tensors may mix, as on a real
GPU; `.item()`, `.tolist()` and `.cpu()` work, as on a real GPU; `torch.autocast("cuda")` autocasts (on the CPU
underneath). So code that forgets to move a batch, a router's
features or a collective's tensor to the model's device fails here exactly where it would fail on a GPU.

A fixture module for the device tests; it holds no tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)


class MixedDevices(RuntimeError):
    pass


class SimulatedCudaTensor(torch.Tensor):
    """A CPU tensor that reports `cuda:0` as its device. torch's default subclass handling keeps results of
    operations on it in the subclass; placement and the mixed-device check live in the mode below."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def __repr__(self) -> str:
        return f"SimulatedCuda({torch.Tensor.__repr__(self.as_subclass(torch.Tensor))})"


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def _tag(value):
    if isinstance(value, SimulatedCudaTensor) or not isinstance(value, torch.Tensor):
        return value
    if value.is_leaf and value.requires_grad:  # keep a leaf a leaf (as_subclass would hang it on the graph)
        return value.detach().as_subclass(SimulatedCudaTensor).requires_grad_()
    return value.as_subclass(SimulatedCudaTensor)


def _grad_on_cuda(param: torch.Tensor) -> None:
    if not isinstance(param.grad, SimulatedCudaTensor):
        param.grad = param.grad.as_subclass(SimulatedCudaTensor)


def _hook_leaf(value) -> None:
    """Gradients are made by the autograd engine, out of the mode's sight: put a leaf's `.grad` on its device."""
    if (isinstance(value, SimulatedCudaTensor) and value.is_leaf and value.requires_grad
            and not getattr(value, "_simulated_grad_hook", False)):
        value.register_post_accumulate_grad_hook(_grad_on_cuda)
        value._simulated_grad_hook = True


def _untag(value):
    return value.as_subclass(torch.Tensor) if isinstance(value, SimulatedCudaTensor) else value


_FACTORY_DEVICE_KW = "device"
_NEW = {torch.Tensor.new_tensor, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
        torch.Tensor.new_empty}
_FREE = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_select, torch.index_select,
         torch._has_compatible_shallow_copy_type, torch.Tensor.data.__set__}
"""Indexing a GPU tensor with CPU indices is legal in torch (the indices are copied over); the rest only compare or
swap tensor metadata."""


def _to_call(args, kwargs) -> tuple[torch.device | None, dict]:
    """A `Tensor.to(...)` call's target device and its device-free keyword form."""
    parse = {k: v for k, v in kwargs.items() if k != "copy"}
    positional = list(args[1:])
    copy = bool(kwargs.get("copy", False))
    if len(positional) >= 3 and isinstance(positional[-1], bool) and isinstance(positional[-2], bool):
        copy = positional.pop()  # .to(device, dtype, non_blocking, copy)
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*positional, **parse)
    rest = {"dtype": dtype, "non_blocking": non_blocking, "copy": copy}
    if memory_format is not None:
        rest["memory_format"] = memory_format
    return (torch.device(device) if device is not None else None), rest


class _Mode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = self._call(func, args, dict(kwargs or {}))
        if args and func not in _FREE:
            _hook_leaf(args[0])
        if isinstance(out, torch.Tensor):
            _hook_leaf(out)
        return out

    def _call(self, func, args, kwargs):
        if func in (torch.Tensor.cuda, torch.Tensor.cpu):
            plain = _untag(args[0])
            return _tag(plain) if func is torch.Tensor.cuda else plain
        if func is torch.Tensor.to:
            target, rest = _to_call(args, kwargs)
            if target is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
                target = args[1].device
            if target is None:
                return args[0].to(**rest)
            if _is_cuda(target):
                return _tag(args[0].to(**rest))
            return _untag(args[0]).to(device=target, **rest)
        if func in _NEW:  # new_* factories land on the source's device unless given one
            device = kwargs.get("device")
            if device is None:
                return func(*args, **kwargs)
            if _is_cuda(device):
                kwargs["device"] = "cpu"
                return _tag(func(*args, **kwargs))
            return _untag(func(*args, **kwargs))
        if _FACTORY_DEVICE_KW in kwargs and _is_cuda(kwargs[_FACTORY_DEVICE_KW]) and not any(
                isinstance(t, torch.Tensor) for t in tree_flatten((args, {k: v for k, v in kwargs.items()
                                                                          if k != "device"}))[0]):
            kwargs["device"] = "cpu"
            return tree_map(_tag, func(*args, **kwargs))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_cuda = any(isinstance(t, SimulatedCudaTensor) for t in tensors)
        explicit = kwargs.get("device")
        if explicit is not None:
            on_cuda = _is_cuda(explicit)
            if on_cuda:
                kwargs["device"] = "cpu"
        if on_cuda and func not in _FREE:
            cpu = [t for t in tensors if not isinstance(t, SimulatedCudaTensor) and t.dim() > 0]
            if cpu:
                shapes = ", ".join(str(tuple(t.shape)) for t in cpu[:3])
                message = (f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 "
                           f"and cpu! ({getattr(func, '__qualname__', func)} got CPU tensors of shape {shapes})")
                self.mixed.append(message)
                raise MixedDevices(message)
        out = func(*args, **kwargs)  # a SimulatedCudaTensor argument keeps the results in the subclass
        if explicit is None:
            return out
        return tree_map(_tag if on_cuda else _untag, out)


@contextlib.contextmanager
def simulated_cuda() -> Iterator[_Mode]:
    """The body runs with a simulated `cuda:0` (see the module docstring); yields the mode (its `mixed` lists the
    mixed-device operations it refused)."""
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    real_autocast = torch.autocast
    torch.autocast = _CudaAutocast
    mode = _Mode()
    try:
        with mode:
            yield mode
    finally:
        torch.autocast = real_autocast
        torch.__future__.set_overwrite_module_params_on_conversion(previous)


class _CudaAutocast(torch.autocast):
    """`torch.autocast("cuda", ...)` computes on the simulated GPU's real device, the CPU."""

    def __init__(self, device_type: str, *args, **kwargs):
        super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def on_simulated_cuda(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, SimulatedCudaTensor)

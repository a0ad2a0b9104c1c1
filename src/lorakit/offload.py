"""Offloaded activation checkpoints: the block inputs checkpointing keeps, held in host memory.

With activation checkpointing, what a step keeps on the device between forward and backward is
each checkpointed block's inputs: layers x tokens x hidden values (89.6 GB for an 8B model at
342K tokens in bf16). :func:`offloaded_checkpoint` runs PyTorch's non-reentrant checkpoint
under saved-tensor hooks that copy those inputs to (pinned, on CUDA) host memory as they are
saved and bring each back when its block is recomputed, as ``torch.autograd.graph.save_on_cpu``
does. Inside the block, checkpointing's own hooks take over, so nothing else moves. The copies
run on the compute stream (non-blocking on CUDA): memory is traded for transfer time.

On a CPU-only machine the same code path runs (the "host" copy is a second CPU tensor), so its
exactness is tested here; :func:`watch` lets the planner and the tests count the host bytes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

_WATCHERS: list[Callable[[torch.Tensor], None]] = []


def _pack(t: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
    pinned = t.device.type == "cuda"
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pinned)
    host.copy_(t, non_blocking=pinned)
    for watcher in _WATCHERS:
        watcher(host)
    return t.device, host


def _unpack(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
    device, host = packed
    return host.to(device, non_blocking=True)


def offloaded_checkpoint(function: Callable, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint(function, *args, **kwargs)`` with the inputs it keeps
    for the recompute held in host memory."""
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        return checkpoint(function, *args, **kwargs)


def offload_checkpoints(model: torch.nn.Module) -> int:
    """Make every checkpointed layer of a transformers model (checkpointing enabled) offload
    its inputs; returns how many layers now do."""
    func = functools.partial(offloaded_checkpoint, use_reentrant=False)
    n = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(
            module, "_gradient_checkpointing_func"
        ):
            module._gradient_checkpointing_func = func
            n += 1
    if n == 0:
        raise ValueError(
            f"offload moves the inputs activation checkpointing keeps, but no layer of "
            f"{type(model).__name__} is checkpointed; enable checkpointing first"
        )
    return n


@contextlib.contextmanager
def watch(callback: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``callback(host_tensor)`` for every tensor offloaded inside the ``with`` block."""
    _WATCHERS.append(callback)
    try:
        yield
    finally:
        _WATCHERS.remove(callback)

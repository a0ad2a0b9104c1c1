"""Measuring training memory and time.

``saved_bytes`` counts what autograd keeps for backward during a forward pass: the unique storages
of tensors passed to ``saved_tensors_hooks``, excluding the storages of the model's parameters and
buffers (autograd often saves views such as ``W.t()`` of a frozen weight; that is the weight's own
memory, not an activation). The count is deterministic, so tests may assert it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

MiB = 1024**2


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


@dataclass
class SavedTensors:
    """Unique storages saved for backward (filled inside :func:`count_saved`)."""

    exclude: set[tuple[str, int]] = field(default_factory=set)
    storages: dict[tuple[str, int], int] = field(default_factory=dict)  # key -> nbytes
    _keep: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            key = _storage_key(t)
            if key not in self.exclude and key not in self.storages:
                self.storages[key] = t.untyped_storage().nbytes()
                # Hold it so its address cannot be reused by another storage during the count.
                self._keep.append(t)
        # The graph stores what pack returns, strongly. ``t`` itself would tie a saved output
        # (softmax, exp, ...) to its own grad_fn in a cycle through C++ that gc cannot see, and
        # the graph would outlive the step; a detached alias (same storage, same version
        # counter) is what autograd stores without hooks.
        return t.detach()

    def release(self) -> None:
        """Drop the held tensors once the count is done. The autograd graph keeps a reference
        to the pack hook (this object's method): tensors held here would keep the graph alive
        through a cycle Python's gc cannot see, and every counted step would leak."""
        self._keep.clear()


def _param_storages(modules: Iterable[nn.Module]) -> set[tuple[str, int]]:
    keys = set()
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            keys.add(_storage_key(t))
    return keys


def count_saved(
    model: nn.Module | Iterable[nn.Module], fn: Callable[[], object]
) -> tuple[object, int]:
    """Run ``fn()`` (usually a forward + loss) and count the bytes it saves for backward.

    Returns:
        ``(fn's result, bytes)``. Call ``backward`` on the result afterwards as usual.
    """
    modules = [model] if isinstance(model, nn.Module) else list(model)
    saved = SavedTensors(exclude=_param_storages(modules))
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = fn()
    finally:
        saved.release()
    return out, saved.bytes


CATEGORIES = ("adapter inputs", "attention", "mlp", "norms", "embeddings", "logits/loss", "other")


def _category(stack: list[tuple[str, nn.Module]]) -> str:
    """Which part of the model saved a tensor, from the stack of modules running its forward."""
    from .layers import AdaptedLayer

    if len(stack) <= 1:
        return "logits/loss"  # the model's own forward, outside any submodule: the loss
    for name, m in reversed(stack[1:]):
        cls, leaf = type(m).__name__, name.rsplit(".", 1)[-1]
        if isinstance(m, AdaptedLayer):
            return "adapter inputs"
        if "Norm" in cls:
            return "norms"
        if leaf == "lm_head" or m is stack[0][1].__dict__.get("lm_head"):
            return "logits/loss"
        if "Attention" in cls or leaf in ("attn", "self_attn", "attention"):
            return "attention"
        if "MLP" in cls or leaf == "mlp":
            return "mlp"
        if isinstance(m, nn.Embedding):
            return "embeddings"
    return "other"


def saved_breakdown(model: nn.Module, fn: Callable[[], object]) -> tuple[object, dict[str, int]]:
    """Like :func:`count_saved`, with the bytes split by what saved them.

    Categories: adapter inputs (adapted layers), attention, mlp, norms, embeddings, logits/loss
    (the LM head and the loss), other. A storage saved twice counts once, for the first saver.
    """
    stack: list[tuple[str, nn.Module]] = []
    names = {id(m): n for n, m in model.named_modules()}
    saved = SavedTensors(exclude=_param_storages([model]))
    by_cat: dict[str, int] = dict.fromkeys(CATEGORIES, 0)

    def pack(t: torch.Tensor) -> torch.Tensor:
        before = len(saved.storages)
        alias = saved.pack(t)
        if len(saved.storages) > before:
            by_cat[_category(stack)] += t.untyped_storage().nbytes()
        return alias

    def pre(m, args):
        stack.append((names.get(id(m), ""), m))

    def post(m, args, out):
        stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        saved.release()
        for h in handles:
            h.remove()
    return out, by_cat


def training_memory(
    model: nn.Module, saved_bytes: int, optimizer_states: int = 2
) -> dict[str, int]:
    """Total training memory in bytes: weights, grads, optimizer states (AdamW: 2 per trainable
    element, in the parameter's dtype) and saved activations."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    parts = {
        "weights": weights,
        "grads": trainable,
        "optimizer": optimizer_states * trainable,
        "activations": saved_bytes,
    }
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class StepStats:
    """What :func:`profile_steps` measured."""

    saved_bytes: int  # activations kept for backward in one step (see module docstring)
    step_times: list[float]  # seconds per step after warm-up
    peak_cuda_bytes: int | None = None  # torch.cuda.max_memory_allocated, on CUDA

    @property
    def median_time(self) -> float:
        return statistics.median(self.step_times)

    @property
    def saved_mib(self) -> float:
        return self.saved_bytes / MiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    steps: int = 5,
    warmup: int = 1,
) -> StepStats:
    """Time full training steps (forward, backward, optimizer step) and count saved bytes.

    The saved bytes are counted on the first step; times are of the ``steps`` after ``warmup``.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    saved, times = 0, []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        if i == 0:
            loss, saved = count_saved(model, loss_fn)
        else:
            loss = loss_fn()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return StepStats(saved_bytes=saved, step_times=times, peak_cuda_bytes=peak)

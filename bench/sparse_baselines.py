"""Bench-only baselines for sparse fine-tuning (not public API): SQFT-style masked LoRA, SPP, each
optionally under activation checkpointing, and a driver for the LoRS authors' reference LorsFn.

All keep the pruned weight's zeros in the trained function; they differ in what they keep for
backward, which is what bench/sparse.py measures.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class _Adapted(nn.Module):
    """A frozen linear plus a trainable branch; ``gc`` recomputes the layer in backward."""

    def __init__(self, base: nn.Linear, gc: bool) -> None:
        super().__init__()
        self.base, self.gc = base, gc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gc and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class SQFTLinear(_Adapted):
    """SQFT / "LoRA + mask": y = x Wᵀ + x ((s·B A) ⊙ M)ᵀ in plain autograd, M = [W ≠ 0] built in
    forward: keeps the masked dense delta (and the mask) until backward."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gc: bool = False) -> None:
        super().__init__(base, gc)
        out_f, in_f = base.weight.shape
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, in_f) / in_f**0.5)
        self.B = nn.Parameter(torch.zeros(out_f, rank))

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        return w + (self.scale * self.B @ self.A) * (w != 0)

    def _forward(self, x):
        w = self.base.weight
        delta = (self.scale * self.B @ self.A) * (w != 0)
        return F.linear(x, w, self.base.bias) + F.linear(x, delta)


class SPPLinear(_Adapted):
    """SPP: W' = W ⊙ (1 + s·c ⊗ R̃), R (groups, in) repeated over groups of output rows,
    c (out,) zero-initialised: W' starts as W and keeps its zeros."""

    def __init__(self, base: nn.Linear, groups: int = 16, scale: float = 1.0, gc: bool = False):
        super().__init__(base, gc)
        out_f, in_f = base.weight.shape
        self.groups, self.scale = groups, scale
        self.R = nn.Parameter(torch.randn(groups, in_f) / in_f**0.5)
        self.c = nn.Parameter(torch.zeros(out_f))

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        rows = self.R.repeat(-(-w.shape[0] // self.groups), 1)[: w.shape[0]]
        return w * (1 + self.scale * self.c[:, None] * rows)

    def _forward(self, x):
        return F.linear(x, self.merged_weight(), self.base.bias)


def _load_reference():
    """The reference ``LorsFn`` from $LORS_REF/lors_autograd.py (fetched, never committed)."""
    path = os.path.join(os.environ.get("LORS_REF", "/tmp/lors_ref"), "lors_autograd.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("lors_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REFERENCE = _load_reference()


class ReferenceLoRSLinear(_Adapted):
    """Drives the reference LorsFn (its ``lora_A`` is the up factor (out, r), ``lora_B`` the
    down factor (r, in) — the opposite of PEFT's names)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base, gc=False)
        out_f, in_f = base.weight.shape
        self.scale = alpha / rank**0.5
        self.up = nn.Parameter(torch.zeros(out_f, rank))
        self.down = nn.Parameter(torch.randn(rank, in_f) / in_f**0.5)

    def _forward(self, x):
        params = REFERENCE.Params(scaling_factor=self.scale, training=self.training)
        return REFERENCE.LorsFn.apply(
            x, self.base.weight, self.base.bias, self.up, self.down, params
        )


def replace(model: nn.Module, targets: list[str], make: Callable[[nn.Linear], nn.Module]):
    """Freeze ``model`` and wrap every linear whose name ends in one of ``targets``."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, make(module))
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every wrapper's weight into its base linear and put the base back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SQFTLinear | SPPLinear):
            with torch.no_grad():
                module.base.weight.copy_(module.merged_weight())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module.base)
    return model

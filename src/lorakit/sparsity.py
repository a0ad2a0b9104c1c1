"""How sparse the base a LoRS adapter keeps is, and a warning when a LoRS run's base is not pruned.

LoRS (Hu et al. 2025, arXiv 2501.08582) keeps a pruned model's zeros. Injecting it needs at
least one zero weight, but a model that was never pruned can have a few (a dequantized GGUF such
as the embedded SmolLM2, whose adapted weights are 0.03 % zeros): LoRS then trains a slower LoRA
that keeps those few zeros. A training run warns about that, naming the measured sparsity,
instead of saying nothing.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

MIN_SPARSITY = 0.1  # below this the base is not pruned (a pruned one is 50 % or 2:4, ...)


def lors_sparsity(model: nn.Module) -> float | None:
    """The share of zeros among the base weights ``model``'s LoRS adapters keep (their zero
    patterns, 1 bit per weight), or None when it has no LoRS adapter."""
    from .methods.lors import LoRS

    zeros = total = 0
    for m in model.modules():
        if isinstance(m, LoRS):
            bits = m.mask_bits  # 1: a kept weight; the last byte's padding bits are 0
            ones = torch.tensor([bin(i).count("1") for i in range(256)], device=bits.device)
            n = m.weight_shape.numel()
            zeros += n - int(ones[bits.long()].sum())
            total += n
    return zeros / total if total else None


def warn_if_unpruned(model: nn.Module, cfg: Any) -> None:
    """Warn when a :class:`~lorakit.config.TrainConfig`'s LoRS adapter sits on a base whose
    adapted weights are less than :data:`MIN_SPARSITY` zeros: one that was not pruned."""
    if cfg.adapter is None or not cfg.adapter.capabilities.sparse_base:
        return
    share = lors_sparsity(model)
    if share is None or share >= MIN_SPARSITY:
        return
    warnings.warn(
        f"{cfg.method} keeps a pruned model's zeros, but only {share:.2%} of the weights it "
        f"adapts in {cfg.model} are zero (a pruned model has 50 % or 2:4, at least "
        f"{MIN_SPARSITY:.0%} here): it will train a slower LoRA that keeps those few zeros. "
        f"Prune first (lorakit prune --model {cfg.model} --sparsity 2:4 --output pruned, then "
        f"--model pruned), or use --method lora or lora_fa",
        stacklevel=2,
    )

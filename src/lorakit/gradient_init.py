"""Data-driven adapter initialisation: LoRA-GA / LoRS gradient-SVD init (Hu et al. 2025,
arXiv 2501.08582, following LoRA-GA). A model-level routine, so it lives above the methods."""

from __future__ import annotations

import torch
from torch import nn

from .inject import active_adapter, adapted_layers, disable_adapters


def gradient_svd_init(
    model: nn.Module, loss_fn, batches, name: str | None = None, *, niter: int = 4
) -> int:
    """LoRS / LoRA-GA initialisation, usable with every method: A ← the top-r right singular
    vectors of the dense weight gradient averaged over ``batches``, B ← 0 (outputs unchanged).

    The dense gradient is taken on the base model (adapters disabled) by letting the adapted
    layers' weights require grad for these backward passes only; it costs one weight-sized
    gradient per adapted layer, once.

    Args:
        model: an injected model; adapter ``name`` (default: the active one) is re-initialised.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        batches: an iterable of batches (the paper averages over ~128 samples).
        niter: subspace iterations of ``torch.svd_lowrank`` (q = min(4r, in, out)).

    Returns:
        The number of batches used.
    """
    name = name or active_adapter(model)
    found = [(path, layer) for path, layer in adapted_layers(model) if name in layer.adapters]
    if not found:
        raise ValueError(f"the model has no adapter named {name!r}")
    for path, layer in found:
        if not layer.weight.is_floating_point():
            raise ValueError(
                f"gradient_svd_init takes the dense gradient of every adapted weight; "
                f"{path}.weight is {layer.weight.dtype} (a quantized base), which has none. "
                f"Initialise on the unquantized model, or use init='kaiming'"
            )
    layers = [layer for _, layer in found]
    weights = [layer.weight for layer in layers]
    flags = [w.requires_grad for w in weights]
    others = [p for p in model.parameters() if p.requires_grad]
    count = 0
    try:
        for p in others:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        with disable_adapters(model):
            for batch in batches:
                loss_fn(model, batch).backward()
                count += 1
        if not count:
            raise ValueError("gradient_svd_init needs at least one batch")
        with torch.no_grad():
            for layer in layers:
                adapter = layer.adapters[name]
                g = layer.weight.grad.float() / count
                g = g.t() if layer.fan_in_fan_out else g  # (out, in)
                r = adapter.lora_A.shape[0]
                _, _, V = torch.svd_lowrank(g, q=min(4 * r, *g.shape), niter=niter)  # (in, q)
                adapter.lora_A.copy_(V[:, :r].t().to(adapter.lora_A.dtype))
                adapter.lora_B.zero_()
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
            w.grad = None
        for p in others:
            p.requires_grad_(True)
    return count

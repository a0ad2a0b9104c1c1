"""LoRS: low-rank adaptation that keeps a pruned model exactly sparse (Hu et al. 2025, arXiv 2501.08582).

The adapted weight is ``W' = (W + s·B A) ⊙ M`` with ``M = 1[W ≠ 0]`` re-derived from the frozen
sparse weight (nothing stored), so every zero of W stays zero, in training and after merging.

Weight recompute: forward builds W' transiently for one GEMM and saves only (x, W, A, B); backward
rebuilds it for ``dx = G W'``. No weight-sized tensor lives from forward to backward.

Adapter gradients, ``sparse_grad``:

- ``"exact"``: the true gradient of the masked forward, ``D = (Gᵀ x) ⊙ M``, ``dB = s·D Aᵀ``,
  ``dA = s·Bᵀ D``, computed over tiles of output rows so the transient D is (tile, in).
- ``"straight_through"``: the LoRS paper's low-rank-ordered gradient, that of the *unmasked*
  LoRA: ``dB = s·Gᵀ (x Aᵀ)``, ``dA = s·(G B)ᵀ x``; no (out, in) product at all. (The reference
  code omits s; here it is applied, so both modes agree where M is all ones.)

Note the naming trap: the reference code calls the up factor ``lora_A``; here, as in PEFT,
A (r, in) is the down factor applied first and B (out, r) the up factor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .lora import frozen_base, init_lora_A, layer_dtypes

if TYPE_CHECKING:
    from ..config import LoRAConfig
    from ..layers import AdaptedLayer

TILE = 1024  # output rows per tile of the exact gradient


def masked_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, fifo: bool, dtype
):
    """W' = (W + s·B A) ⊙ [W ≠ 0] in ``dtype``, in W's layout ((in, out) when fan_in_fan_out).

    One weight-sized result and one bool mask: W + s·B A in a single addmm, then the pruned
    positions set to exactly +0 in place.
    """
    w = weight.to(dtype)
    A, B = A.to(dtype), B.to(dtype)
    out = torch.addmm(w, A.t(), B.t(), alpha=s) if fifo else torch.addmm(w, B, A, alpha=s)
    return out.masked_fill_(w == 0, 0)


class LoRSFunction(torch.autograd.Function):
    """y = x W'ᵀ + b with W' = (W + s·B A) ⊙ M, saving only x (W, A, B are parameters).

    Shapes: x (N, in), W (out, in) or (in, out) if fan_in_fan_out, A (r, in), B (out, r),
    G = ∂L/∂y (N, out), M = [W ≠ 0].
    forward:  W' built transiently; y = x W'ᵀ + b.
    backward: dx = G W' (W' rebuilt); adapter grads per ``exact`` (masked, tiled) or
              straight-through (unmasked, low-rank order), see the module docstring.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, fan_in_fan_out: bool, exact: bool):
        out_dtype, cd = layer_dtypes(x)
        with torch.autocast(x.device.type, enabled=False):
            w = masked_weight(weight, A, B, scaling, fan_in_fan_out, cd)
            x_c = x.to(cd)
            w_t = w if fan_in_fan_out else w.t()  # (in, out)
            y = x_c @ w_t if bias is None else torch.addmm(bias.to(cd), x_c, w_t)
        ctx.save_for_backward(x, weight, A, B)
        ctx.scaling, ctx.fifo, ctx.exact, ctx.cd = scaling, fan_in_fan_out, exact, cd
        return y.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, A, B = ctx.saved_tensors
        s, fifo, cd = ctx.scaling, ctx.fifo, ctx.cd
        g_c, x_c, A_c, B_c = g.to(cd), x.to(cd), A.to(cd), B.to(cd)
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            w = masked_weight(weight, A, B, s, fifo, cd)
            dx = (g_c @ (w.t() if fifo else w)).to(x.dtype)  # (N, in)
            del w
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            if ctx.exact:
                dA = torch.zeros_like(A_c)
                dB = torch.empty_like(B_c)
                w_oi = weight.t() if fifo else weight  # (out, in), a view
                for lo in range(0, w_oi.shape[0], TILE):
                    hi = min(lo + TILE, w_oi.shape[0])
                    d = g_c[:, lo:hi].t() @ x_c  # (tile, in)
                    d.mul_(w_oi[lo:hi] != 0)
                    dB[lo:hi] = (d @ A_c.t()) * s
                    dA.addmm_(B_c[lo:hi].t(), d, alpha=s)
            else:
                h = x_c @ A_c.t()  # (N, r)
                dB = (g_c.t() @ h) * s
                dA = ((g_c @ B_c).t() @ x_c) * s
            dA, dB = dA.to(A.dtype), dB.to(B.dtype)
        return dx, None, None, dA, dB, None, None, None


class LoRS(nn.Module):
    """A LoRS adapter: trainable A, B; the layer's zeros stay zeros."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoRAConfig,
        *,
        embedding: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embedding:
            raise ValueError(
                "lors adapts sparse linear layers; embeddings are not pruned (use lora)"
            )
        r = config.rank
        self.config = config
        self.scaling = config.scaling
        self.exact = config.sparse_grad == "exact"
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        with torch.no_grad():
            init_lora_A(self.lora_A, config.init)

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        """ΔW = (s·B A) ⊙ M, shape (out, in): merging adds it and keeps every zero."""
        w = layer.weight.t() if layer.fan_in_fan_out else layer.weight  # (out, in)
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta * (w != 0).to(delta.dtype)

    def forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        frozen_base(layer.weight, layer.bias, "lors")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = LoRSFunction.apply(
            x2,
            layer.weight,
            layer.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            layer.fan_in_fan_out,
            self.exact,
        )
        return y.view(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        out, r = self.lora_B.shape
        mode = "exact" if self.exact else "straight_through"
        return (
            f"rank={r}, in={self.lora_A.shape[1]}, out={out}, scaling={self.scaling:g}, grad={mode}"
        )


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
    from ..inject import active_adapter, adapted_layers, disable_adapters

    name = name or active_adapter(model)
    layers = [layer for _, layer in adapted_layers(model) if name in layer.adapters]
    if not layers:
        raise ValueError(f"the model has no adapter named {name!r}")
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

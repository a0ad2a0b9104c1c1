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

# The exact gradient's (Gᵀx) ⊙ M is computed over tiles of output rows holding at most this many
# elements (16 MiB in fp32): whole for SmolLM2-sized layers (splitting a GEMM that small only
# costs time), ~1k rows for 7B-sized ones. The transient mask and W' are weight-sized anyway.
TILE_ELEMENTS = 1 << 22


def nonzero_mask(w: torch.Tensor) -> torch.Tensor:
    """M = [w ≠ 0] as 0/1 in w's dtype.

    A float mask, written by the comparison itself: multiplying by it is branch-free and reads
    one tensor. (A bool mask costs more on CPU with real pruning patterns: ``mul_`` by a bool
    tensor first casts it to a weight-sized float temporary, and ``masked_fill_`` branches per
    element, which a random 2:4 pattern mispredicts half the time: measured 2-4x slower.)
    """
    return torch.ne(w, 0, out=torch.empty_like(w))


def masked_weight(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    s: float,
    fifo: bool,
    dtype: torch.dtype,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' = (W + s·B A) ⊙ M in ``dtype``, in W's layout ((in, out) when fan_in_fan_out).

    W + s·B A in one addmm, then one in-place multiply by M (``nonzero_mask`` of W unless given):
    two weight-sized transients, the result and the mask. Pruned positions hold ±0.
    """
    w = weight.to(dtype)
    A, B = A.to(dtype), B.to(dtype)
    out = torch.addmm(w, A.t(), B.t(), alpha=s) if fifo else torch.addmm(w, B, A, alpha=s)
    return out.mul_(nonzero_mask(w) if mask is None else mask)


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
        need_x = ctx.needs_input_grad[0]
        need_ab = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        exact = ctx.exact and need_ab
        dx = dA = dB = None
        w_c = weight.to(cd)  # converted once (a no-op unless a 16-bit model computes in fp32)
        # The exact gradient needs M again: build it once for W' and the tiles.
        mask = nonzero_mask(w_c) if exact else None
        if need_x:
            w = masked_weight(w_c, A, B, s, fifo, cd, mask)
            dx = (g_c @ (w.t() if fifo else w)).to(x.dtype)  # (N, in)
            del w
        del w_c
        if exact:
            m_oi = mask.t() if fifo else mask  # (out, in), a view
            dA = torch.zeros_like(A_c)
            dB = torch.empty_like(B_c)
            rows = max(1, TILE_ELEMENTS // m_oi.shape[1])
            for lo in range(0, m_oi.shape[0], rows):
                hi = min(lo + rows, m_oi.shape[0])
                d = (g_c[:, lo:hi].t() @ x_c).mul_(m_oi[lo:hi])  # (tile, in): D = (Gᵀx) ⊙ M
                torch.mm(d, A_c.t(), out=dB[lo:hi])
                dA.addmm_(B_c[lo:hi].t(), d)
            dA, dB = dA.mul_(s), dB.mul_(s)
        elif need_ab:
            h = x_c @ A_c.t()  # (N, r)
            dB = (g_c.t() @ h).mul_(s)
            dA = ((g_c @ B_c).t() @ x_c).mul_(s)
        if need_ab:
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

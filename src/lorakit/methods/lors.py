"""LoRS: low-rank adaptation that keeps a pruned model exactly sparse (Hu et al. 2025, arXiv 2501.08582).

The adapted weight is ``W' = (W + s·B A) ⊙ M``. M is the pruned base's zero pattern, captured from
W when the adapter is created and kept as a bitmask (1 bit per weight: 1/16 of a bf16 weight), so
every zero of W stays zero, in training and after merging, and the pattern survives any number of
merge / unmerge cycles (which in finite precision can round a kept weight to an exact 0, so the
pattern cannot be re-derived from W after one).

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

from ..bitmask import unpack_mask
from ..quant import NO_PATTERN, dense, dense_shape, state, zero_pattern
from .lora import init_lora_A, layer_dtypes

if TYPE_CHECKING:
    from ..config import LoRAConfig
    from ..layers import AdaptedLayer

# The exact gradient's (Gᵀx) ⊙ M is computed over tiles of output rows holding at most this many
# elements (16 MiB in fp32): whole for SmolLM2-sized layers (splitting a GEMM that small only
# costs time), ~1k rows for 7B-sized ones. The transient mask and W' are weight-sized anyway.
TILE_ELEMENTS = 1 << 22


def masked_weight(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    s: float,
    fan_in_fan_out: bool,
    mask: torch.Tensor,
    qs=None,
) -> torch.Tensor:
    """W' = (W + s·B A) ⊙ M in M's dtype, in W's layout ((in, out) when fan_in_fan_out).

    W + s·B A in one addmm, then one in-place multiply by the 0/1 mask M: the result is the only
    weight-sized tensor besides M (and a 4-bit W's transient dequantization). Pruned positions
    hold ±0.
    """
    dtype = mask.dtype
    w = dense(weight, dtype, qs)  # a 4-bit weight (quant state qs) dequantized, transiently
    A, B = A.to(dtype), B.to(dtype)
    out = torch.addmm(w, A.t(), B.t(), alpha=s) if fan_in_fan_out else torch.addmm(w, B, A, alpha=s)
    return out.mul_(mask)


class LoRSFunction(torch.autograd.Function):
    """y = x W'ᵀ + b with W' = (W + s·B A) ⊙ M, saving only x (W, A, B, M are parameters/buffers).

    Shapes: x (N, in), W (out, in) or (in, out) if fan_in_fan_out, A (r, in), B (out, r),
    bits: M packed by :func:`lorakit.bitmask.pack_mask` (M in W's layout), G = ∂L/∂y (N, out).
    forward:  W' built transiently; y = x W'ᵀ + b.
    backward: dx = G W' (W' rebuilt); adapter grads per ``exact`` (masked, tiled) or
              straight-through (unmasked, low-rank order), see the module docstring.
    dtypes:   W' and the GEMMs in :func:`~lorakit.methods.lora.layer_dtypes`' compute dtype;
              fp32 A and B on a 16-bit base are cast to it (transiently); dA and dB come back in
              A's and B's dtypes.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, A, B, bits, scaling: float, fan_in_fan_out: bool, exact: bool
    ):
        out_dtype, cd = layer_dtypes(x)
        with torch.autocast(x.device.type, enabled=False):
            mask = unpack_mask(bits, dense_shape(weight), cd)
            w = masked_weight(weight, A, B, scaling, fan_in_fan_out, mask)
            del mask
            x_c = x.to(cd)
            w_t = w if fan_in_fan_out else w.t()  # (in, out)
            y = x_c @ w_t if bias is None else torch.addmm(bias.to(cd), x_c, w_t)
        ctx.save_for_backward(x, weight, A, B, bits)
        ctx.qs = state(weight)
        ctx.scaling, ctx.fan_in_fan_out, ctx.exact, ctx.cd = scaling, fan_in_fan_out, exact, cd
        return y.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, A, B, bits = ctx.saved_tensors
        s, fan_in_fan_out, cd = ctx.scaling, ctx.fan_in_fan_out, ctx.cd
        g_c, x_c, A_c, B_c = g.to(cd), x.to(cd), A.to(cd), B.to(cd)
        need_x = ctx.needs_input_grad[0]
        need_ab = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        exact = ctx.exact and need_ab
        dx = dA = dB = None
        # Built once for W' and the exact gradient's tiles.
        mask = unpack_mask(bits, dense_shape(weight, ctx.qs), cd) if need_x or exact else None
        if need_x:
            w = masked_weight(weight, A, B, s, fan_in_fan_out, mask, ctx.qs)
            dx = (g_c @ (w.t() if fan_in_fan_out else w)).to(x.dtype)  # (N, in)
            del w
        if exact:
            m_oi = mask.t() if fan_in_fan_out else mask  # (out, in), a view
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
        return dx, None, None, dA, dB, None, None, None, None


class LoRS(nn.Module):
    """A LoRS adapter: trainable A, B; the layer's zeros (captured as ``mask_bits``) stay zeros."""

    def __init__(
        self, layer: AdaptedLayer, config: LoRAConfig, *, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        r, device = config.rank, layer.weight.device
        self.config = config
        self.scaling = config.scaling
        self.exact = config.sparse_grad == "exact"
        self.lora_A = nn.Parameter(torch.empty(r, layer.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, dtype=dtype, device=device))
        bits = zero_pattern(layer)
        if bits is None:
            raise ValueError(NO_PATTERN)
        with torch.no_grad():
            init_lora_A(self.lora_A, config.init)
        # Not in the state dict: it is the base's pattern, re-captured from the pruned base.
        self.register_buffer("mask_bits", bits.to(device), persistent=False)
        self.weight_shape = dense_shape(layer.weight)

    def pattern(self) -> torch.Tensor:
        """M as a bool tensor in the layer weight's layout."""
        return unpack_mask(self.mask_bits, self.weight_shape, torch.bool)

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        """ΔW = (s·B A) ⊙ M, shape (out, in): merging adds it and keeps every zero."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        mask = unpack_mask(self.mask_bits, self.weight_shape, delta.dtype)
        return delta * (mask.t() if layer.fan_in_fan_out else mask)

    def forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = LoRSFunction.apply(
            x2,
            layer.weight,
            layer.bias,
            self.lora_A,
            self.lora_B,
            self.mask_bits,
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

"""LoRA and LoRA-FA on a stack of expert weights, one low-rank pair per expert.

Used by :mod:`lorakit.experts` for MoE experts kept as fused 3-D tensors. Per expert e,
ΔW_e = s·B_e A_e with A (E, r, in) and B (E, out, r); the routed tokens arrive grouped by expert
and one autograd Function runs every group, so ΔW is never formed and each A / B gets its
gradient in one piece.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .lora import init_lora_A, layer_dtypes

if TYPE_CHECKING:
    from ..config import LoRAConfig


# -- the grouped low-rank linear -----------------------------------------------------------------


class GroupedLoRAFunction(torch.autograd.Function):
    """One frozen linear per expert plus its low-rank branch, over tokens sorted by expert.

    Shapes: x (N, in) sorted by expert, ``groups`` its (expert, first, end) row ranges (see
    :func:`groups`); W (E, out, in), or
    (E, in, out) when ``transposed``; b (E, out) or None; A (E, r, in) and B (E, out, r), or both
    None (no adapter); s the scaling; G = ∂L/∂y (N, out). Group e is rows x_e.

    forward:  H_e = x_e A_eᵀ;  y_e = x_e W_eᵀ + b_e + s·H_e B_eᵀ
    backward: dH_e = s·G_e B_e;  dx_e = G_e W_e + dH_e A_e;  dA_e = dH_eᵀ x_e;  dB_e = s·G_eᵀ H_e
    saves:    ``keep="x"`` (LoRA): x, and H is recomputed in backward; ``keep="h"`` (LoRA-FA, A
              frozen, no dA): H (N, r) only; ``keep="none"`` (no adapter): nothing. W, b, A, B
              are parameters/buffers.
    Computes in :func:`~lorakit.methods.lora.layer_dtypes`' dtype, as the other layers do.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, groups, scaling, transposed, keep):
        out_dtype, cd = layer_dtypes(x)
        y = x.new_empty(x.shape[0], weight.shape[1 + transposed], dtype=cd)  # (N, out)
        h = None if A is None else x.new_empty(x.shape[0], A.shape[1], dtype=cd)  # (N, r)
        with torch.autocast(x.device.type, enabled=False):
            for e, lo, hi in groups:
                xe, ye = x[lo:hi].to(cd), y[lo:hi]
                w = weight[e].to(cd)
                torch.mm(xe, w if transposed else w.t(), out=ye)
                if bias is not None:
                    ye.add_(bias[e].to(cd))
                if h is not None:
                    torch.mm(xe, A[e].to(cd).t(), out=h[lo:hi])
                    ye.addmm_(h[lo:hi], B[e].to(cd).t(), alpha=scaling)
        kept = {"x": x, "h": None if h is None else h.to(out_dtype), "none": None}[keep]
        ctx.save_for_backward(kept, weight, A, B)
        ctx.meta = (groups, scaling, transposed, keep, cd, x.dtype)
        return y.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        kept, weight, A, B = ctx.saved_tensors
        groups, s, transposed, keep, cd, x_dtype = ctx.meta
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("expert weights are frozen; their gradient is not computed")
        n_in = weight.shape[2 - transposed]
        dx = g.new_empty(g.shape[0], n_in, dtype=cd) if ctx.needs_input_grad[0] else None
        dA = torch.zeros_like(A) if ctx.needs_input_grad[3] else None
        dB = torch.zeros_like(B) if ctx.needs_input_grad[4] else None
        for e, lo, hi in groups:
            ge = g[lo:hi].to(cd)
            if dx is not None:
                w = weight[e].to(cd)
                torch.mm(ge, w.t() if transposed else w, out=dx[lo:hi])
            if A is None:
                continue
            Ae = A[e].to(cd)
            dh = (ge @ B[e].to(cd)).mul_(s)  # (n_e, r)
            xe = kept[lo:hi].to(cd) if keep == "x" else None
            if dx is not None:
                dx[lo:hi].addmm_(dh, Ae)
            if dA is not None:
                dA[e] = (dh.t() @ xe).to(A.dtype)
            if dB is not None:
                he = xe @ Ae.t() if keep == "x" else kept[lo:hi].to(cd)  # (n_e, r)
                dB[e] = ((ge.t() @ he) * s).to(B.dtype)
        dx = None if dx is None else dx.to(x_dtype)
        return dx, None, None, dA, dB, None, None, None, None


def groups(counts: list[int], sample: bool = False) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every non-empty group of rows sorted by expert.

    ``sample``: only the first group of each size (the planner, on fake tensors): every group of
    a size allocates and frees the same and the outputs are allocated whole, so the tracked peak
    and saved bytes are the whole loop's (Qwen3-30B-A3B, 128 experts: minutes of fake ops
    otherwise)."""
    out, seen, lo = [], set(), 0
    for e, n in enumerate(counts):
        if n and not (sample and n in seen):
            out.append((e, lo, lo + n))
        seen.add(n)
        lo += n
    return out


# -- the adapter ------------------------------------------------------------------------------------


class ExpertLoRA(nn.Module):
    """LoRA (or LoRA-FA: A a frozen buffer) on one fused expert tensor: A (E, r, in), B (E, out, r)."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        config: LoRAConfig,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        e, n_in, n_out = shape  # experts, in, out
        r = config.rank
        self.config = config
        self.scaling = config.scaling
        self.frozen_a = config.method == "lora_fa"
        A = torch.empty(e, r, n_in, dtype=dtype, device=device)
        for a in A:  # each expert's A is initialised like a linear layer's
            init_lora_A(a, config.init)
        if self.frozen_a:
            self.register_buffer("lora_A", A)
        else:
            self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(torch.zeros(e, n_out, r, dtype=dtype, device=device))
        if config.grad_correction:
            self.lora_B.register_hook(self._correct)

    def _correct(self, grad: torch.Tensor) -> torch.Tensor:
        """LoRA-FA v2: g_B (A Aᵀ)⁻¹ / s² per expert."""
        A = self.lora_A.double()
        inv = torch.linalg.inv(A @ A.transpose(1, 2))  # (E, r, r)
        return (grad.double() @ inv / self.scaling**2).to(grad.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW_e = s·B_e A_e for every expert, (E, out, in)."""
        return torch.bmm(self.lora_B, self.lora_A.to(self.lora_B.dtype)) * self.scaling

    def extra_repr(self) -> str:
        e, out, r = self.lora_B.shape
        frozen = ", A frozen" if self.frozen_a else ""
        return f"experts={e}, rank={r}, in={self.lora_A.shape[2]}, out={out}{frozen}"

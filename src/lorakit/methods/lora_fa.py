"""LoRA-FA: memory-efficient LoRA with a frozen down-projection (Zhang et al. 2023, arXiv 2308.03303).

A stays at its random init (a buffer: frozen by construction), only B trains. Backward then needs
H = x Aᵀ (r numbers per token) instead of the layer input x:

    dB = s·Gᵀ H,   dx = G W + s·(G B) A,   no dA.

That saving is real only if nothing else keeps x alive, so the layer is one autograd Function that
saves H alone, and dropout masks are regenerated in backward from a saved RNG state instead of
being kept (an N·in mask would undo the saving).

Optional v2 gradient correction (``LoRAConfig(grad_correction=True)``): before any optimizer sees
it, B's gradient becomes ``(1/s²)·g_B·(A Aᵀ)⁻¹`` (r x r, per layer, computed once since A is
frozen). It is a hook on B, so it pairs each B with its own layer's A and works with any optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..quant import dense, state
from .lora import _base, embed_low_rank, init_lora_A, layer_dtypes

if TYPE_CHECKING:
    from ..config import LoRAConfig
    from ..layers import AdaptedLayer


def _dropout_mask(shape, p: float, dtype, device, rng_state: torch.Tensor) -> torch.Tensor:
    """Redraw forward's dropout scale mask (0 or 1/(1-p)) from ``rng_state``; global RNG untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng_state, device)
        else:
            torch.set_rng_state(rng_state)
        keep = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p)
    return keep.div_(1 - p)


class LoRAFAFunction(torch.autograd.Function):
    """A frozen linear plus a LoRA-FA branch (A frozen), saving only H = drop(x) Aᵀ for backward.

    Shapes: x (N, in), W (out, in) or (in, out) if fan_in_fan_out, b (out,) or None,
    A (r, in) frozen, B (out, r) trained, s the scaling; G = ∂L/∂y (N, out).

    forward:  M = dropout mask (N, in) or 1;  H = (x ⊙ M) Aᵀ (N, r);  y = x Wᵀ + b + s·H Bᵀ
    backward: dB = s·Gᵀ H (out, r);  dx = G W + M ⊙ (s·G B) A (N, in)
    saves:    H in the output dtype (2·N·r bytes in bf16), the RNG state if dropout is on (M is
              redrawn in backward), and W, A, B (parameters/buffers). Never x.
    Computes like :class:`~lorakit.methods.lora.LoRAFunction` (:func:`layer_dtypes`; autocast;
    fp32 A and B on a 16-bit x are cast to the compute dtype; H is saved in the output dtype).
    The base weight must be frozen: without x there is no dW.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, fan_in_fan_out: bool, p: float):
        out_dtype, cd = layer_dtypes(x)
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(cd)
            b = None if bias is None else bias.to(cd)
            y = _base(x_c, dense(weight, cd), b, fan_in_fan_out)  # (N, out)
            rng = None
            if p > 0:  # keep the generator state, not the (N, in) mask; backward redraws it
                rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()
                keep = torch.empty(x.shape, dtype=cd, device=x.device).bernoulli_(1 - p)
                x_c = x_c * keep.div_(1 - p)
            h = x_c @ A.to(cd).t()  # (N, r)
            y.addmm_(h, B.to(cd).t(), alpha=scaling)
        ctx.save_for_backward(h.to(out_dtype), weight, A, B, rng)
        ctx.qs = state(weight)
        ctx.scaling, ctx.fan_in_fan_out, ctx.p, ctx.cd = scaling, fan_in_fan_out, p, cd
        ctx.x_meta = (x.shape, x.dtype, x.device)
        return y.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        h, weight, A, B, rng = ctx.saved_tensors
        shape, dtype, device = ctx.x_meta
        s, cd = ctx.scaling, ctx.cd
        g_c = g.to(cd)
        dx = dB = None
        if ctx.needs_input_grad[0]:
            w = dense(weight, cd, ctx.qs)  # a 4-bit weight is dequantized again, transiently
            dx = g_c @ (w.t() if ctx.fan_in_fan_out else w)  # (N, in)
            gb = g_c @ B.to(cd)  # (N, r)
            if ctx.p > 0:  # the adapter branch's (N, in) gradient, masked as forward dropped
                dxd = (gb @ A.to(cd)).mul_(_dropout_mask(shape, ctx.p, cd, device, rng))
                dx = dx.add_(dxd.mul_(s))
            else:
                # addmm_, not add_(…, alpha=s): inductor (torch 2.13) miscompiles the latter in
                # a custom Function's backward (tests/test_compile.py)
                dx = dx.addmm_(gb, A.to(cd), alpha=s)
            dx = dx.to(dtype)
        if ctx.needs_input_grad[4]:
            dB = ((g_c.t() @ h.to(cd)) * s).to(B.dtype)  # (out, r)
        return dx, None, None, None, dB, None, None, None


class LoRAFA(nn.Module):
    """A LoRA-FA adapter: ``lora_A`` is a frozen buffer, ``lora_B`` the only trained tensor."""

    def __init__(
        self, layer: AdaptedLayer, config: LoRAConfig, *, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        in_features, out_features = layer.in_features, layer.out_features
        device = layer.weight.device
        r = config.rank
        self.config = config
        self.scaling = config.scaling
        self.dropout = config.dropout
        # Random A for embeddings too: PEFT's zero embedding A would freeze the adapter at zero.
        A = torch.empty(r, in_features, dtype=dtype, device=device)
        init_lora_A(A, config.init)
        self.register_buffer("lora_A", A)  # frozen by construction, saved with the adapter
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        if config.grad_correction:
            self.lora_B.register_hook(self._correct)

    def _correct(self, grad: torch.Tensor) -> torch.Tensor:
        """v2 correction: g_B (A Aᵀ)⁻¹ / s², with A Aᵀ (r, r) from this layer's frozen A."""
        A = self.lora_A.double()
        inv = torch.linalg.inv(A @ A.t())  # recomputed per call: r x r, negligible next to a GEMM
        return (grad.double() @ inv / self.scaling**2).to(grad.dtype)

    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """ΔW = s·B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A.to(self.lora_B.dtype)) * self.scaling

    def forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        if layer.kind == "embedding":  # backward keeps ids and the (N, r) rows of Aᵀ
            return embed_low_rank(x, layer, self.lora_A, self.lora_B, self.scaling)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        p = self.dropout if self.training else 0.0
        y = LoRAFAFunction.apply(
            x2,
            layer.weight,
            layer.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            layer.fan_in_fan_out,
            p,
        )
        return y.view(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        out, r = self.lora_B.shape
        return f"rank={r}, in={self.lora_A.shape[1]}, out={out}, scaling={self.scaling:g}, A frozen"

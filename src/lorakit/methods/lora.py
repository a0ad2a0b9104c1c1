"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

One adapter adds ``s·B A`` to a frozen weight: ``y = x Wᵀ + s·(x Aᵀ) Bᵀ`` with A (r, in) and
B (out, r), A random and B zero so training starts from the base model. For embeddings PEFT's layout
is kept: A (r, num_embeddings) is zero and B (dim, r) Gaussian, ``y = W[ids] + s·Aᵀ[ids] Bᵀ``.

A linear layer with its adapter is one autograd Function (:class:`LoRAFunction`) that keeps only
the layer input x for backward (its storage is shared by layers reading the same input, e.g.
q/k/v) and recomputes H = x Aᵀ there; PEFT keeps x and H, plus an fp32 copy of x for 16-bit
models. Adapter weights (fp32 master weights by default on a 16-bit base) are cast to the compute
dtype (a tiny r·d cast) rather than casting x, and the low-rank product is added into the base
output in place. With dropout the layer falls back to plain autograd (which also keeps the
dropped input, and 16-bit casts of fp32 A and B: r·(in + out) numbers).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..hardware import cpu_compute_dtype
from ..quant import dense, state

if TYPE_CHECKING:
    from ..config import LoRAConfig
    from ..layers import AdaptedLayer


def init_lora_A(A: torch.Tensor, init: str) -> None:
    """Initialise a down-projection A (r, in) in place: loralib's kaiming or N(0, 1/r).

    ``"gradient_svd"`` starts as kaiming; :func:`lorakit.gradient_svd_init` then sets A from data.
    """
    if init in ("kaiming", "gradient_svd"):
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(A, std=1.0 / A.shape[0])
    else:
        raise ValueError(f"init must be 'kaiming', 'gaussian' or 'gradient_svd', got {init!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype an adapted layer fed ``x`` computes in (see :func:`layer_dtypes`)."""
    return layer_dtypes(x)[1]


def layer_dtypes(x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, compute dtype) of an adapted layer fed ``x``, honouring autocast.

    The output dtype is x's dtype (the autocast dtype under autocast), and so is the compute
    dtype except for 16-bit on CPU: there it is the dtype :func:`lorakit.hardware.cpu_compute_dtype`
    chose once for this process from the CPU's flags, the 16-bit dtype itself on CPUs with bf16 /
    fp16 units (``avx512_bf16``, AMX), float32 on CPUs without (their 16-bit GEMMs are several
    times slower than fp32). Override with ``LORAKIT_CPU_COMPUTE=auto|float32|native`` or
    :func:`lorakit.hardware.set_cpu_compute`. The fp32 copies are transient, never saved for
    backward; products of 16-bit numbers are exact in fp32, so that path matches a 16-bit GEMM
    with fp32 accumulation up to summation order. Here only a cached lookup runs per call.
    """
    device = x.device.type
    out = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if device == "cpu" and out in (torch.bfloat16, torch.float16):
        return out, cpu_compute_dtype(out)
    return out, out


def add_low_rank(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Return ``y + scaling·h Bᵀ`` in y's dtype, added into y in place when autograd allows.

    y (N, out), h (N, r), B (out, r). In-place is safe for outputs of mm/addmm/embedding (their
    backward does not need their output); it saves one (N, out) temporary.
    """
    cd = compute_dtype(y)
    if cd == y.dtype:
        return y.addmm_(h.to(cd), B.to(cd).t(), alpha=scaling)
    return y.add_((h.to(cd) @ B.to(cd).t()).mul_(scaling))  # no alpha: see lora_fa's backward


def embed_low_rank(
    ids: torch.Tensor, layer: AdaptedLayer, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """An adapted embedding's output ``W[ids] + s·Aᵀ[ids] Bᵀ`` (A (r, num_embeddings), B (dim, r)).

    Autograd keeps only the ids (and, for dB, the (N, r) rows of Aᵀ).
    """
    y = layer.base_forward(ids)  # (..., dim)
    h = F.embedding(ids, A.t(), padding_idx=layer.base_layer.padding_idx)  # (..., r)
    dim = y.shape[-1]
    return add_low_rank(y.reshape(-1, dim), h.reshape(-1, h.shape[-1]), B, scaling).view(y.shape)


def _base(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool
) -> torch.Tensor:
    # x (N, in); weight (out, in), or (in, out) when fan_in_fan_out (GPT-2 Conv1D).
    w = weight if fan_in_fan_out else weight.t()
    return x @ w if bias is None else torch.addmm(bias, x, w)


class LoRAFunction(torch.autograd.Function):
    """A frozen linear plus a trainable LoRA branch, saving only the input for backward.

    Shapes: x (N, in), W (out, in) or (in, out) if fan_in_fan_out, b (out,) or None,
    A (r, in), B (out, r), s the scaling; G = ∂L/∂y (N, out).

    forward:  H = x Aᵀ (N, r);  y = x Wᵀ + b + s·H Bᵀ (N, out)
    backward: dH = s·G B (N, r);  dx = G W + dH A;  dA = dHᵀ x;  dB = s·Gᵀ H
              with H recomputed from x (an N·in·r GEMM) instead of being kept.
    saves:    x (its storage is shared with every other consumer of x, e.g. q/k/v), plus W, A,
              B, which are parameters: N·in activation elements per layer, PEFT keeps N·(in + r).
              A 4-bit W (:mod:`lorakit.quant`) is dequantized in forward and again for dx.
    dtypes:   computes in :func:`layer_dtypes`' compute dtype (on CPUs without 16-bit units,
              fp32 for 16-bit inputs, transiently), returns the output dtype (autocast's).
              A and B may be wider than x (fp32 on a bf16 base): they are cast to the compute
              dtype (r·(in + out) elements, transient), x never to theirs; dA and dB come back
              in A's and B's dtypes.
    A base weight/bias that requires grad gets dW = Gᵀ x and db = Σ G as plain linear layers do.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, fan_in_fan_out: bool):
        out_dtype, cd = layer_dtypes(x)
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(cd)
            b = None if bias is None else bias.to(cd)
            y = _base(x_c, dense(weight, cd), b, fan_in_fan_out)  # (N, out)
            h = x_c @ A.to(cd).t()  # (N, r)
            y.addmm_(h, B.to(cd).t(), alpha=scaling)
        ctx.save_for_backward(x, weight, A, B)
        ctx.qs = state(weight)
        ctx.scaling, ctx.fan_in_fan_out, ctx.cd, ctx.bias_dtype = (
            scaling,
            fan_in_fan_out,
            cd,
            None if bias is None else bias.dtype,
        )
        return y.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, A, B = ctx.saved_tensors
        s, cd = ctx.scaling, ctx.cd
        g_c, x_c, A_c = g.to(cd), x.to(cd), A.to(cd)
        dh = (g_c @ B.to(cd)) * s  # (N, r)
        dx = dW = db = dA = dB = None
        if ctx.needs_input_grad[0]:
            w = dense(weight, cd, ctx.qs)  # a 4-bit weight is dequantized again, transiently
            dx = g_c @ (w.t() if ctx.fan_in_fan_out else w)  # (N, in)
            dx = dx.addmm_(dh, A_c).to(x.dtype)
        if ctx.needs_input_grad[1]:  # only if the caller unfroze the base weight
            dW = g_c.t() @ x_c  # (out, in)
            dW = (dW.t() if ctx.fan_in_fan_out else dW).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = g_c.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            dA = (dh.t() @ x_c).to(A.dtype)  # (r, in)
        if ctx.needs_input_grad[4]:
            h = x_c @ A_c.t()  # (N, r), recomputed
            dB = ((g_c.t() @ h) * s).to(B.dtype)  # (out, r)
        return dx, dW, db, dA, dB, None, None


class LoRA(nn.Module):
    """A trainable LoRA adapter for one linear or embedding layer."""

    def __init__(
        self, layer: AdaptedLayer, config: LoRAConfig, *, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        in_features, out_features = layer.in_features, layer.out_features
        embedding, device = layer.kind == "embedding", layer.weight.device
        r = config.rank
        self.config = config
        self.scaling = config.scaling
        self.dropout = config.dropout
        self.embedding = embedding
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.embedding:  # PEFT's embedding init: A zero, B Gaussian
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        else:
            init_lora_A(self.lora_A, self.config.init)
            nn.init.zeros_(self.lora_B)

    def delta_weight(self, layer: AdaptedLayer | None = None) -> torch.Tensor:
        """ΔW = s·B A, shape (out, in) (for embeddings (dim, num_embeddings))."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """Output of ``layer`` with this adapter: ``base(x) + s·drop(x) Aᵀ Bᵀ``."""
        if layer.kind == "embedding":
            return embed_low_rank(x, layer, self.lora_A, self.lora_B, self.scaling)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in), a view for contiguous x
        if self.dropout and self.training:
            # Plain autograd: it keeps the dropped input (N, in) as well as x.
            y = layer.base_forward(x2)  # (N, out)
            xd = F.dropout(x2, self.dropout, training=True)
            h = xd @ self.lora_A.to(xd.dtype).t()  # (N, r)
            y = add_low_rank(y, h, self.lora_B, self.scaling)
        else:
            y = LoRAFunction.apply(
                x2,
                layer.weight,
                layer.bias,
                self.lora_A,
                self.lora_B,
                self.scaling,
                layer.fan_in_fan_out,
            )
        return y.view(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        out, r = self.lora_B.shape
        return (
            f"rank={r}, in={self.lora_A.shape[1]}, out={out}, scaling={self.scaling:g}, "
            f"dropout={self.dropout:g}"
        )

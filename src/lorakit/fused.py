"""Autograd Functions that keep less for backward than plain autograd, for the same function.

Used by :func:`lorakit.memory.reduce_activation_memory` (which also re-exports them): a fused
linear + cross-entropy loss that never keeps the (tokens x vocab) logits, an RMSNorm that keeps its
input and one number per row, and ``act(g) ⊙ u`` that keeps g and u but not ``act(g)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .constants import IGNORE_INDEX as IGNORE


def compute_dtype(weight: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """16-bit heads: their own dtype, or float32 where this CPU has no 16-bit units."""
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return acc
    if weight.device.type == "cpu":
        from .hardware import cpu_compute_dtype

        return cpu_compute_dtype(weight.dtype)
    return weight.dtype


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``softcap(h Wᵀ)`` against ``labels``, in chunks of tokens.

    Shapes: h (N, d), W (V, d), labels (N,) with -100 for no loss; chunk C tokens. ``softcap``
    c (Gemma 2's ``final_logit_softcapping``) maps logits z to c·tanh(z / c); None: identity.

    forward:  for each chunk: Z = softcap(h_c Wᵀ) (C, V), upcast to fp32 after the cap (as the
              model computes it); loss += Σ (logsumexp Z − Z[label]);
              G = (softmax Z − onehot) ⊙ (1 − tanh²(z / c)) (C, V);
              dh_c = G W (C, d); dW += Gᵀ h_c if W trains.
    backward: dh = g · dh;  dW = g · dW.
    saves:    dh (N, d) in h's dtype (and dW if W requires grad). Never the (N, V) logits.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int, grads: bool = True, softcap=None):
        with torch.autocast(h.device.type, enabled=False):  # the logits stay in fp32
            dh, dw, loss = _chunked_loss(h, weight, labels, chunk, grads, softcap)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        dw = None if dw is None else (dw * g).to(ctx.weight_dtype)
        return dh * g.to(dh.dtype), dw, None, None, None, None


def _chunked_loss(h, weight, labels, chunk: int, grads: bool, softcap: float | None):
    """(dh, dW, loss) of :class:`LinearCrossEntropy`; grads=False (evaluation under no_grad):
    the loss alone, no dh / dW work."""
    n = h.shape[0]
    acc = acc_dtype(h)
    loss = torch.zeros((), dtype=acc, device=h.device)
    dh = torch.zeros_like(h) if grads else None
    dw = torch.zeros_like(weight, dtype=acc) if grads and weight.requires_grad else None
    # The GEMMs run in the weight's compute dtype (a 16-bit head on GPU: its own, as the
    # unreduced model's logits are; never a whole fp32 copy of a 128k-vocabulary head),
    # the softmax in fp32.
    cd = compute_dtype(weight, acc)
    w = weight.to(cd)
    for i in range(0, n, chunk):
        hc, yc = h[i : i + chunk], labels[i : i + chunk]
        z = hc.to(cd) @ w.t()  # (C, V)
        tanh = None
        if softcap is not None:  # in the logits' dtype, before the upcast, as the model does
            z = z.div_(softcap).tanh_()
            tanh = z.to(acc, copy=True) if grads else None
            z = z.mul_(softcap)
        z = z.to(acc)
        valid = yc != IGNORE
        safe = torch.where(valid, yc, 0)
        target = z.gather(1, safe[:, None]).squeeze(1)
        # logsumexp in place (torch.logsumexp allocates a second (C, V) buffer for z - max):
        # z becomes exp(z - max), then the softmax, then the gradient w.r.t. the logits.
        top = z.amax(dim=-1)
        total = z.sub_(top[:, None]).exp_().sum(-1)
        loss += ((total.log() + top - target) * valid).sum()
        if not grads:
            continue
        z.div_(total[:, None])
        z[torch.arange(len(yc), device=z.device), safe] -= 1.0
        z.mul_(valid[:, None])
        if tanh is not None:  # d(c·tanh(z/c))/dz = 1 − tanh²
            z.mul_(tanh.square_().neg_().add_(1.0))
        dh[i : i + chunk] = (z.to(cd) @ w).to(h.dtype)
        if dw is not None:
            dw.addmm_(z.t(), hc.to(acc))
    return dh, dw, loss


class RMSNormFunction(torch.autograd.Function):
    """y = (offset + w) ⊙ x̂ with x̂ = x / rms(x) computed in fp32, cast as the model casts.

    Shapes: x (..., d), w (d,). ``offset`` 0 is LLaMA's norm, 1 Gemma's ``(1 + w)``.
    ``cast_first``: x̂ is cast to x's dtype before the product (LLaMA: ``w * x̂.to(dtype)``);
    else the product is taken in fp32 and cast after (Gemma, OLMo-2: ``(w * x̂).to(dtype)``).
    saves: x, w, rstd (one fp32 per row). backward recomputes x̂ = x·rstd;
    dx = rstd·(ĝ − x̂·mean(ĝ ⊙ x̂)) with ĝ = dy ⊙ (offset + w); dw = Σ dy ⊙ x̂ (x̂ as cast).
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float = 0.0, cast_first: bool = True):
        acc = acc_dtype(x)
        xf = x.to(acc)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        w = weight if offset == 0 else offset + weight.to(acc)
        y = w * (xf * rstd).to(x.dtype) if cast_first else (w * (xf * rstd)).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.cast_first = offset, cast_first
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        xhat = x.to(acc) * rstd
        gw = dy.to(acc) * (weight.to(acc) + ctx.offset)
        dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            used = xhat.to(x.dtype).to(acc) if ctx.cast_first else xhat
            dw = (dy.to(acc) * used).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None, None, None


# Activations whose backward ActMulFunction calls directly: the aten kernel autograd runs for
# them (the same gradients), traceable by torch.compile also under saved-tensor hooks
# (checkpointing, offload), where torch.func.vjp is refused. Found by structure.activation_grad.
KNOWN_GRADS = {
    "silu": lambda dy, g: torch.ops.aten.silu_backward(dy, g),
    "gelu": lambda dy, g: torch.ops.aten.gelu_backward(dy, g, approximate="none"),
    "gelu_tanh": lambda dy, g: torch.ops.aten.gelu_backward(dy, g, approximate="tanh"),
}


class ActMulFunction(torch.autograd.Function):
    """y = act(g) ⊙ u for an element-wise ``act`` (SiLU, GELU-tanh, ...), keeping g and u only.

    Shapes: g, u (..., f). saves: g, u; act(g) (f values per token) is recomputed.
    backward: du = dy ⊙ act(g);  dg = act'(g) ⊙ (dy ⊙ u): through the aten backward of a known
    activation (``grad`` names it in :data:`KNOWN_GRADS`), else ``torch.func.vjp`` of ``act``
    re-run on g. Either way the kernels plain autograd runs, so the gradients are the same.
    """

    @staticmethod
    def forward(ctx, g, u, act: Callable[[torch.Tensor], torch.Tensor], grad: str | None = None):
        ctx.act, ctx.grad = act, grad
        ctx.save_for_backward(g, u)
        return act(g) * u

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad[:2]
        if ctx.grad is not None:
            du = dy * ctx.act(g) if need_u else None
            dg = KNOWN_GRADS[ctx.grad](dy * u, g) if need_g else None
            return dg, du, None, None
        a, vjp = torch.func.vjp(ctx.act, g)
        du = dy * a if need_u else None
        dg = vjp(dy * u)[0] if need_g else None
        return dg, du, None, None


class SiLUMulFunction(torch.autograd.Function):
    """:class:`ActMulFunction` with act = SiLU: y = SiLU(g) ⊙ u; saves g, u."""

    @staticmethod
    def forward(ctx, g, u):
        return ActMulFunction.forward(ctx, g, u, F.silu, "silu")

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return ActMulFunction.backward(ctx, dy)[:2]

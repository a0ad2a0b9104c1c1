"""LoRAFunction: float64 gradcheck, agreement with plain autograd, and what it saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.methods.lora import LoRAFunction


def _inputs(fan_in_fan_out: bool, bias: bool, dtype=torch.float64, n=5, d_in=6, d_out=4, r=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, dtype=dtype, generator=g, requires_grad=True)
    w = (
        torch.randn(d_in, d_out, dtype=dtype, generator=g)
        if fan_in_fan_out
        else torch.randn(d_out, d_in, dtype=dtype, generator=g)
    )
    b = torch.randn(d_out, dtype=dtype, generator=g) if bias else None
    A = torch.randn(r, d_in, dtype=dtype, generator=g, requires_grad=True)
    B = torch.randn(d_out, r, dtype=dtype, generator=g, requires_grad=True)
    return x, w, b, A, B


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_float64(fan_in_fan_out, bias):
    x, w, b, A, B = _inputs(fan_in_fan_out, bias)
    assert torch.autograd.gradcheck(
        lambda x, A, B: LoRAFunction.apply(x, w, b, A, B, 0.7, fan_in_fan_out), (x, A, B)
    )


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_matches_plain_autograd(fan_in_fan_out):
    x, w, b, A, B = _inputs(fan_in_fan_out, True, dtype=torch.float32, n=16, d_in=12, d_out=10, r=4)
    g = torch.randn(16, 10)
    y = LoRAFunction.apply(x, w, b, A, B, 2.0, fan_in_fan_out)
    grads = torch.autograd.grad(y, (x, A, B), g)
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    w_oi = w.t() if fan_in_fan_out else w
    y_ref = x2 @ w_oi.t() + b + 2.0 * (x2 @ A2.t()) @ B2.t()
    ref = torch.autograd.grad(y_ref, (x2, A2, B2), g)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want)


def test_bf16_on_cpu_matches_fp32_reference():
    # 16-bit inputs on CPU: the low-rank GEMMs run in fp32, gradients come back in bf16.
    x, w, b, A, B = (
        t.detach() if t is not None else None
        for t in _inputs(False, True, torch.float32, 32, 16, 8, 4)
    )
    xb, wb, bb, Ab, Bb = (
        t.bfloat16().requires_grad_(t is not w and t is not b) for t in (x, w, b, A, B)
    )
    y = LoRAFunction.apply(xb, wb, bb, Ab, Bb, 1.5, False)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xb.grad.dtype == Ab.grad.dtype == Bb.grad.dtype == torch.bfloat16
    # Against the same bf16 inputs computed in fp32, each output within two bf16 roundings
    # (2 * 2^-8) of its magnitude |x||W|^T + |b| + s|x||A|^T|B|^T: the error bound of a sum of
    # products, whatever the CPU's bf16 GEMM (AVX-512 BF16 kernels round differently from others).
    x, w, b, A, B = (t.detach().float() for t in (xb, wb, bb, Ab, Bb))
    ref = x @ w.t() + b + 1.5 * (x @ A.t()) @ B.t()
    mag = x.abs() @ w.abs().t() + b.abs() + 1.5 * (x.abs() @ A.abs().t()) @ B.abs().t()
    assert ((y.float() - ref).abs() <= 2 * 2**-8 * mag).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_formula(dtype):
    """An injected linear keeps exactly its input, N·d_in elements, nothing of rank size."""
    n, d_in, d_out, r = 64, 48, 40, 8
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, d_in)).to(dtype)
    lk.inject(model, lk.LoRAConfig(rank=r, targets=["0", "2"]))
    x = torch.randn(n, d_in, dtype=dtype)
    _, saved = lk.count_saved(model, lambda: model(x).sum())
    el = torch.finfo(dtype).bits // 8
    # layer 0: x (input, saved for dA); tanh output (saved by tanh, also layer 2's input).
    assert saved == el * n * (d_in + d_out)

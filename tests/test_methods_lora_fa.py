"""LoRAFAFunction: float64 gradcheck, agreement with plain autograd, and that only H is saved."""

from __future__ import annotations

import pytest
import torch
from conftest import build, logits
from torch import nn

import lorakit as lk
from lorakit.methods.lora_fa import LoRAFAFunction


def _inputs(fan_in_fan_out: bool, dtype=torch.float64, n=5, d_in=6, d_out=4, r=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, dtype=dtype, generator=g, requires_grad=True)
    shape = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    w = torch.randn(shape, dtype=dtype, generator=g)
    b = torch.randn(d_out, dtype=dtype, generator=g)
    A = torch.randn(r, d_in, dtype=dtype, generator=g)
    B = torch.randn(d_out, r, dtype=dtype, generator=g, requires_grad=True)
    return x, w, b, A, B


def _seeded(fn):
    """Same dropout mask on every call (gradcheck evaluates the function many times)."""

    def call(*args):
        torch.manual_seed(1234)
        return fn(*args)

    return call


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(fan_in_fan_out, p):
    x, w, b, A, B = _inputs(fan_in_fan_out)
    fn = _seeded(lambda x, B: LoRAFAFunction.apply(x, w, b, A, B, 0.7, fan_in_fan_out, p))
    assert torch.autograd.gradcheck(fn, (x, B))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_plain_autograd(p):
    x, w, b, A, B = _inputs(False, torch.float32, n=32, d_in=12, d_out=10, r=4)
    g = torch.randn(32, 10)
    torch.manual_seed(7)
    y = LoRAFAFunction.apply(x, w, b, A, B, 2.0, False, p)
    dx, dB = torch.autograd.grad(y, (x, B), g)
    # Plain autograd with the same mask: redraw it from the same seed.
    torch.manual_seed(7)
    mask = torch.empty(32, 12).bernoulli_(1 - p) / (1 - p) if p else torch.ones(32, 12)
    x2, B2 = x.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    y_ref = x2 @ w.t() + b + 2.0 * ((x2 * mask) @ A.t()) @ B2.t()
    dx_ref, dB_ref = torch.autograd.grad(y_ref, (x2, B2), g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dB, dB_ref)


def test_dropout_does_not_disturb_global_rng():
    x, w, b, A, B = _inputs(False, torch.float32)
    torch.manual_seed(3)
    y = LoRAFAFunction.apply(x, w, b, A, B, 1.0, False, 0.5)
    after_forward = torch.get_rng_state()
    y.sum().backward()  # backward redraws the mask under a forked generator
    assert torch.equal(torch.get_rng_state(), after_forward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_formula(dtype, p):
    """Per adapted layer only H = x Aᵀ is kept: N·r elements (2·N·r bytes in bf16), never x."""
    n, d, r = 64, 48, 8
    model = nn.Sequential(nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)).to(dtype)
    lk.inject(model, lk.LoRAConfig(method="lora_fa", rank=r, dropout=p, targets="all-linear"))
    model.train()
    x = torch.randn(n, d, dtype=dtype)
    _, saved = lk.count_saved(model, lambda: model(x).sum())
    el = torch.finfo(dtype).bits // 8
    rng = torch.get_rng_state().numel() if p else 0  # the generator state, not an (N, d) mask
    assert saved == 3 * (el * n * r + rng)


def test_shared_input_not_kept_in_bf16():
    """q/k/v read one input; with LoRA-FA on all three nothing keeps it (2·N·r bytes each)."""
    n, d, r = 32, 64, 4

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            return self.q(x) + self.k(x) + self.v(x)

    model = lk.inject(QKV().bfloat16(), lk.LoRAConfig(method="lora_fa", rank=r))
    x = torch.randn(n, d, dtype=torch.bfloat16)
    _, saved = lk.count_saved(model, lambda: model(x).sum())
    assert saved == 3 * (2 * n * r)  # with plain LoRA it would be 2·N·d for x on top


def test_A_is_a_buffer_and_frozen():
    model = lk.inject(build("llama"), lk.LoRAConfig(method="lora_fa", rank=4))
    for _, layer in lk.adapted_layers(model):
        adapter = layer.adapters["default"]
        assert "lora_A" in dict(adapter.named_buffers())
        assert [n for n, _ in adapter.named_parameters()] == ["lora_B"]


def test_gradient_correction_hook():
    torch.manual_seed(0)
    model = lk.inject(build("llama"), lk.LoRAConfig(method="lora_fa", rank=4, alpha=8))
    fixed = lk.inject(
        build("llama"), lk.LoRAConfig(method="lora_fa", rank=4, alpha=8, grad_correction=True)
    )
    for (_, a), (_, b) in zip(lk.adapted_layers(model), lk.adapted_layers(fixed), strict=True):
        b.adapters["default"].lora_A.copy_(a.adapters["default"].lora_A)
    ids = torch.randint(0, 64, (2, 8))
    logits(model, ids).pow(2).mean().backward()
    logits(fixed, ids).pow(2).mean().backward()
    for (_, a), (_, b) in zip(lk.adapted_layers(model), lk.adapted_layers(fixed), strict=True):
        A, s = a.adapters["default"].lora_A.double(), a.adapters["default"].scaling
        expected = a.adapters["default"].lora_B.grad.double() @ torch.linalg.inv(A @ A.t()) / s**2
        torch.testing.assert_close(
            b.adapters["default"].lora_B.grad.double(), expected, rtol=1e-5, atol=1e-8
        )


def test_gradient_correction_only_for_lora_fa():
    with pytest.raises(ValueError, match=r"grad_correction is a LoRA-FA option; method is 'lora'"):
        lk.LoRAConfig(grad_correction=True)

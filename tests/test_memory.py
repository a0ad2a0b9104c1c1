"""reduce_activation_memory: same loss and gradients, fewer saved bytes; its Functions gradcheck."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build

import lorakit as lk
from lorakit.memory import LinearCrossEntropy, RMSNormFunction, SiLUMulFunction


def test_gradcheck_linear_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([1, 4, -100, 10, 0, -100, 3])
    assert torch.autograd.gradcheck(lambda h, w: LinearCrossEntropy.apply(h, w, y, 3), (h, w))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(LinearCrossEntropy.apply(h, w, y, 3), ref)


def test_gradcheck_rmsnorm_and_silu_mul():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), (x, w))
    u = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(SiLUMulFunction.apply, (x, u))


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


CASES = [  # (model, method, mlp mode, adapter dropout); GPT-2 has no gated MLP to "elementwise"
    *[(n, m, "recompute", 0.0) for n in ("llama", "gpt2") for m in ("lora", "lora_fa")],
    *[("llama", m, "elementwise", 0.0) for m in ("lora", "lora_fa")],
    ("llama", "lora_fa", "recompute", 0.1),  # dropout masks regenerated in the recompute
    ("gpt2", "lora_fa", "recompute", 0.1),
    ("llama", "lors", "recompute", 0.0),
    ("gpt2", "lors", "recompute", 0.0),
]


@pytest.mark.parametrize(("name", "method", "mlp", "dropout"), CASES)
def test_same_loss_and_grads_fewer_bytes(name, method, mlp, dropout):
    torch.manual_seed(0)
    cfg = lk.LoRAConfig(method=method, rank=4, dropout=dropout)
    base = lk.inject(build(name, method=method), cfg)
    for m in base.modules():  # GPT-2's dropout would draw different masks in the two runs
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for _, layer in lk.adapted_layers(base):
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.02)
    reduced = lk.reduce_activation_memory(copy.deepcopy(base), chunk_size=7, mlp=mlp)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    base.train()
    reduced.train()
    torch.manual_seed(2)  # the same adapter-dropout masks in both runs (and in the recompute)
    loss_a, saved_a = lk.count_saved(base, lambda: _loss(base, ids))
    torch.manual_seed(2)
    loss_b, saved_b = lk.count_saved(reduced, lambda: _loss(reduced, ids))
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    grads_a = {n: p.grad for n, p in base.named_parameters() if p.requires_grad}
    grads_b = {n: p.grad for n, p in reduced.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6)
    assert saved_b < saved_a


def test_rejects_other_models():
    with pytest.raises(
        ValueError, match=r"supports HF causal LMs of the LLaMA family and GPT-2 .*got MLP"
    ):
        lk.reduce_activation_memory(build("mlp"))


def test_logits_still_available_without_labels():
    model = lk.reduce_activation_memory(build("llama"))
    ids = torch.randint(0, 128, (1, 8))
    assert model(input_ids=ids).logits.shape == (1, 8, 128)


def test_mlp_recompute_keeps_only_the_mlp_input():
    """mlp="recompute" drops gate and up (2·N·d_ff fp32 values per layer) relative to
    mlp="elementwise" and adds back nothing but the MLP input, which the adapters already keep."""
    torch.manual_seed(0)
    base = lk.inject(build("llama"), lk.LoRAConfig(method="lora_fa", rank=4))
    ids = torch.randint(0, 128, (1, 16))
    saved = {}
    for mode in ("elementwise", "recompute"):
        model = lk.reduce_activation_memory(copy.deepcopy(base), mlp=mode)
        saved[mode] = lk.count_saved(model, lambda m=model: _loss(m, ids))[1]
    cfg = base.config
    layers, n, r = cfg.num_hidden_layers, 16, 4
    gate_up = layers * 2 * n * cfg.intermediate_size * 4
    adapter_h = layers * 2 * n * r * 4  # gate's and up's H = x Aᵀ, recomputed as well
    mlp_in = layers * n * cfg.hidden_size * 4  # the post-attention norm's output
    assert saved["elementwise"] - saved["recompute"] == gate_up + adapter_h - mlp_in


def test_rejects_unknown_mlp_mode():
    with pytest.raises(ValueError, match=r"mlp='fast': expected one of"):
        lk.reduce_activation_memory(build("llama"), mlp="fast")


@pytest.mark.parametrize("order", ["reduce_then_inject", "inject_then_reduce"])
def test_adapted_lm_head_trains_in_either_order(order):
    cfg = lk.LoRAConfig(rank=4, targets=["lm_head", "q_proj"])
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = lk.inject(build("llama"), cfg)
    torch.nn.init.normal_(plain.lm_head.adapters["default"].lora_B, std=0.05)
    if order == "reduce_then_inject":
        reduced = lk.reduce_activation_memory(build("llama"), chunk_size=7)
        lk.inject(reduced, cfg)
        reduced.load_state_dict(plain.state_dict())
    else:
        reduced = lk.reduce_activation_memory(copy.deepcopy(plain), chunk_size=7)
    loss_a, loss_b = _loss(plain, ids), _loss(reduced, ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    head_a, head_b = (m.lm_head.adapters["default"] for m in (plain, reduced))
    assert head_b.lora_B.grad is not None and head_b.lora_B.grad.abs().sum() > 0
    torch.testing.assert_close(head_b.lora_B.grad, head_a.lora_B.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_b.lora_A.grad, head_a.lora_A.grad, rtol=1e-4, atol=1e-6)
    # No (tokens x vocab) logits are kept for backward: the adapted head adds less than them.
    no_head = lk.reduce_activation_memory(build("llama"), chunk_size=7)
    lk.inject(no_head, cfg.replace(targets=["q_proj"]))
    _, saved = lk.count_saved(reduced, lambda: _loss(reduced, ids))
    _, saved_no_head = lk.count_saved(no_head, lambda: _loss(no_head, ids))
    assert saved - saved_no_head < 2 * 15 * 128 * 4


def test_chunked_loss_does_no_gradient_work_without_grad():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.mm += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    h = torch.randn(20, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False)
    labels = torch.randint(0, 30, (20,))
    counts = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad), CountMM() as mode:
            loss, _ = lk.memory.chunked_causal_lm_loss(h[None], head, labels[None], 7)
        counts[grad] = mode.mm
    assert counts[False] == 3  # one logits GEMM per chunk of 7 (19 predicted tokens), no dh
    assert counts[True] == 6

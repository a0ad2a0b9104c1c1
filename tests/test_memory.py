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


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_same_loss_and_grads_fewer_bytes(name, method):
    torch.manual_seed(0)
    base = lk.inject(build(name), lk.LoRAConfig(method=method, rank=4))
    for m in base.modules():  # GPT-2's dropout would draw different masks in the two runs
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for _, layer in lk.adapted_layers(base):
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.02)
    reduced = lk.reduce_activation_memory(copy.deepcopy(base), chunk_size=7)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    base.train()
    reduced.train()
    loss_a, saved_a = lk.count_saved(base, lambda: _loss(base, ids))
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

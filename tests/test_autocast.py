"""Adapted layers under torch.autocast (mixed precision on fp32 weights), and unfrozen bases."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build

import lorakit as lk


def _prune(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("proj.weight"):
                p[torch.rand(p.shape) < 0.5] = 0
    return model


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lors"])
def test_cpu_autocast_bf16(method):
    base = build("llama")
    if method == "lors":
        _prune(base)
    model = lk.inject(base, lk.LoRAConfig(method=method, rank=4))
    with torch.no_grad():
        for _, layer in lk.adapted_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.05)
    ids = torch.randint(0, 128, (2, 12))
    ref = model(input_ids=ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(float(loss) - float(ref)) < 0.05
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(
        g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads
    )


def test_chunked_loss_stays_fp32_under_autocast():
    model = lk.reduce_activation_memory(build("llama"))
    dense = build("llama")
    ids = torch.randint(0, 128, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=ids, labels=ids).loss
    want = dense(input_ids=ids, labels=ids).loss  # fp32 reference
    assert abs(float(got) - float(want)) < 0.05


def test_lora_gives_base_gradients_when_unfrozen():
    model = lk.inject(build("mlp"), lk.LoRAConfig(rank=4, targets=["fc1"]))
    ref = copy.deepcopy(model)
    layer = model.fc1
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    ids = torch.randint(0, 64, (3, 5))
    model(ids).pow(2).mean().backward()
    # reference: the same function through plain autograd
    r = ref.fc1
    w = r.weight.detach().clone().requires_grad_()
    b = r.bias.detach().clone().requires_grad_()
    a = r.adapters["default"]
    x = ref.embed(ids)
    h = x @ w.t() + b + a.scaling * (x @ a.lora_A.t()) @ a.lora_B.t()
    ref.head(torch.relu(ref.fc2(torch.relu(h)))).pow(2).mean().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)


@pytest.mark.parametrize("method", ["lora_fa", "lors"])
def test_frozen_base_methods_refuse_trainable_weight(method):
    base = _prune(build("llama")) if method == "lors" else build("llama")
    model = lk.inject(base, lk.LoRAConfig(method=method, rank=4, targets=["q_proj"]))
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=rf"{method} keeps the base weight frozen"):
        model(input_ids=torch.randint(0, 128, (1, 4)))

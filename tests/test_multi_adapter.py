"""Several named adapters on one model: add, switch, disable, delete."""

from __future__ import annotations

import copy

import torch
from conftest import build, logits, perturb

import lorakit as lk


def _two(model_name="llama"):
    base = build(model_name)
    model = lk.inject(copy.deepcopy(base), lk.LoRAConfig(rank=4, targets=["q_proj", "v_proj"]))
    perturb(model, seed=1, scale=0.1)
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["v_proj", "o_proj"]), name="b")
    with torch.no_grad():
        for _, layer in lk.adapted_layers(model):
            if "b" in layer.adapters:
                layer.adapters["b"].lora_B.normal_(0, 0.1)
    return base, model


def test_switch_and_trainability(ids):
    base, model = _two()
    assert lk.active_adapter(model) == "b"  # inject activates what it adds
    out_b = logits(model, ids)
    lk.set_adapter(model, "default")
    out_a = logits(model, ids)
    assert not torch.allclose(out_a, out_b)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)
    # q/v-only reference: adapter "default" alone must give the same output.
    ref = lk.inject(copy.deepcopy(base), lk.LoRAConfig(rank=4, targets=["q_proj", "v_proj"]))
    perturb(ref, seed=1, scale=0.1)
    torch.testing.assert_close(logits(ref, ids), out_a)


def test_disable_adapters(ids):
    base, model = _two()
    with lk.disable_adapters(model):
        assert torch.equal(logits(model, ids), logits(base, ids))
    assert not torch.equal(logits(model, ids), logits(base, ids))


def test_disable_while_merged(ids):
    base, model = _two()
    before = logits(model, ids)
    for _, layer in lk.adapted_layers(model):
        layer.merge()
    with lk.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)
    assert all(layer.merged for _, layer in lk.adapted_layers(model) if "b" in layer.adapters)


def test_delete(ids):
    base, model = _two()
    lk.set_adapter(model, "default")
    out_a = logits(model, ids)
    lk.delete_adapter(model, "b")
    assert lk.adapter_names(model) == ["default"]
    assert torch.equal(logits(model, ids), out_a)
    # o_proj had only "b": it is a plain nn.Linear again.
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    lk.delete_adapter(model, "default")
    assert not list(lk.adapted_layers(model))
    assert torch.equal(logits(model, ids), logits(base, ids))


def test_merge_picks_named_adapter(ids):
    _, model = _two()
    lk.set_adapter(model, "default")
    out_a = logits(model, ids)
    lk.merge(model, "default")
    assert not list(lk.adapted_layers(model))
    torch.testing.assert_close(logits(model, ids), out_a, rtol=0, atol=1e-5)


def test_save_each_adapter(ids, tmp_path):
    _, model = _two()
    lk.save_adapter(model, tmp_path / "a", name="default")
    lk.save_adapter(model, tmp_path / "b", name="b")
    loaded = lk.load_adapter(build("llama"), tmp_path / "a")
    lk.load_adapter(loaded, tmp_path / "b", name="b")
    for name in ("default", "b"):
        lk.set_adapter(model, name)
        lk.set_adapter(loaded, name)
        assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_unload_restores_base(ids):
    base, model = _two()
    lk.unload(model)
    assert not list(lk.adapted_layers(model))
    assert torch.equal(logits(model, ids), logits(base, ids))

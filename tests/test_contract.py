"""The contract every method must honour, on tiny LLaMA / GPT-2 / BERT configs and a plain MLP."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, logits, perturb, targets_for
from torch import nn

import lorakit as lk

TARGET_SETS = ["all-linear", "with-embedding"]


def _injected(model_name, which="all-linear", dtype=torch.float32, method="lora", **cfg):
    base = build(model_name, dtype, method=method)
    targets = targets_for(model_name, which, method)
    model = lk.inject(copy.deepcopy(base), lk.LoRAConfig(method=method, targets=targets, **cfg))
    return base, model


@pytest.mark.parametrize("which", TARGET_SETS)
def test_identity_at_init(model_name, method, which, ids):
    base, model = _injected(model_name, which, method=method)
    assert torch.equal(logits(base, ids), logits(model, ids))


@pytest.mark.parametrize("which", TARGET_SETS)
def test_changed_after_perturbing_B(model_name, method, which, ids):
    base, model = _injected(model_name, which, method=method)
    perturb(model)
    diff = (logits(base, ids) - logits(model, ids)).abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("which", TARGET_SETS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_merged_equals_unmerged(model_name, method, which, dtype, tol, ids):
    _, model = _injected(model_name, which, dtype=dtype, rank=4, alpha=8, method=method)
    perturb(model, scale=0.1)
    before = logits(model, ids)
    merged = lk.merge(model)
    assert not list(lk.adapted_layers(merged))
    kinds = {type(m).__name__ for m in merged.modules()}
    assert "AdaptedLayer" not in kinds
    torch.testing.assert_close(logits(merged, ids), before, rtol=0, atol=tol)
    if lk.LoRAConfig(method=method).capabilities.sparse_base:  # every pruned zero kept
        base = build(model_name, dtype, method=method)
        for p in lk.match_targets(base, targets_for(model_name, which, method)):
            zeros = base.get_submodule(p).weight == 0
            assert zeros.any() and not merged.get_submodule(p).weight[zeros].any(), p


def test_merge_twice_is_noop(model_name, method, ids):
    _, model = _injected(model_name, "with-embedding", method=method)
    perturb(model, scale=0.1)
    # Per layer: merging the same adapter again changes nothing.
    for _, layer in lk.adapted_layers(model):
        layer.merge()
        w = layer.weight.detach().clone()
        layer.merge()
        assert torch.equal(layer.weight, w)
    once = logits(model, ids)
    # Whole model: merge() returns plain layers; a second merge() is a no-op.
    lk.merge(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lk.merge(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, ids), once, rtol=0, atol=1e-5)


def test_unmerge_restores(model_name, method, ids):
    base, model = _injected(model_name, "with-embedding", dtype=torch.float64, method=method)
    perturb(model, scale=0.1)
    unmerged = logits(model, ids)
    for _, layer in lk.adapted_layers(model):
        layer.merge()
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-10)
    for _, layer in lk.adapted_layers(model):
        layer.unmerge()
        layer.unmerge()  # idempotent
    with lk.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", TARGET_SETS)
def test_base_bit_identical_after_adamw_step(model_name, method, which, ids):
    base, model = _injected(model_name, which, method=method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # All parameters go to the optimizer, with weight decay: frozen ones must not move.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(2):
        logits(model, ids).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    base_state = base.state_dict()
    for k, v in after.items():
        if ".adapters." not in k:
            assert torch.equal(v, base_state[k]), k
    trained = [k for k in after if k.endswith("lora_B")]
    assert trained and any(not torch.equal(after[k], before[k]) for k in trained)
    if method == "lora_fa":  # A is frozen too, bit for bit
        frozen_A = [k for k in after if k.endswith("lora_A")]
        assert frozen_A and all(torch.equal(after[k], before[k]) for k in frozen_A)
    adapter_params = {
        id(p) for _, layer in lk.adapted_layers(model) for p in layer.adapters.parameters()
    }
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapter_params


def test_only_adapter_trainable(model_name, method):
    _, model = _injected(model_name, method=method)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trained = ("lora_B",) if method == "lora_fa" else ("lora_A", "lora_B")
    assert names and all(n.endswith(trained) for n in names)
    trainable, total = lk.count_parameters(model)
    assert 0 < trainable < total


def test_state_dict_keeps_base_names(model_name, method):
    base, model = _injected(model_name, "with-embedding", method=method)
    base_keys = set(base.state_dict())
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert all(".adapters.default.lora_" in k for k in keys - base_keys)
    # A base checkpoint still loads into the injected model.
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".adapters." in k for k in missing)


@pytest.mark.parametrize("which", TARGET_SETS)
def test_exact_adapter_keys(model_name, method, which, tmp_path):
    from safetensors.torch import load_file

    base, model = _injected(model_name, which, method=method)
    paths = lk.match_targets(base, targets_for(model_name, which, method))
    lk.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected = set()
    for p in paths:
        if isinstance(base.get_submodule(p), nn.Embedding):
            expected |= {
                f"base_model.model.{p}.lora_embedding_A",
                f"base_model.model.{p}.lora_embedding_B",
            }
        else:
            expected |= {
                f"base_model.model.{p}.lora_A.weight",
                f"base_model.model.{p}.lora_B.weight",
            }
    assert keys == expected


@pytest.mark.parametrize("which", TARGET_SETS)
def test_save_load_round_trip(model_name, method, which, ids, tmp_path):
    _, model = _injected(model_name, which, rank=4, alpha=8, method=method)
    perturb(model, scale=0.1)
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(build(model_name, method=method), tmp_path / "a")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = lk.load_adapter(build(model_name, method=method), tmp_path / "a", trainable=True)
    assert lk.count_parameters(trainable)[0] == lk.count_parameters(model)[0]


def test_all_linear_skips_heads():
    for name, head in [
        ("llama", "lm_head"),
        ("gpt2", "lm_head"),
        ("bert", "cls.predictions.decoder"),
    ]:
        paths = lk.match_targets(build(name), "all-linear")
        assert head not in paths
        assert paths
    gpt2 = lk.match_targets(build("gpt2"), "all-linear")
    assert "transformer.h.0.attn.c_attn" in gpt2 and "transformer.h.1.mlp.c_fc" in gpt2
    llama = lk.match_targets(build("llama"), "all-linear")
    assert len(llama) == 2 * 7


def test_target_forms():
    model = build("llama")
    suffix = lk.match_targets(model, ["q_proj", "v_proj"])
    regex = lk.match_targets(model, r".*\.(q|v)_proj")
    assert suffix == regex and len(suffix) == 4
    assert lk.match_targets(model, r"model\.layers\.0\.self_attn\.q_proj") == [
        "model.layers.0.self_attn.q_proj"
    ]


def test_rslora_scaling():
    cfg = lk.LoRAConfig(rank=16, alpha=32, use_rslora=True)
    assert cfg.scaling == pytest.approx(8.0)
    assert lk.LoRAConfig(rank=16, alpha=32).scaling == pytest.approx(2.0)


def test_adapter_dtype_fp32_on_16bit_bases_unless_asked():
    def dtypes(model):
        return {
            p.dtype for _, layer in lk.adapted_layers(model) for p in layer.adapters.parameters()
        }

    _, model = _injected("llama", dtype=torch.float64)
    assert dtypes(model) == {torch.float64}
    _, model = _injected("llama", dtype=torch.bfloat16, adapter_dtype="bfloat16")
    assert dtypes(model) == {torch.bfloat16}
    _, model = _injected("llama", dtype=torch.bfloat16)
    assert dtypes(model) == {torch.float32}
    ids = torch.randint(0, 64, (1, 8))
    model.train()
    logits(model, ids).float().mean().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32
        for _, layer in lk.adapted_layers(model)
        for p in layer.adapters.parameters()
    )


def test_dropout_only_in_training(ids):
    _, model = _injected("llama", dropout=0.5)
    perturb(model, scale=0.1)
    model.eval()
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    torch.manual_seed(0)
    a = logits(model, ids)
    torch.manual_seed(1)
    assert not torch.equal(a, logits(model, ids))


@pytest.mark.parametrize("order", ["merge", "layer_merge_then_merge", "layer_merge_then_unload"])
def test_tied_embedding_flag_follows_the_weights(tiny, order, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert model.config.tie_word_embeddings
    ids = torch.randint(0, 100, (1, 8))
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["embed_tokens", "q_proj"]))
    perturb(model, scale=0.1)
    if order != "merge":
        for _, layer in lk.adapted_layers(model):
            layer.merge()
    expected = logits(model, ids)
    (lk.unload if order.endswith("unload") else lk.merge)(model)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert model.config.tie_word_embeddings == tied
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=1e-5)
    if order != "layer_merge_then_unload":
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)

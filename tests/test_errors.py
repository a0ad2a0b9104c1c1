"""Bad input gets a clear error naming the problem and what is allowed, and changes nothing."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import build, logits, perturb
from torch import nn

import lorakit as lk


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank must be a positive int, got 0"),
        ({"rank": -3}, r"rank must be a positive int, got -3"),
        ({"rank": 2.5}, r"rank must be a positive int"),
        ({"alpha": 0}, r"alpha must be a positive number, got 0"),
        ({"alpha": -1.0}, r"alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\)"),
        ({"method": "dora"}, r"method must be one of \['lora', 'lora_fa', 'lors'\], got 'dora'"),
        ({"init": "orthogonal"}, r"init must be one of"),
        ({"bias": "all"}, r"bias must be 'none'"),
        ({"targets": []}, r"targets must be"),
        ({"adapter_dtype": "int8"}, r"adapter_dtype must be None"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lk.LoRAConfig(**kwargs)


def test_unknown_config_keys():
    with pytest.raises(
        ValueError, match=r"unknown LoRAConfig keys \['lora_rank'\]; allowed keys are \["
    ):
        lk.LoRAConfig.from_dict({"rank": 4, "lora_rank": 4})


def test_no_target_matches_lists_layers():
    model = build("llama")
    with pytest.raises(
        ValueError,
        match=r"matched no layer.*q_proj x2 \(Linear, e\.g\. 'model\.layers\.0\.self_attn\.q_proj'\)",
    ):
        lk.inject(model, lk.LoRAConfig(targets=["query"]))
    with pytest.raises(ValueError, match=r"targets \['v_prj'\] matched no layer"):
        lk.inject(model, lk.LoRAConfig(targets=["q_proj", "v_prj"]))
    with pytest.raises(ValueError, match=r"matched no layer"):
        lk.inject(model, lk.LoRAConfig(targets=r".*\.nothing"))
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        lk.inject(model, lk.LoRAConfig(targets="(["))
    assert not list(lk.adapted_layers(model))


def test_rank_larger_than_layer():
    model = build("llama")  # k_proj is 32 -> 16
    with pytest.raises(
        ValueError,
        match=r"rank must be a positive int <= min\(in, out\) = 16, got 20 for model\.layers\.0\.self_attn\.k_proj",
    ):
        lk.inject(model, lk.LoRAConfig(rank=20))
    assert not list(lk.adapted_layers(model))  # nothing half-injected


def test_inject_twice_same_name():
    model = lk.inject(build("llama"), lk.LoRAConfig(targets=["q_proj"]))
    with pytest.raises(
        ValueError,
        match=r"layer model\.layers\.0\.self_attn\.q_proj already has an adapter named 'default'",
    ):
        lk.inject(model, lk.LoRAConfig(targets=["q_proj"]))
    lk.inject(model, lk.LoRAConfig(targets=["q_proj"]), name="second")  # another name is fine
    assert lk.adapter_names(model) == ["default", "second"]


def test_lors_needs_zeros():
    with pytest.raises(
        ValueError, match=r"none of the 3 target layers has a zero weight .* prune first"
    ):
        lk.inject(build("mlp"), lk.LoRAConfig(method="lors"))


def test_bad_adapter_name():
    with pytest.raises(ValueError, match=r"adapter name must be a non-empty string without '\.'"):
        lk.inject(build("mlp"), lk.LoRAConfig(), name="a.b")


def test_unknown_adapter_name():
    model = lk.inject(build("mlp"), lk.LoRAConfig())
    for fn in (lk.set_adapter, lk.delete_adapter):
        with pytest.raises(
            ValueError, match=r"no adapter named 'nope'; the model has \['default'\]"
        ):
            fn(model, "nope")


@pytest.fixture
def saved(tmp_path):
    model = lk.inject(build("llama"), lk.LoRAConfig(rank=4, targets=["q_proj", "v_proj"]))
    perturb(model, scale=0.1)
    return lk.save_adapter(model, tmp_path / "adapter")


def _unchanged(model, ids, before):
    assert not list(lk.adapted_layers(model))
    assert torch.equal(logits(model, ids), before)


def test_load_shape_mismatch_names_module_and_shapes(saved, ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    before = logits(other, ids)
    with pytest.raises(
        ValueError,
        match=r"adapter shapes do not fit module model\.layers\.0\.self_attn\.q_proj: lora_A \(4, 32\) and lora_B \(32, 4\), but the layer needs \(4, 48\) and \(48, 4\)",
    ):
        lk.load_adapter(other, saved)
    _unchanged(other, ids, before)


def test_load_unknown_module(saved, ids):
    model = build("gpt2")
    before = logits(model, ids)
    with pytest.raises(
        ValueError,
        match=r"adapter has weights for module 'model\.layers\.0\.self_attn\.q_proj', which does not exist in this model \(GPT2LMHeadModel\)",
    ):
        lk.load_adapter(model, saved)
    _unchanged(model, ids, before)


def test_load_truncated_file(saved, ids):
    f = saved / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    model = build("llama")
    before = logits(model, ids)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated or corrupted"):
        lk.load_adapter(model, saved)
    _unchanged(model, ids, before)


def test_load_corrupted_header(saved):
    f = saved / "adapter_model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=r"truncated or corrupted"):
        lk.load_adapter(build("llama"), saved)


def test_load_refuses_pickle(saved):
    (saved / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, saved / "adapter_model.bin")
    with pytest.raises(
        ValueError, match=r"refusing to load .*adapter_model\.bin: it is a pickle file"
    ):
        lk.load_adapter(build("llama"), saved)


def test_load_bad_config(saved):
    (saved / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        lk.load_adapter(build("llama"), saved)
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match=r"only LoRA adapters are supported, got peft_type='IA3'"):
        lk.load_adapter(build("llama"), saved)
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(ValueError, match=r"use_dora=True is not supported"):
        lk.load_adapter(build("llama"), saved)


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter folder .*nope does not exist"):
        lk.load_adapter(build("llama"), tmp_path / "nope")


def test_load_twice_same_name(saved):
    model = lk.load_adapter(build("llama"), saved)
    with pytest.raises(ValueError, match=r"already has an adapter named 'default'"):
        lk.load_adapter(model, saved)
    lk.load_adapter(model, saved, name="again")


def test_save_without_adapter(tmp_path):
    with pytest.raises(ValueError, match=r"no adapter named None to save"):
        lk.save_adapter(build("mlp"), tmp_path)


def test_failed_save_keeps_previous_file(saved, monkeypatch):
    before = (saved / "adapter_model.safetensors").read_bytes()
    model = lk.inject(build("llama"), lk.LoRAConfig(rank=4, targets=["q_proj"]))

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapter(model, saved)
    assert (saved / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in saved.iterdir() if p.name.endswith(".tmp")]


# Each switches on a PEFT LoRA variant lorakit does not implement: loading it as plain LoRA
# would compute something else.
PEFT_VARIANTS = {
    "use_dora": True,
    "lora_bias": True,
    "alora_invocation_tokens": [1, 2],
    "use_bdlora": True,
    "kasa_config": {"k": 1},
    "velora_config": {"v": 1},
    "monteclora_config": {"m": 1},
    "arrow_config": {"a": 1},
    "use_qalora": True,
    "layer_replication": [[0, 1]],
    "trainable_token_indices": [3],
    "megatron_config": {"tp": 2},
    "lora_ga_config": {"direction": "ArBr"},
    "some_future_variant": True,
    **{f"init_lora_weights={v}": v for v in ("pissa", "pissa_niter_4", "olora", "loftq")},
    **{f"init_lora_weights={v}": v for v in ("corda", "lora_ga", "mica")},
}


@pytest.mark.parametrize("key", list(PEFT_VARIANTS))
def test_load_refuses_peft_variants(saved, key):
    value = PEFT_VARIANTS[key]
    key = key.split("=")[0]
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    model = build("llama")
    with pytest.raises(ValueError, match=rf"{key}={re.escape(repr(value))} is not supported"):
        lk.load_adapter(model, saved)
    assert not list(lk.adapted_layers(model))


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_load_accepts_inits_that_keep_the_base(saved, init, ids):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    assert list(lk.adapted_layers(lk.load_adapter(build("llama"), saved)))


def test_multihead_attention_out_proj():
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True))
    paths = lk.match_targets(model, "all-linear")
    assert "0.self_attn.out_proj" not in paths and "0.linear1" in paths
    with pytest.raises(ValueError, match=r"0\.self_attn\.out_proj is the out_proj of an nn\.Mult"):
        lk.inject(model, lk.LoRAConfig(targets=["out_proj"]))
    assert not list(lk.adapted_layers(model))
    lk.inject(model, lk.LoRAConfig(rank=2))  # all-linear: the adapted layers all run
    x = torch.randn(2, 5, 16)
    model.train()
    model(x).pow(2).mean().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for _, layer in lk.adapted_layers(model)
        for p in [layer.adapters["default"].lora_B]
    )

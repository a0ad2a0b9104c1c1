"""PEFT loads what we save and we load what PEFT saves, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODELS, build, logits, perturb, targets_for
from safetensors.torch import load_file

import lorakit as lk

peft = pytest.importorskip("peft")


def _targets(name: str, which: str):
    return "all-linear" if which == "all-linear" else MODELS[name][1]


@pytest.mark.parametrize("which", ["all-linear", "with-embedding"])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_ours(model_name, method, which, rslora, ids, tmp_path):
    """PEFT either computes exactly what lorakit computes, or refuses the adapter."""
    model = lk.inject(
        build(model_name, method=method),
        lk.LoRAConfig(
            method=method,
            rank=4,
            alpha=8,
            targets=targets_for(model_name, which, method),
            use_rslora=rslora,
        ),
    )
    perturb(model, scale=0.1)
    ours = logits(model, ids)
    lk.save_adapter(model, tmp_path)
    base = build(model_name, method=method)
    if lk.LoRAConfig(method=method).capabilities.peft_exact:
        peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
        peft_model.eval()
        torch.testing.assert_close(logits(peft_model, ids), ours, rtol=0, atol=1e-5)
    else:  # e.g. LoRS: PEFT would apply s·B A unmasked (dense logits, a dense merge)
        with pytest.raises(KeyError, match=method.upper()):
            peft.PeftModel.from_pretrained(base, tmp_path)
    # lorakit itself round-trips every method exactly.
    loaded = lk.load_adapter(build(model_name, method=method), tmp_path)
    assert torch.equal(logits(loaded, ids), ours)


@pytest.mark.parametrize("which", ["all-linear", "with-embedding"])
def test_we_load_peft(model_name, which, ids, tmp_path):
    targets = _targets(model_name, which)
    peft_targets = "all-linear" if targets == "all-linear" else list(targets)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets, init_lora_weights=False)
    peft_model = peft.get_peft_model(build(model_name), cfg)
    peft_model.eval()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    ours = lk.load_adapter(build(model_name), tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)
    # ... and the same set of layers was adapted.
    peft_layers = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and (m.lora_A or m.lora_embedding_A)
    }
    assert {p for p, _ in lk.adapted_layers(ours)} == peft_layers


def test_we_load_peft_rank_and_alpha_patterns(ids, tmp_path):
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 3},
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(build("llama"), cfg).eval()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    ours = lk.load_adapter(build("llama"), tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)


def test_config_fields(ids, tmp_path):
    src = lk.inject(build("llama"), lk.LoRAConfig(rank=4, alpha=8, targets=["q_proj"]))
    perturb(src, scale=0.1)
    lk.save_adapter(src, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["q_proj"]
    peft_model = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "a").eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(src, ids), rtol=0, atol=1e-5)


def test_target_modules_regex_when_suffixes_overreach(ids, tmp_path):
    # Only layer 0's q_proj: the leaf name "q_proj" would select layer 1 too, so a regex is written.
    model = lk.inject(
        build("llama"), lk.LoRAConfig(rank=2, targets=r"model\.layers\.0\.self_attn\.q_proj")
    )
    perturb(model, scale=0.1)
    lk.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)
    peft_model = peft.PeftModel.from_pretrained(build("llama"), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=0, atol=1e-5)
    assert sum(1 for _ in peft_model.named_modules() if _[0].endswith("q_proj")) == 2


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


def test_modules_to_save_both_ways(ids, tmp_path):
    """A classifier head trained fully next to the adapter travels with it, both directions."""
    model = lk.inject(
        _bert_cls(),
        lk.LoRAConfig(rank=4, targets=["query", "value"], modules_to_save=["classifier"]),
    )
    assert all(p.requires_grad for p in model.classifier.parameters())
    perturb(model, scale=0.1)
    with torch.no_grad():
        model.classifier.weight.normal_()
    ours = logits(model, ids)
    lk.save_adapter(model, tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(_bert_cls(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=0, atol=1e-5)
    reloaded = lk.load_adapter(_bert_cls(), tmp_path / "ours")
    torch.testing.assert_close(logits(reloaded, ids), ours, rtol=0, atol=1e-6)

    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query"],
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    theirs = peft.get_peft_model(_bert_cls(), cfg).eval()
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "theirs")
    ours2 = lk.load_adapter(_bert_cls(), tmp_path / "theirs")
    torch.testing.assert_close(logits(ours2, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_default_adapter_dtype_is_peft_s(dtype, tmp_path):
    """lorakit's default adapter dtype is PEFT's on every base dtype (fp32 master weights on a
    16-bit base: its autocast_adapter_dtype), and both write it to disk as it is."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(build("llama", dtype), cfg)
    ours = lk.inject(build("llama", dtype), lk.LoRAConfig(rank=4, targets=["q_proj", "v_proj"]))
    peft_dtypes = {p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == peft_dtypes
    theirs.save_pretrained(tmp_path / "theirs")
    lk.save_adapter(ours, tmp_path / "ours")
    for folder in ("theirs", "ours"):
        tensors = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert {t.dtype for t in tensors.values()} == peft_dtypes


def test_cli_bf16_training_writes_fp32_adapters_peft_loads(tiny, tmp_path):
    """`lorakit train --dtype bfloat16` trains fp32 adapters and saves them as PEFT would; PEFT
    loads them onto the bf16 base and computes what lorakit computes (up to bf16 rounding of the
    base layers' outputs, far below what the adapter changes)."""
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    data = tmp_path / "text.txt"
    data.write_text("to be or not to be, that is the question. " * 200)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny), "--data", str(data), "--dtype", "bfloat16"]
    args += ["--rank", "4", "--max-steps", "3", "--batch-size", "4", "--max-len", "32"]
    assert main([*args, "--lr", "1e-2", "--output", str(out), "--no-progress"]) == 0
    adapter = out / "adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).eval()

    ours = lk.load_adapter(base(), adapter)
    theirs = peft.PeftModel.from_pretrained(base(), adapter).eval()
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    assert {
        t.dtype for _, layer in lk.adapted_layers(ours) for t in layer.adapters.parameters()
    } == {torch.float32}
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, plain = (logits(m, ids).float() for m in (ours, theirs, base()))
    tol = 4 * 2**-8 * want.abs().max()  # a few bf16 roundings of the logits' scale
    assert (got - want).abs().max() <= tol
    assert (want - plain).abs().max() > 10 * tol  # the adapter trained to something visible

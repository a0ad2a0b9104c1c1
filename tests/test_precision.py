"""Wider choices: float16 training with a loss scaler (its state checkpointed and resumed),
--attn-implementation, `lorakit generate --quantize`, and the `lorakit.train(...)` entry point."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import perturb
from safetensors.torch import load_file

import lorakit as lk
from lorakit.cli import main
from lorakit.train import TrainConfig, train

train_mod = importlib.import_module("lorakit.train")


def _flat(tiny, data_file, out, **kw) -> dict:
    flat = dict(
        model=str(tiny), data=str(data_file), rank=4, alpha=8, max_steps=4, batch_size=4,
        lr=5e-3, max_len=64, save_every=2, output=str(out), progress=False,
    )  # fmt: skip
    return flat | kw


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


# -- float16 ----------------------------------------------------------------------------------


def _state(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())


def test_float16_trains_fp32_adapters_and_resumes_with_its_scaler(
    tiny, data_file, tmp_path, monkeypatch
):
    """A resume from step 2 continues with the saved loss-scaler state (its scale and the count
    of steps since the last overflow), reaching the uninterrupted run's adapter and scaler."""
    cfg = TrainConfig.from_flat(_flat(tiny, data_file, tmp_path / "full", dtype="float16"))
    model = train(cfg)["model"]
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}
    full = _state(tmp_path / "full")["grad_scaler"]
    assert full["_growth_tracker"] > 0
    real, calls = train_mod.batch_loss, {"n": 0}

    def crash_in_step_3(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(model, batch)

    cut = TrainConfig.from_flat(_flat(tiny, data_file, tmp_path / "cut", dtype="float16"))
    with monkeypatch.context() as m:
        m.setattr(train_mod, "batch_loss", crash_in_step_3)
        with pytest.raises(RuntimeError, match="killed"):
            train(cut)
    assert _state(tmp_path / "cut")["step"] == 2
    train(cut, resume=True)
    assert _state(tmp_path / "cut")["grad_scaler"] == full
    want, got = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_float16_overflow_skips_the_step_instead_of_stopping(
    tiny, data_file, tmp_path, monkeypatch
):
    real = train_mod.batch_loss
    monkeypatch.setattr(train_mod, "batch_loss", lambda m, b: real(m, b) * 1e30)  # finite loss
    flat = _flat(tiny, data_file, tmp_path / "run", dtype="float16", max_steps=1)
    train(TrainConfig.from_flat(flat))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert not math.isfinite(row["grad_norm"])  # its gradients overflowed in float16
    assert _state(tmp_path / "run")["grad_scaler"]["scale"] == 2.0**15  # halved from 2^16
    b = [t for k, t in _adapter(tmp_path / "run").items() if "lora_B" in k]
    assert b and all(not t.any() for t in b)  # the step was skipped: B still zero


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "full"}, r"dtype float16 trains with a loss scaler, .*full fine-tuning"),
        ({"adapter_dtype": "float16"}, r"got adapter_dtype='float16'\. Leave adapter_dtype"),
        ({"strategy": "fsdp"}, r"dtype float16 with strategy fsdp: .* use strategy ddp"),
    ],
)
def test_float16_refuses_what_it_cannot_scale(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_flat({"dtype": "float16", **kw})


def test_float16_refuses_fully_trained_float16_modules(tiny, data_file, tmp_path):
    cfg = _flat(tiny, data_file, tmp_path / "run", dtype="float16", modules_to_save=["norm"])
    with pytest.raises(ValueError, match=r"1 trainable tensors are float16 \(modules trained"):
        train(TrainConfig.from_flat(cfg))


# -- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_model(tiny, data_file, tmp_path, attention):
    """Also with reduce_memory, which otherwise switches attention to sdpa."""
    flat = _flat(tiny, data_file, tmp_path / "run", max_steps=1, reduce_memory=True)
    result = train(TrainConfig.from_flat(flat | {"attn_implementation": attention}))
    assert result["model"].config._attn_implementation == attention
    model, _ = lk.load_model(tiny, attn_implementation=attention)
    assert model.config._attn_implementation == attention


def test_bad_attn_implementation_is_refused(capsys):
    with pytest.raises(ValueError, match=r"attn_implementation must be one of \['auto', 'eager'"):
        TrainConfig(attn_implementation="flash")
    with pytest.raises(SystemExit):
        main(["eval", "--attn-implementation", "flash"])
    assert "invalid choice: 'flash' (choose from 'auto', 'eager', 'sdpa'" in capsys.readouterr().err


# -- generate --quantize ------------------------------------------------------------------------


def test_generate_on_a_4bit_base_keeps_the_adapter_unmerged(tiny, tmp_path, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from lorakit import models
    from lorakit.generate import reply
    from lorakit.quant import is_quantized

    model, tok = lk.load_model(tiny)
    lk.inject(model, lk.LoRAConfig(rank=4))
    perturb(model, scale=0.05)
    lk.save_adapter(model, tmp_path / "adapter")
    base, tok = lk.load_model(tiny, quantize="nf4")
    lk.load_adapter(base, tmp_path / "adapter")
    chat = [{"role": "user", "content": "Hello there"}]
    want = reply(base, tok, chat, max_new_tokens=6, temperature=0, stream=False)
    loaded, real = [], models.load_model

    def spy(*a, **k):
        loaded.append(real(*a, **k)[0])
        return loaded[-1], tok

    monkeypatch.setattr(models, "load_model", spy)
    capsys.readouterr()
    args = ["generate", "--model", str(tiny), "--adapter", str(tmp_path / "adapter")]
    args += ["--prompt", "Hello there", "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*args, "--quantize", "nf4"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()
    assert any(is_quantized(p) for p in loaded[0].parameters())
    assert lk.adapter_names(loaded[0]) == ["default"]  # not merged into the 4-bit layers


# -- lorakit.train(...) ---------------------------------------------------------------------------


def test_train_entry_point_takes_the_cli_config(tiny, data_file, tmp_path):
    assert "train" in lk.__all__ and "TrainConfig" in lk.__all__
    summary = lk.train(**_flat(tiny, data_file, tmp_path / "kw", method="lora_fa", max_steps=2))
    assert summary["method"] == "lora_fa" and summary["steps"] == 2
    assert summary == json.loads((tmp_path / "kw" / "summary.json").read_text())
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(_flat(tiny, data_file, tmp_path / "file", lr="4e-3")))
    summary = lk.train(run_file, max_steps=1)  # keywords override the file, as flags do
    assert summary["steps"] == 1 and summary["output"] == str(tmp_path / "file")
    cfg = TrainConfig.from_flat(_flat(tiny, data_file, tmp_path / "cfg", max_steps=1))
    assert lk.train(cfg)["steps"] == 1
    assert lk.train(cfg, resume=True)["steps"] == 1  # a finished run: nothing more to do
    with pytest.raises(ValueError, match=r"unknown config keys \['epochz'\]"):
        lk.train(cfg, epochz=3)
    with pytest.raises(TypeError, match=r"config must be a TrainConfig, .* got int"):
        lk.train(3)

"""The training loop on a tiny LLaMA: determinism, kill-and-resume, failures that keep checkpoints."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import checkpoint, tasks
from lorakit.train import TrainConfig, find_checkpoint, train

train_mod = importlib.import_module("lorakit.train")  # lk.train is the entry point


def _cfg(tiny, data_file, out, **kw) -> TrainConfig:
    base = dict(
        model=str(tiny), data=str(data_file), rank=4, alpha=8, max_steps=6, batch_size=4,
        micro_batch_size=2, lr=5e-3, max_len=64, save_every=2, output=str(out), progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig.from_flat(base)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_runs_and_writes_everything(tiny, data_file, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(tiny, data_file, out, val_data=str(data_file)))["summary"]
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "metrics.csv",
        "loss.png",
        "summary.json",
        "config.yaml",
        "checkpoint/trainer_state.json",
    ):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert summary["steps"] == 6 and 0 < summary["trainable_params"] < summary["total_params"]
    assert "val_accuracy" in summary


def test_accumulation_matches_full_batch(tiny, data_file, tmp_path):
    a = train(_cfg(tiny, data_file, tmp_path / "a", micro_batch_size=0, max_steps=2))
    b = train(_cfg(tiny, data_file, tmp_path / "b", micro_batch_size=1, max_steps=2))
    del a, b
    wa, wb = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def _crash_at_call(monkeypatch, n: int, exc: BaseException) -> None:
    """Make the n-th forward of the training loop raise ``exc`` (one per micro-batch)."""
    real, calls = train_mod.batch_loss, {"n": 0}

    def wrapped(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(model, batch)

    monkeypatch.setattr(train_mod, "batch_loss", wrapped)


def test_resume_in_process_is_bit_identical(tiny, data_file, tmp_path, monkeypatch):
    train(_cfg(tiny, data_file, tmp_path / "full"))
    with monkeypatch.context() as m:
        _crash_at_call(m, 6, KeyboardInterrupt())  # dies during step 3
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(tiny, data_file, tmp_path / "cut"))
    assert (
        json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())["step"]
        == 2
    )
    train(_cfg(tiny, data_file, tmp_path / "cut"), resume=True)
    full, cut = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)
    rows = [
        json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, 7))


def test_kill_and_resume_subprocess(tiny, data_file, tmp_path):
    """SIGKILL a real `lorakit train` after a checkpoint, resume, get the uninterrupted adapter."""
    args = [
        sys.executable, "-m", "lorakit", "train", "--model", str(tiny), "--data", str(data_file),
        "--rank", "4", "--alpha", "8", "--max-steps", "40", "--batch-size", "4", "--lr", "5e-3",
        "--max-len", "64", "--save-every", "2", "--no-progress", "--eval-examples", "4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [*args, "--output", str(tmp_path / "full")], check=True, env=env, capture_output=True
    )
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "--output", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        ckpt = find_checkpoint(out)
        if ckpt is not None and json.loads((ckpt / "trainer_state.json").read_text())["step"] >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads((find_checkpoint(out) / "trainer_state.json").read_text())["step"]
    assert 4 <= step < 40, "the run should have been killed mid-way"
    subprocess.run(
        [*args, "--output", str(out), "--resume"], check=True, env=env, capture_output=True
    )
    full, resumed = _adapter(tmp_path / "full"), _adapter(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_resume_with_different_config_is_refused(tiny, data_file, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny, data_file, out, max_steps=2))
    with pytest.raises(
        ValueError,
        match=r"cannot resume: the config differs .* \['rank', 'lr'\] \(rank: 4 -> 8, lr: 0\.005 -> 0\.001\)",
    ):
        train(_cfg(tiny, data_file, out, max_steps=2, rank=8, lr=1e-3), resume=True)


def test_fresh_run_refuses_to_overwrite_checkpoint(tiny, data_file, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny, data_file, out, max_steps=2))
    with pytest.raises(
        FileExistsError,
        match=r"already holds a checkpoint; pass --resume to continue or --overwrite",
    ):
        train(_cfg(tiny, data_file, out, max_steps=2))


def test_resume_without_checkpoint(tiny, data_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint under"):
        train(_cfg(tiny, data_file, tmp_path / "none"), resume=True)


def test_nan_loss_stops_and_keeps_checkpoint(tiny, data_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = tasks.token_losses
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan") if calls["n"] > 6 else loss), n  # step 4 (2 micro-batches/step)

    monkeypatch.setattr(tasks, "token_losses", poisoned)
    with pytest.raises(
        FloatingPointError,
        match=r"loss is nan at step 4; stopping before the optimizer step\. The last good checkpoint is .*checkpoint",
    ):
        train(_cfg(tiny, data_file, out))
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    load_file(out / "checkpoint" / "adapter" / "adapter_model.safetensors")


def test_interrupted_save_keeps_previous_checkpoint(tiny, data_file, tmp_path, monkeypatch):
    """The step-4 checkpoint save dies half-way: the step-2 checkpoint stays whole and loadable."""
    import safetensors.torch

    out = tmp_path / "run"
    real, calls = safetensors.torch.save_file, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # 2 files per checkpoint: the 2nd checkpoint's second file
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(_cfg(tiny, data_file, out, max_steps=6, save_every=2))
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    load_file(out / "checkpoint" / "trainer_state.safetensors")
    load_file(out / "checkpoint" / "adapter" / "adapter_model.safetensors")
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint-")]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    train(_cfg(tiny, data_file, out, max_steps=6, save_every=2), resume=True)


def test_full_finetuning_baseline(tiny, data_file, tmp_path):
    out = tmp_path / "full"
    summary = train(_cfg(tiny, data_file, out, method="full", max_steps=2, lr=1e-4))["summary"]
    assert summary["trainable_params"] == summary["total_params"]
    assert (out / "model" / "config.json").exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 6, "micro_batch_size": 4},
        {"method": "dora"},
        {"max_steps": 0},
        {"device": "gpu0"},
        {"strategy": "zero3"},
    ],
)
def test_bad_train_config(tiny, data_file, tmp_path, bad):
    with pytest.raises(ValueError, match=r"must|valid choices"):
        _cfg(tiny, data_file, tmp_path, **bad)


def test_local_file_has_no_implicit_validation(tiny, data_file, tmp_path):
    summary = train(_cfg(tiny, data_file, tmp_path / "run", max_steps=1))["summary"]
    assert not any(k.startswith("val_") for k in summary)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorakit.models import minilm_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_seq_cls_resume_restores_head(tiny_bert, data_file, tmp_path, monkeypatch):
    """An encoder classifier trains its new head fully; a resumed run restores it exactly."""
    cfg = dict(model=str(tiny_bert), task="seq-cls", micro_batch_size=0)
    full = train(_cfg(tiny_bert, data_file, tmp_path / "full", **cfg))
    head = {k: v.clone() for k, v in full["model"].classifier.state_dict().items()}
    with monkeypatch.context() as m:
        _crash_at_call(m, 3, KeyboardInterrupt())  # one forward per step: dies in step 3
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(tiny_bert, data_file, tmp_path / "cut", **cfg))
    resumed = train(_cfg(tiny_bert, data_file, tmp_path / "cut", **cfg), resume=True)
    for k, v in resumed["model"].classifier.state_dict().items():
        assert torch.equal(v, head[k]), k
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("classifier.weight") for k in a)


def test_gradient_svd_init_in_training(tiny, data_file, tmp_path):
    summary = train(
        _cfg(tiny, data_file, tmp_path / "g", init="gradient_svd", init_samples=8, max_steps=2)
    )
    assert summary["summary"]["steps"] == 2
    with pytest.raises(
        ValueError,
        match=r"init must be one of \['kaiming', 'gaussian', 'gradient_svd'\], got 'orth",
    ):
        _cfg(tiny, data_file, tmp_path, init="orthogonal")


def test_checkpoint_restores_the_cuda_rng_of_every_device(tiny, data_file, tmp_path, monkeypatch):
    from conftest import build

    import lorakit as lk

    cfg = _cfg(tiny, data_file, tmp_path)
    model = lk.inject(build("llama"), lk.LoRAConfig(rank=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    # Two (faked) CUDA devices in use, each with its own generator state.
    gens = {
        0: torch.tensor([1, 2, 3], dtype=torch.uint8),
        1: torch.tensor([4, 5], dtype=torch.uint8),
    }
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    monkeypatch.setattr(checkpoint, "_cuda_devices", lambda tensors: devices)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: gens[d.index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: gens.__setitem__(d.index, s))
    checkpoint.save_checkpoint(tmp_path / "ck", model, opt, sched, cfg, 3)
    want = {i: g.clone() for i, g in gens.items()}
    gens.update({0: torch.tensor([9], dtype=torch.uint8), 1: torch.tensor([8], dtype=torch.uint8)})
    cpu = torch.get_rng_state()
    torch.rand(3)  # the CPU generator moves on too
    meta = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    assert checkpoint.load_trainer_state(tmp_path / "ck", meta, opt, sched, cfg) == 3
    assert all(torch.equal(gens[i], want[i]) for i in want)
    assert torch.equal(torch.get_rng_state(), cpu)


def test_checkpoint_of_the_older_flat_config_still_resumes(tiny, data_file, tmp_path, monkeypatch):
    """Checkpoints written before the adapter's options moved into TrainConfig.adapter."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_at_call(m, 6, KeyboardInterrupt())  # dies during step 3, checkpoint at step 2
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(tiny, data_file, out, max_steps=4))
    state_file = out / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    old_keys = [
        "model", "data", "val_data", "method", "rank", "alpha", "dropout", "targets",
        "grad_correction", "reduce_memory", "checkpointing", "init", "init_samples", "task",
        "prompt", "max_steps", "batch_size", "micro_batch_size", "lr", "warmup", "schedule",
        "weight_decay", "max_grad_norm", "dtype", "seed", "max_len", "eval_every",
        "eval_examples", "save_every", "output", "progress", "device", "strategy",
    ]  # fmt: skip
    state["config"] = {k: state["config"][k] for k in old_keys}
    state_file.write_text(json.dumps(state))
    assert train(_cfg(tiny, data_file, out, max_steps=4), resume=True)["summary"]["steps"] == 4

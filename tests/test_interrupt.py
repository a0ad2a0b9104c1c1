"""Ctrl-C during `lorakit train`: the step in hand finishes, a checkpoint is saved (due or not),
the `--resume` command is printed, exit code 130, no traceback; resuming with it reaches the
uninterrupted run's adapter."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.interrupt import Interrupted, resume_command
from lorakit.train import TrainConfig, find_checkpoint, train

train_mod = importlib.import_module("lorakit.train")


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _step(out: Path) -> int:
    return json.loads((find_checkpoint(out) / "trainer_state.json").read_text())["step"]


def test_ctrl_c_saves_the_step_it_finishes(tiny, data_file, tmp_path, monkeypatch):
    """In process: SIGINT during step 3 (no checkpoint due before step 6) lets step 3 end,
    saves it, and raises Interrupted, a KeyboardInterrupt."""
    flat = dict(
        model=str(tiny), data=str(data_file), rank=4, max_steps=6, batch_size=4, max_len=64,
        save_every=0, output=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    real, calls = train_mod.batch_loss, {"n": 0}

    def batch_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # one micro-batch per step: inside step 3
            signal.raise_signal(signal.SIGINT)
        return real(model, batch)

    monkeypatch.setattr(train_mod, "batch_loss", batch_loss)
    with pytest.raises(Interrupted) as e:
        train(TrainConfig.from_flat(flat))
    assert isinstance(e.value, KeyboardInterrupt)
    assert (e.value.step, e.value.max_steps) == (3, 6)
    assert _step(tmp_path / "run") == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_resume_command_drops_overwrite_and_adds_resume():
    assert resume_command(["train", "--overwrite", "--output", "a b"]) == (
        "lorakit train --output 'a b' --resume"
    )
    assert resume_command(["train", "--resume"]) == "lorakit train --resume"


def test_sigint_subprocess_prints_resume_and_resumes_bit_identically(tiny, data_file, tmp_path):
    args = [
        "train", "--model", str(tiny), "--data", str(data_file), "--rank", "4", "--alpha", "8",
        "--max-steps", "40", "--batch-size", "4", "--lr", "5e-3", "--max-len", "64",
        "--save-every", "0", "--no-progress", "--eval-examples", "4",
    ]  # fmt: skip
    lorakit = [sys.executable, "-m", "lorakit"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(
        [*lorakit, *args, "--output", str(tmp_path / "full")], env=env, capture_output=True
    )
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "cut"
    proc = subprocess.Popen(
        [*lorakit, *args, "--output", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    step = _step(out)
    assert 3 <= step < 40, "interrupted mid-way, the checkpoint saved though none was due"
    lines = err.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith("lorakit train: interrupted"))
    assert lines[i] == (
        f"lorakit train: interrupted at step {step} of 40; checkpoint saved in "
        f"{out / 'checkpoint'}. Continue with:"
    )
    command = shlex.split(lines[i + 1])
    assert command == ["lorakit", *args, "--output", str(out), "--resume"]
    resumed = subprocess.run([*lorakit, *command[1:]], env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = _adapter(tmp_path / "full"), _adapter(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_ctrl_c_before_any_checkpoint_says_nothing_to_resume(tmp_path, capsys, monkeypatch):
    """Interrupted while loading (no checkpoint yet): one line, exit code 130."""
    from lorakit import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "setup", interrupted)
    code = cli.main(["train", "--output", str(tmp_path / "run"), "--no-progress"])
    assert code == 130
    assert capsys.readouterr().err.strip() == (
        "lorakit train: interrupted before a checkpoint was written; nothing to resume"
    )

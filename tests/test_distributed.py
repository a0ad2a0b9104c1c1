"""torchrun with gloo on CPU, 2 processes: DDP and FSDP2 give the single-process adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REVIEWS
from safetensors.torch import load_file

import lorakit as lk
from lorakit import distributed
from lorakit.adapters import read_adapter
from lorakit.train import TrainConfig, find_checkpoint, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMON = [
    "--rank", "4", "--alpha", "8", "--batch-size", "4", "--micro-batch-size", "1",
    "--lr", "5e-3", "--max-len", "64", "--save-every", "2", "--no-progress",
    "--eval-examples", "7",
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny LLaMA pruned to 50 % (so LoRS has zeros to keep) and a small labelled file."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-pruned")
    model = LlamaForCausalLM.from_pretrained(tiny)
    lk.prune(model, "magnitude", 0.5, progress=False)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    data = folder / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in REVIEWS))
    return folder, data


def _args(setup, method: str, out: Path, steps: int = 4) -> list[str]:
    model, data = setup
    return [
        "--model", str(model), "--data", str(data), "--val-data", str(data), "--method", method,
        "--max-steps", str(steps), "--output", str(out), *COMMON,
    ]  # fmt: skip


def _torchrun(args: list[str], nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--standalone", "-m", "lorakit", "train", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def _single(setup, method: str, out: Path, steps: int = 4, **extra) -> dict:
    model, data = setup
    cfg = TrainConfig.from_flat(dict(
        model=str(model), data=str(data), val_data=str(data), method=method, rank=4, alpha=8,
        batch_size=4, micro_batch_size=1, lr=5e-3, max_len=64, save_every=2, progress=False,
        eval_examples=7, max_steps=steps, output=str(out), **extra,
    ))  # fmt: skip
    return train(cfg)["summary"]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lors"])
def test_ddp_and_fsdp_equal_one_process(setup, tmp_path, method):
    single = _single(setup, method, tmp_path / "single")
    ref = _adapter(tmp_path / "single")
    assert any(float(t.abs().max()) > 0 for k, t in ref.items() if "lora_B" in k)  # it trained
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        run = _torchrun([*_args(setup, method, out), "--strategy", strategy])
        assert run.returncode == 0, run.stderr[-3000:]
        assert _max_diff(_adapter(out), ref) <= 1e-5, strategy
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["strategy"] == strategy
        # evaluation reduced over ranks: the same accuracy as one process on the same examples
        assert summary["val_accuracy"] == pytest.approx(single["val_accuracy"])
        # only rank 0 writes: one metrics row per step, one training summary printed
        rows = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
        assert run.stdout.count("Training summary") == 1
        assert sorted(p.name for p in out.iterdir()) == [
            "adapter", "checkpoint", "config.yaml", "loss.png", "metrics.csv", "metrics.jsonl",
            "summary.json", "task.json",
        ]  # fmt: skip


def test_packed_ddp_and_fsdp_equal_one_padded_process(setup, tmp_path):
    """Packing changes no gradient: packed micro-batches of 2 on each of 2 ranks train the
    adapter one process trains on the same examples padded (the loss is normalised over the
    global batch's targets either way)."""
    model, data = setup
    wide = ["--max-len", "256", "--micro-batch-size", "2"]  # rows that hold two examples
    single = tmp_path / "single"
    cfg = {"model": str(model), "data": str(data), "val_data": str(data), "method": "lora"}
    cfg |= {"rank": 4, "alpha": 8, "batch_size": 4, "micro_batch_size": 2, "lr": 5e-3}
    cfg |= {"max_len": 256, "save_every": 0, "progress": False, "eval_examples": 7}
    train(TrainConfig.from_flat(cfg | {"max_steps": 4, "output": str(single)}))
    ref = _adapter(single)
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        run = _torchrun([*_args(setup, "lora", out), *wide, "--packing", "--strategy", strategy])
        assert run.returncode == 0, run.stderr[-3000:]
        assert _max_diff(_adapter(out), ref) <= 1e-5, strategy
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(r["padding"] < 0.5 for r in rows)  # two examples share a row


@pytest.mark.parametrize("method", ["lora_fa", "lors"])
def test_ddp_on_a_4bit_base_equals_one_process(setup, tmp_path, method):
    pytest.importorskip("bitsandbytes")
    _single(setup, method, tmp_path / "single", quantize="nf4")
    ref = _adapter(tmp_path / "single")
    assert any(float(t.abs().max()) > 0 for k, t in ref.items() if "lora_B" in k)
    out = tmp_path / "ddp"
    run = _torchrun([*_args(setup, method, out), "--quantize", "nf4"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert _max_diff(_adapter(out), ref) <= 1e-5


def test_fsdp_composes_with_reduce_memory_and_checkpointing(setup, tmp_path):
    _single(setup, "lora_fa", tmp_path / "single")
    out = tmp_path / "fsdp"
    extra = ["--strategy", "fsdp", "--reduce-memory", "--checkpointing"]
    run = _torchrun([*_args(setup, "lora_fa", out), *extra])
    assert run.returncode == 0, run.stderr[-3000:]
    assert _max_diff(_adapter(out), _adapter(tmp_path / "single")) <= 1e-5


def test_rank_crash_keeps_checkpoint_and_resumes_with_another_world_size(setup, tmp_path):
    """Kill one worker of a 2-process FSDP run after a checkpoint: torchrun stops the other and
    fails naming the dead rank; the checkpoint is intact and one process finishes the run to the
    uninterrupted run's adapter."""
    import psutil

    steps = 40
    _single(setup, "lora", tmp_path / "single", steps=steps)
    out = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lorakit", "train", *_args(setup, "lora", out, steps=steps), "--strategy", "fsdp",
    ]  # fmt: skip
    log = tmp_path / "torchrun.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            ckpt = find_checkpoint(out)
            if ckpt and json.loads((ckpt / "trainer_state.json").read_text())["step"] >= 4:
                break
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    assert "FAILED" in log.read_text() and "Signal 9 (SIGKILL)" in log.read_text()
    meta = json.loads((find_checkpoint(out) / "trainer_state.json").read_text())
    assert 4 <= meta["step"] < steps and meta["world_size"] == 2
    args = _args(setup, "lora", out, steps=steps)
    subprocess.run(
        [sys.executable, "-m", "lorakit", "train", *args, "--resume"],
        env=ENV,
        check=True,
        capture_output=True,
    )
    assert _max_diff(_adapter(out), _adapter(tmp_path / "single")) <= 1e-5


def test_world_size_must_divide_the_batch(setup, tmp_path):
    run = _torchrun([*_args(setup, "lora", tmp_path / "x"), "--batch-size", "3"])
    assert run.returncode != 0
    assert "batch_size 3 is the global batch and must be divisible by the world size 2" in (
        run.stderr
    )
    assert "world sizes that divide it: [1, 3]" in run.stderr


def test_check_batch_messages():
    distributed.check_batch(8, 2, 4)
    with pytest.raises(ValueError, match=r"world sizes that divide it: \[1, 2, 3, 6\]"):
        distributed.check_batch(6, 0, 4)
    with pytest.raises(ValueError, match=r"must divide the per-rank batch 3 .* valid choices"):
        distributed.check_batch(6, 2, 2)


def test_fsdp_names_a_model_it_cannot_wrap():
    from conftest import MLP

    with pytest.raises(ValueError, match=r"MLP declares none"):
        distributed.wrap(MLP(), "fsdp", distributed.Context(world=2))


def test_split_evenly_round_trip():
    items = list(range(7))
    parts, reals = [], []
    for r in range(3):
        mine, real = distributed.split_evenly(items, distributed.Context(rank=r, world=3))
        assert len(mine) == 3  # equal passes on every rank
        parts.append(mine[:real])
        reals.append(real)
    assert reals == [3, 2, 2]
    assert distributed.interleave(parts, 7) == items


def test_injected_model_trains_under_accelerate_launch(tiny, tmp_path):
    """HF accelerate (the launcher Trainer users have) on CPU, 2 processes: it trains and the
    adapter saved by the main process loads back. (`--multi_gpu` is accelerate's torchrun
    launcher; `--cpu` would need MPI for more than one process. Without GPUs the script's
    Accelerator(cpu=True) joins a gloo group.)"""
    script = Path(__file__).parent / "accelerate_train.py"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0", str(script), str(tiny), str(tmp_path / "adapter"),
    ]  # fmt: skip
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 of 2 done" in run.stdout and "rank 1 of 2 done" in run.stdout
    saved = read_adapter(tmp_path / "adapter")
    assert saved.weights and all(float(w["B"].abs().max()) > 0 for w in saved.weights.values())


def test_ddp_wrap_works_with_the_keywords_of_older_torch(monkeypatch):
    """Releases before 2.13 have no forward_sync_buffers; their broadcast_buffers is the same."""
    seen = {}

    class OldDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            super().__init__()
            seen.update(device_ids=device_ids, broadcast_buffers=broadcast_buffers)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", OldDDP)
    model = lk.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), lk.LoRAConfig(rank=2))
    assert isinstance(distributed.wrap(model, "ddp", distributed.Context(world=2)), OldDDP)
    assert seen == {"device_ids": None, "broadcast_buffers": False}

"""lorakit plan: checked against what training really keeps (count_saved, what two FSDP2 gloo
ranks hold; each phase's live storages on real tensors are tests/test_plan_phases.py's, the
resident memory of a fresh process bench/plan_validate.py's) and against bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.config import TrainConfig
from lorakit.distributed import SINGLE
from lorakit.models import load_model
from lorakit.planner import BUILTIN, nf4_bytes, parse_size, plan
from lorakit.planner.fit import MARGIN, _largest, longest
from lorakit.planner.tracker import StorageLog, replay
from lorakit.tasks import batch_loss, collate
from lorakit.train import _adapt

ROOT = Path(__file__).parent.parent


def _real_saved(cfg: TrainConfig) -> int:
    """count_saved of the real SmolLM2 run, set up as training sets it up, on a collated batch."""
    model, _ = load_model(cfg.model, dtype=getattr(torch, cfg.dtype))
    if cfg.method == "lors":
        lk.prune(model, "magnitude", 0.5, progress=False)
    _adapt(model, cfg, "lm", SINGLE)
    model.train()
    ids = torch.randint(0, 1000, (cfg.batch_size, cfg.max_len))
    batch = collate([{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids], 0)
    return lk.count_saved(model, lambda: batch_loss(model, batch))[1]


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lors", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "reduce,ckpt", [(False, False), (True, False), (False, True), (True, True)]
)
def test_saved_activations_equal_count_saved_on_smollm2(method, dtype, reduce, ckpt):
    flat = {"model": "smollm2-135m", "method": method, "dtype": dtype, "batch_size": 2}
    flat |= {"max_len": 48, "reduce_memory": reduce, "checkpointing": ckpt}
    cfg = TrainConfig.from_flat(flat)
    assert plan(cfg, target="cpu").activations == _real_saved(cfg)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_shards_equal_what_two_gloo_ranks_hold(tiny, method):
    flat = {"model": str(tiny), "method": method, "batch_size": 2, "max_len": 32}
    p = plan(strategy="fsdp", world_size=2, target="cpu", **flat)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    cmd += [str(ROOT / "tests" / "fsdp_shard_bytes.py"), json.dumps(flat)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    real = json.loads(run.stdout.strip().splitlines()[-1])
    assert p.at_peak.get("weights", 0) == real["weights"]
    assert p.at_peak.get("trainable", 0) == real["trainable"]
    assert p.at_peak.get("optimizer", 0) == real["optimizer"]
    assert p.gradients == real["gradients"]


def test_nf4_bytes_equal_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    from lorakit.quant import state

    model, _ = load_model("smollm2-135m", quantize="nf4")
    layer = model.model.layers[0].mlp.down_proj
    qs = state(layer.weight)
    stored = [layer.weight, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    total = sum(t.untyped_storage().nbytes() for t in stored)
    assert nf4_bytes(576 * 1536, double_quant=True) == total


def test_a_7b_shape_plans_and_adds_up():
    t0 = time.perf_counter()
    p = plan(model="llama-2-7b", method="lora_fa", dtype="bfloat16", batch_size=1, max_len=1024)
    seconds = time.perf_counter() - t0
    print(f"llama-2-7b plan: {seconds:.1f} s")
    assert sum(p.at_peak.values()) == p.peak
    assert BUILTIN["llama-2-7b"]["num_hidden_layers"] == 32
    # 6.74 B parameters in bf16, A (frozen) included: the weights are known without a model.
    assert 6.7e9 * 2 < p.at_peak["weights"] < 6.8e9 * 2  # (its runtime: printed, not asserted)


def test_replay_classifies_a_reused_address_by_lifetime():
    log = StorageLog()
    a = torch.empty(100, dtype=torch.uint8)
    first = log.id(a)
    del a
    b = torch.empty(100, dtype=torch.uint8)  # may reuse a's address
    second = log.id(b)
    assert first != second
    peak, parts = replay(log.events, {first: "activations", second: "gradients"})
    assert peak == 100 and parts == {"activations": 100}  # the first reached it
    c = torch.empty(300, dtype=torch.uint8)
    log.id(c)
    peak, parts = replay(log.events, {second: "gradients"})
    assert peak == 400 and parts == {"gradients": 100, "transient": 300}


def test_parse_size():
    assert parse_size("24GiB") == 24 * 1024**3 == parse_size("24 GB") == parse_size("24g")
    assert parse_size("512MiB") == 512 * 1024**2
    with pytest.raises(ValueError, match="expected a positive size such as 24GiB"):
        parse_size("lots")


@pytest.mark.parametrize("use_guess", [False, True])
def test_fit_search_is_exact_whatever_the_guess(use_guess):
    """The answer is the largest n that fits, from any guess (a miss only costs plans), and
    no n outside [1, limit] is ever planned."""
    for limit in range(1, 40):
        for answer in range(limit + 1):
            for guess in range(1, limit + 1) if use_guess else [None]:
                asked = []

                def fits(n, answer=answer, asked=asked):
                    asked.append(n)
                    return n <= answer

                assert _largest(fits, 1, limit, guess) == answer
                assert all(1 <= n <= limit for n in asked)


def test_longest_rows_fit_and_256_more_do_not():
    cfg = TrainConfig.from_flat({"model": "smollm2-135m", "method": "lora_fa", "batch_size": 1})
    budget = 2 * 1024**3
    seq = longest(cfg, [budget])["max_len"][budget]
    assert seq >= 256 and seq % 256 == 0
    at, over = (plan(dataclasses.replace(cfg, max_len=n)) for n in (seq, seq + 256))
    assert at.fits(budget, MARGIN) and not over.fits(budget, MARGIN)


def test_cli_plan_json_plot_and_fit(tmp_path, capsys):
    png = tmp_path / "plan.png"
    args = ["plan", "--model", "smollm2-135m", "--method", "lora_fa", "--batch-size", "1"]
    args += ["--max-len", "256", "--json", "--plot", str(png), "--fit", "2GiB"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak"] == sum(out["at_peak"].values()) == max(out["phases"].values())
    assert list(out["phases"]) == ["train_step", "validation"]
    assert out["peak"] == out["phases"][out["peak_phase"]]
    assert out["at_peak"] == out["phase_at_peak"][out["peak_phase"]]
    assert out["fit"]["micro_batch_size"] >= 1 and out["fit"]["max_len"] >= 256
    assert out["fit"]["at_max_len"]["peak"] <= 2 * 1024**3 * 0.95
    # the run as asked fits 2 GiB at 256 tokens: train --fit would change nothing
    setting = out["fit"]["setting"]
    assert setting["tried"][0].endswith("-> fits") and len(setting["tried"]) == 1
    assert (setting["reduce_memory"], setting["checkpointing"], setting["offload"]) == (False,) * 3
    assert png.stat().st_size > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "llama-9b"], "Built-ins: llama-2-7b"),
        (["--fit", "lots"], "expected a positive size"),
        (["--strategy", "fsdp", "--world-size", "3", "--batch-size", "4"], "does not divide"),
        (["--method", "full", "--quantize", "nf4"], "a 4-bit weight has no gradient"),
        (["--quantize", "nf4", "--init", "gradient_svd"], "init gradient_svd needs a dense base"),
        (
            ["--strategy", "fsdp", "--world-size", "2", "--batch-size", "2", "--quantize", "nf4"],
            "FSDP2",
        ),
    ],
)
def test_cli_plan_bad_input(args, message, capsys):
    assert main(["plan", "--max-len", "32", *args]) == 2
    assert message in capsys.readouterr().err


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="has no causal LM class"):
        plan(model=str(tmp_path), batch_size=1, max_len=32)

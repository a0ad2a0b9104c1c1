"""Experiment tracking (``--report-to tensorboard,wandb``): what a tiny run writes is read back
with the trackers' own readers and equals ``metrics.jsonl``."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lorakit.cli import main
from lorakit.config import TrainConfig
from lorakit.tracking import Trackers, checked_trackers


@pytest.fixture
def reviews(tmp_path):
    f = tmp_path / "reviews.jsonl"
    rows = [("great fun", 1), ("awful", 0), ("loved it", 1), ("boring", 0)] * 4
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return f


def _train(tiny, data, out, *extra):
    args = ["train", "--model", str(tiny), "--data", str(data), "--max-len", "64", "--rank", "4"]
    args += ["--max-steps", "3", "--batch-size", "4", "--save-every", "0", "--no-progress"]
    return main([*args, "--output", str(out), *extra])


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_curves_equal_the_metrics_rows(tiny, reviews, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--val-data", str(reviews), "--eval-every", "2"]
    assert _train(tiny, reviews, out, "--report-to", "tensorboard", *extra) == 0
    rows = _rows(out)
    tags = _scalars(out / "tensorboard")
    assert [s for s, _ in tags["train/loss"]] == [r["step"] for r in rows] == [1, 2, 3]
    assert [v for _, v in tags["train/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    for key in ("lr", "grad_norm", "tok_per_s", "padding"):
        assert [v for _, v in tags[f"train/{key}"]] == pytest.approx([r[key] for r in rows])
    assert [s for s, _ in tags["train/peak_memory_mib"]] == [1, 2, 3]
    # validation at step 2 (--eval-every, in metrics.jsonl) and the final one (summary.json)
    final = json.loads((out / "summary.json").read_text())["val_accuracy"]
    assert [s for s, _ in tags["eval/accuracy"]] == [2, 3]
    assert [v for _, v in tags["eval/accuracy"]] == pytest.approx([rows[1]["val_accuracy"], final])


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B writes its run locally: no network, nothing under the home folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_a_failing_run_still_closes_its_writers(
    tiny, reviews, tmp_path, monkeypatch, offline_wandb, capsys
):
    lt = importlib.import_module("lorakit.train")  # the module (lorakit.train is also a function)

    step = lt.train_step

    def fail_at_two(run):
        if run.step == 1:
            raise FloatingPointError("loss is nan at step 2")
        return step(run)

    monkeypatch.setattr(lt, "train_step", fail_at_two)
    out = tmp_path / "run"
    assert _train(tiny, reviews, out, "--report-to", "tensorboard,wandb") == 2
    assert "loss is nan at step 2" in capsys.readouterr().err
    tags = _scalars(out / "tensorboard")  # step 1 was flushed by the close on failure
    assert [v for _, v in tags["train/loss"]] == pytest.approx([_rows(out)[0]["loss"]])
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    exits = [r["exit"]["exit_code"] for r in _wandb_records(run_dir) if r.get("type") == "exit"]
    assert exits == [1]  # W&B marks the run failed


def _wandb_records(run_dir):
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_wandb_offline_run_writes_the_losses(tiny, reviews, tmp_path, offline_wandb, capsys):
    out = tmp_path / "run"
    assert _train(tiny, reviews, out, "--report-to", "wandb", "--val-data", str(reviews)) == 0
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = _wandb_records(run_dir)
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert losses == pytest.approx([r["loss"] for r in _rows(out)])
    assert any("eval/accuracy" in h for h in history)
    run = next(r for r in records if r.get("type") == "run")["run"]
    assert run["project"] == "lorakit" and run["display_name"] == "run"


def test_missing_library_is_one_line_before_the_model_loads(monkeypatch, reviews, capsys):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find(name, *a)
    )
    code = main(
        ["train", "--model", "./no/such/model", "--data", str(reviews), "--report-to", "wandb"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--report-to wandb needs the wandb package: pip install wandb" in err
    assert "no/such/model" not in err  # refused before anything was loaded


def test_unknown_tracker_is_refused_with_the_allowed_ones(capsys):
    with pytest.raises(ValueError, match=r"unknown tracker 'mlflow'; allowed: tensorboard, wandb"):
        TrainConfig(report_to=("tensorboard", "mlflow"))
    assert main(["train", "--report-to", "tensorboard,mlflow"]) == 2
    assert "unknown tracker 'mlflow'" in capsys.readouterr().err
    assert TrainConfig().report_to == () == TrainConfig(report_to="none").report_to
    assert checked_trackers("wandb, tensorboard,wandb") == ("wandb", "tensorboard")


def test_only_rank_zero_opens_writers(tmp_path):
    cfg = TrainConfig(report_to=("tensorboard",), output=str(tmp_path))
    run = SimpleNamespace(cfg=cfg, out=tmp_path, step=0, ctx=SimpleNamespace(is_main=False))
    with Trackers(cfg.report_to).start(run) as tracker:
        tracker.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()

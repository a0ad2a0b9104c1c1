"""How long a run trains: --epochs, early stopping with the best adapter kept, and --resume with
a larger --max-steps (or more epochs) extending a finished run."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit as lk
from lorakit.schedule import batch_indices, resolve_steps
from lorakit.train import TrainConfig, train

train_mod = importlib.import_module("lorakit.train")  # lk.train is the entry point


@pytest.fixture
def reviews(data_file) -> Path:
    return data_file


@pytest.fixture
def qa(tmp_path) -> Path:
    pairs = [("2 + 2 =", " 4"), ("The sky is", " blue"), ("Ice is", " cold"), ("Fire is", " hot")]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs * 4))
    return f


def _cfg(tiny, data, out, **kw) -> TrainConfig:
    base = dict(
        model=str(tiny), data=str(data), rank=4, alpha=8, max_steps=6, batch_size=4,
        micro_batch_size=2, lr=5e-3, max_len=64, save_every=2, output=str(out), progress=False,
    )  # fmt: skip
    if "epochs" in kw:
        del base["max_steps"]  # left to the epochs unless a test gives it
    return TrainConfig.from_flat(base | kw)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- epochs ---------------------------------------------------------------------------------


def test_epochs_give_the_steps_that_show_every_example_that_often(tiny, reviews, tmp_path):
    cfg = _cfg(tiny, reviews, tmp_path, epochs=2)
    assert resolve_steps(cfg, 32).max_steps == 16  # 2 x 32 / 4
    assert resolve_steps(_cfg(tiny, reviews, tmp_path, epochs=0.5), 32).max_steps == 4
    assert resolve_steps(_cfg(tiny, reviews, tmp_path, epochs=1.1), 32).max_steps == 9  # 8.8 up
    assert (
        resolve_steps(
            _cfg(tiny, reviews, tmp_path, epochs=0.3, batch_size=1, micro_batch_size=0), 10
        ).max_steps
        == 3
    )
    assert resolve_steps(_cfg(tiny, reviews, tmp_path, epochs=2, max_steps=16), 32).max_steps == 16
    # each epoch of 8 steps shows every example exactly once
    for epoch in (0, 1):
        seen = [i for k in range(8 * epoch, 8 * epoch + 8) for i in batch_indices(k, 4, 32, 0)]
        assert sorted(seen) == list(range(32))
    with pytest.raises(
        ValueError, match=r"epochs 2 is 16 steps \(32 training examples, batch_size 4\), but "
        r"max_steps is 50; give one of the two",
    ):  # fmt: skip
        resolve_steps(_cfg(tiny, reviews, tmp_path, epochs=2, max_steps=50), 32)
    assert resolve_steps(_cfg(tiny, reviews, tmp_path, epochs=0.01), 32).max_steps == 1
    with pytest.raises(ValueError, match=r"epochs must be >= 0, got -1"):
        _cfg(tiny, reviews, tmp_path, epochs=-1)


def test_a_run_of_epochs_and_its_extension_by_epochs(tiny, reviews, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(_cfg(tiny, reviews, out, epochs=1, max_steps=100))["summary"]
    assert summary["steps"] == 8
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["epochs"], saved["max_steps"]) == (1.0, 8)  # reruns as it ran
    assert "epochs 1: 8 steps of 4 examples over 32 training examples" in capsys.readouterr().err
    summary = train(_cfg(tiny, reviews, out, epochs=2), resume=True)["summary"]
    assert summary["steps"] == 16
    assert [r["step"] for r in _rows(out)] == list(range(1, 17))
    assert "from max_steps 8 to 16 at step 8" in capsys.readouterr().err


# --- early stopping and the best adapter ------------------------------------------------------


def _scripted(monkeypatch, values: list[float]) -> list[int]:
    """Validation returns ``values`` in turn (as a loss); returns the steps it was called at."""
    calls: list[int] = []

    def fake(run):
        calls.append(run.step)
        return {"loss": values[len(calls) - 1]}

    monkeypatch.setattr(train_mod, "_evaluate", fake)
    return calls


def test_early_stopping_after_patience_evaluations(tiny, reviews, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    kw = dict(max_steps=20, eval_every=1, early_stopping_patience=2, val_data=str(reviews))
    kw |= dict(schedule="constant", warmup=0.0)
    calls = _scripted(monkeypatch, [3.0, 2.0, 2.5, 2.1, 9.0, 9.0])
    summary = train(_cfg(tiny, reviews, out, **kw))["summary"]
    assert calls == [1, 2, 3, 4, 4]  # evaluations at 1..4, then the final one
    assert summary["steps"] == 4 and summary["stopped_early"] is True
    assert summary["best"] == {
        "step": 2, "val_loss": 2.0, "adapter": str(out / "best" / "adapter"),
    }  # fmt: skip
    err = capsys.readouterr().err
    assert "early stopping at step 4: val_loss has not beaten 2 (step 2) in 2 evaluations" in err
    assert json.loads((out / "best" / "metric.json").read_text()) == {
        "step": 2, "metric": "loss", "value": 2.0,
    }  # fmt: skip
    assert any("stopped early at step 4 of 20" in n for n in summary["notes"])
    # best/ holds the adapter of step 2: what a run of 2 steps (same constant lr) ends with
    monkeypatch.undo()
    two = tmp_path / "two"
    train(_cfg(tiny, reviews, two, max_steps=2, schedule="constant", warmup=0.0))
    best, want = _adapter(out / "best" / "adapter"), _adapter(two / "adapter")
    assert best.keys() == want.keys() and all(torch.equal(best[k], want[k]) for k in best)
    # a resumed run that had stopped stays stopped: no more steps
    _scripted(monkeypatch, [9.0])
    assert train(_cfg(tiny, reviews, out, **kw), resume=True)["summary"]["steps"] == 4


def test_the_final_evaluation_stops_nothing(tiny, reviews, tmp_path, monkeypatch):
    kw = dict(max_steps=3, eval_every=1, early_stopping_patience=2, val_data=str(reviews))
    _scripted(monkeypatch, [1.0, 2.0, 3.0])  # steps 1, 2, then the final evaluation at 3
    summary = train(_cfg(tiny, reviews, tmp_path / "run", **kw))["summary"]
    assert summary["steps"] == 3 and summary["stopped_early"] is False
    assert summary["best"]["step"] == 1 and not any("stopped" in n for n in summary["notes"])


def test_early_stopping_needs_validation(tiny, reviews, tmp_path):
    with pytest.raises(
        ValueError, match=r"counts evaluations, but eval_every is 0 .*give eval_every > 0"
    ):
        train(_cfg(tiny, reviews, tmp_path / "a", early_stopping_patience=2))
    with pytest.raises(
        ValueError,
        match=r"watches the validation metric, but .* has no validation split; give val_data",
    ):
        train(_cfg(tiny, reviews, tmp_path / "b", early_stopping_patience=2, eval_every=2))


def test_best_adapter_reproduces_its_validation_loss(tiny, qa, tmp_path):
    from lorakit.models import load_model
    from lorakit.tasks import evaluate

    out = tmp_path / "run"
    cfg = _cfg(tiny, qa, out, max_steps=8, eval_every=2, val_data=str(qa), lr=2e-2)
    result = train(cfg)
    rows = _rows(out)
    measured = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    measured[8] = result["summary"]["val_loss"]  # the final evaluation competes too
    best = json.loads((out / "best" / "metric.json").read_text())
    assert best["metric"] == "loss" and best["step"] in measured
    assert best["value"] == min(measured.values()) == measured[best["step"]]
    model, tok = load_model(tiny)
    lk.load_adapter(model, out / "best" / "adapter")
    again = evaluate(model, tok, result["prepared"], cfg)["loss"]
    assert abs(again - best["value"]) <= 1e-6
    assert result["summary"]["best"]["step"] == best["step"]


# --- extending a finished run -----------------------------------------------------------------


def test_extending_a_finished_constant_run_equals_the_longer_run(tiny, reviews, tmp_path, capsys):
    kw = dict(schedule="constant", warmup=0.0)
    train(_cfg(tiny, reviews, tmp_path / "long", max_steps=8, **kw))
    out = tmp_path / "run"
    train(_cfg(tiny, reviews, out, max_steps=4, **kw))
    capsys.readouterr()
    assert train(_cfg(tiny, reviews, out, max_steps=8, **kw), resume=True)["summary"]["steps"] == 8
    err = capsys.readouterr().err
    assert "extending the run from max_steps 4 to 8 at step 4: the lr schedule (constant" in err
    assert [r["step"] for r in _rows(out)] == list(range(1, 9))
    a, b = _adapter(out / "adapter"), _adapter(tmp_path / "long" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_cosine_run_recomputes_the_schedule(tiny, reviews, tmp_path, capsys):
    train(_cfg(tiny, reviews, tmp_path / "long", max_steps=8))
    out = tmp_path / "run"
    train(_cfg(tiny, reviews, out, max_steps=4))
    assert _rows(out)[-1]["lr"] == 0.0  # the 4-step cosine ended at 0
    capsys.readouterr()
    train(_cfg(tiny, reviews, out, max_steps=8), resume=True)
    long = {r["step"]: r["lr"] for r in _rows(tmp_path / "long")}
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["lr"] for r in rows[4:]] == [long[s] for s in range(5, 9)]  # the 8-step schedule
    err = capsys.readouterr().err
    assert "is recomputed over 8 steps, so the lr of step 5 is" in err
    assert "(the 4-step schedule's was 0)" in err


def test_only_a_longer_run_may_differ_on_resume(tiny, reviews, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny, reviews, out, max_steps=4))
    with pytest.raises(
        ValueError,
        match=r"differs from the checkpoint's in \['lr'\] \(lr: 0\.005 -> 0\.001\)",
    ):
        train(_cfg(tiny, reviews, out, max_steps=8, lr=1e-3), resume=True)
    with pytest.raises(
        ValueError, match=r"differs from the checkpoint's in \['max_steps'\] \(max_steps: 4 -> 2\)"
    ):
        train(_cfg(tiny, reviews, out, max_steps=2), resume=True)

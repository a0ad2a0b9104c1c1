"""Progress bars on the long loops (eval, prune, merge, the planner's --fit search), quiet with
--no-progress, plain lines when stderr is not a terminal; ``eval --limit`` counts windows on text.

Bars appear after ``progress.DELAY`` seconds; the tests set it to 0 (or to a day), so nothing here
depends on how fast the machine is."""

from __future__ import annotations

import importlib
import io
import json
import re

import pytest
import torch

from lorakit import progress
from lorakit.cli import main


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)


@pytest.fixture
def plays(tmp_path):
    """Two long documents: far more than 5 windows of 16 tokens each."""
    f = tmp_path / "plays.jsonl"
    text = "to be or not to be, that is the question of the day. " * 30
    f.write_text("".join(json.dumps({"text": f"act {i}: {text}"}) + "\n" for i in range(2)))
    return f


def _bar_lines(err: str, desc: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{desc}:")]


def test_eval_limit_counts_windows_and_shows_a_bar(tiny, plays, no_delay, capsys):
    args = ["eval", "--model", str(tiny), "--data", str(plays), "--max-len", "16"]
    assert main([*args, "--limit", "5", "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["windows"] == 5  # not 2 records' worth of windows
    lines = _bar_lines(err, "perplexity")
    assert lines[0].startswith("perplexity:   0%") and "0/5" in lines[0]
    assert "100%" in lines[-1] and "5/5" in lines[-1] and "window" in lines[-1]
    assert all("\r" not in line for line in err.split("\n") if "perplexity" in line)  # not a tty


def test_no_progress_is_quiet(tiny, plays, no_delay, capsys):
    args = ["eval", "--model", str(tiny), "--data", str(plays), "--max-len", "16", "--limit", "5"]
    assert main([*args, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not _bar_lines(err, "perplexity") and "Loading weights" not in err  # hub's bars too


def test_eval_of_labelled_data_shows_a_bar(tiny, tmp_path, no_delay, capsys):
    f = tmp_path / "reviews.jsonl"
    rows = [("great fun", 1), ("awful", 0)] * 3
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    args = ["eval", "--model", str(tiny), "--data", str(f), "--max-len", "32", "--limit", "4"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["examples"] == 4
    assert "100%" in _bar_lines(err, "score")[-1]


def test_prune_is_one_bar_and_a_summary(tiny, tmp_path, no_delay, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("to be or not to be, that is the question. " * 200)
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(tiny), "--sparsity", "2:4", "--data", str(text)]
    args += ["--samples", "4", "--seq-len", "32", "--output", str(out)]
    assert main(args) == 0
    stdout, err = capsys.readouterr()
    lines = _bar_lines(err, "wanda 2:4")
    assert "0/2" in lines[0] and "100%" in lines[-1] and "2/2" in lines[-1]  # two blocks
    assert len(stdout.splitlines()) == 2 and "sparsity 50.0%" in stdout
    per_layer = json.loads((out / "sparsity.json").read_text())
    assert len(per_layer) == 14 and set(per_layer.values()) == {0.5}
    assert main([*args, "--no-progress"]) == 0
    assert not _bar_lines(capsys.readouterr().err, "wanda 2:4")


def test_merge_and_fit_searches_show_bars(no_delay, monkeypatch, capsys):
    from conftest import build

    import lorakit as lk
    from lorakit.config import TrainConfig

    model = lk.inject(build("llama"), lk.LoRAConfig(rank=2))
    lk.merge(model)
    assert len(_bar_lines(capsys.readouterr().err, "merge")) == 2  # its first and last line

    class Plan:  # a stand-in: the search, not the planner, is under test here
        def __init__(self, cfg):
            self.peak, self.micro_batch_size, self.max_len = cfg.micro_batch_size, 0, 0

        def fits(self, budget, margin):
            return self.peak <= budget

    fit_module = importlib.import_module("lorakit.planner.fit")  # the package exports fit()
    monkeypatch.setattr(fit_module, "plan", lambda cfg, **kw: Plan(cfg))
    found = fit_module.fit(TrainConfig(max_len=256), 5, max_seq=1024)
    assert found["micro_batch_size"] == 5
    last = _bar_lines(capsys.readouterr().err, "fit")[-1]
    assert re.search(rf"\b{found['plans']}plan", last)


def test_bars_on_a_terminal_redraw_in_place_and_stay_quiet_where_asked(monkeypatch, no_delay):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    for _ in progress.bar(range(3), desc="loop"):
        pass
    assert "\r" in progress.sys.stderr.getvalue()  # tqdm's redraw
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with progress.enabled(False), progress.enabled(True):  # True cannot undo an outer False
        list(progress.bar(range(3), desc="loop"))
    monkeypatch.setenv("RANK", "1")  # torchrun: rank 0 only
    list(progress.bar(range(3), desc="loop"))
    monkeypatch.delenv("RANK")
    monkeypatch.setattr(progress, "DELAY", 86400.0)  # a quick loop ends before its bar appears
    list(progress.bar(range(3), desc="loop"))
    assert progress.sys.stderr.getvalue() == ""


def test_prune_progress_false_is_quiet(no_delay, capsys):
    from conftest import build

    import lorakit as lk

    model = build("llama")
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    lk.prune(model, "wanda", 0.5, calibration, progress=False)
    assert not _bar_lines(capsys.readouterr().err, "wanda 50%")
    lk.prune(build("llama"), "wanda", 0.5, calibration)
    assert _bar_lines(capsys.readouterr().err, "wanda 50%")

"""Smaller edges: merged, pruned and fully trained model files get a plain file's mode; LoRS on a
base that was never pruned is named; a saved adapter names its base publicly; a `--fit` plot
tells its bars apart; `--data`'s help lists every built-in data set; the README's demo time."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import build_parser, main
from lorakit.constants import BUILTIN_DATA
from lorakit.planner.report import MemoryPlan, plot
from lorakit.train import TrainConfig, train

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir() if f.is_file()}


@pytest.fixture
def adapter(tiny, tmp_path) -> Path:
    model, _ = lk.load_model(tiny)
    lk.inject(model, lk.LoRAConfig(rank=4))
    lk.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_merged_and_pruned_models_are_0644(tiny, adapter, tmp_path, umask_022):
    merged, pruned = tmp_path / "merged", tmp_path / "pruned"
    assert (
        main(["merge", "--model", str(tiny), "--adapter", str(adapter), "--output", str(merged)])
        == 0
    )
    text = tmp_path / "calib.txt"
    text.write_text("to be or not to be, that is the question. " * 50)
    args = ["prune", "--model", str(tiny), "--method", "magnitude", "--data", str(text)]
    assert main([*args, "--samples", "2", "--seq-len", "16", "--output", str(pruned)]) == 0
    for folder in (merged, pruned):
        modes = _modes(folder)
        assert "model.safetensors" in modes and "tokenizer.json" in modes
        assert set(modes.values()) == {0o644}, (folder.name, modes)
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp left


def test_full_fine_tuning_writes_a_0644_model(tiny, tmp_path, umask_022):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(8)))
    flat = dict(model=str(tiny), data=str(data), method="full", max_steps=1, batch_size=2)
    flat["max_len"] = 16
    train(TrainConfig.from_flat(flat | {"output": str(tmp_path / "run"), "progress": False}))
    modes = _modes(tmp_path / "run" / "model")
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def _with_zeros(tiny, folder: Path, share: float) -> Path:
    """``tiny`` with ``share`` of every linear weight set to zero (the smallest ones)."""
    model, tok = lk.load_model(tiny)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                k = int(share * w.numel())
                w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("share", [0.01, 0.5])
def test_lors_on_an_unpruned_base_is_named(tiny, tmp_path, share):
    """1 % zeros (an unpruned model's few exact zeros): a warning naming the sparsity and the
    fix; 50 % (pruned): none."""
    base = _with_zeros(tiny, tmp_path / "base", share)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(8)))
    flat = dict(model=str(base), data=str(data), method="lors", max_steps=1, batch_size=2)
    flat["max_len"] = 16
    cfg = TrainConfig.from_flat(flat | {"output": str(tmp_path / "run"), "progress": False})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(cfg)
    named = [str(w.message) for w in seen if "keeps a pruned model's zeros" in str(w.message)]
    if share == 0.5:
        assert named == []
        return
    assert len(named) == 1
    # about 1 %: each layer rounds its count of zeros down
    assert re.match(r"lors keeps a pruned model's zeros, but only 0\.9\d% of", named[0])
    assert f"of the weights it adapts in {base} are zero" in named[0]
    assert f"lorakit prune --model {base} --sparsity 2:4" in named[0]
    assert "or use --method lora or lora_fa" in named[0]


def test_adapter_names_its_base_publicly(tiny, tmp_path):
    """The embedded model by its built-in name, not the cache folder it was read from; a local
    folder by its path."""
    for name in ("smollm2-135m", str(tiny)):
        model, _ = lk.load_model(name)
        lk.inject(model, lk.LoRAConfig(rank=2, targets=["q_proj"]))
        lk.save_adapter(model, tmp_path / "a")
        config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == name


def _plan(micro: int, seq: int) -> MemoryPlan:
    return MemoryPlan(
        model="smollm2-135m", label="lora", method="lora", strategy="ddp", world_size=1,
        micro_batch_size=micro, max_len=seq, dtype="float32", quantize="none",
        reduce_memory=False, checkpointing=False, peak=2**30, at_peak={"weights": 2**30},
        phases={"train_step": 2**30},
    )  # fmt: skip


def test_fit_plot_labels_bars_by_what_differs(tmp_path, monkeypatch):
    """A --fit plot: the asked plan, the largest micro-batch, the longest rows; same method."""
    from matplotlib.axes import Axes

    shown = {}
    real = Axes.set_xticks

    def spy(self, ticks, labels=None, **kw):
        shown["labels"] = list(labels)
        return real(self, ticks, labels, **kw)

    monkeypatch.setattr(Axes, "set_xticks", spy)
    plot([_plan(16, 256), _plan(40, 256), _plan(1, 8192)], tmp_path / "p.png")
    assert shown["labels"] == [
        "lora\nmicro-batch 16 x 256 tokens",
        "lora\nmicro-batch 40 x 256 tokens",
        "lora\nmicro-batch 1 x 8192 tokens",
    ]


@pytest.mark.parametrize("command", ["train", "eval"])
def test_data_help_lists_every_builtin(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    help_text = next(a.help for a in sub._actions if a.dest == "data")
    assert "shakespeare-dialogue" in help_text
    assert all(name in help_text for name in BUILTIN_DATA)


def test_readme_states_one_demo_time():
    text = README.read_text()
    assert "~4 min" not in text and "about 4.5 minutes" not in text
    times = re.findall(r"(?:about|under) [\d.]+ minutes on 2 CPU cores", text)
    assert len(times) == 2 and len(set(times)) == 1, times

"""CLI smoke tests: every command's --help, and train -> eval -> merge on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import build_parser, main

COMMANDS = ["train", "eval", "merge", "prune", "demo"]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_describes_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"


@pytest.fixture
def reviews(tmp_path):
    f = tmp_path / "reviews.jsonl"
    rows = [("great fun", 1), ("awful", 0), ("loved it", 1), ("boring", 0)] * 4
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return f


def test_train_eval_merge(tiny, reviews, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--model", str(tiny), "--data", str(reviews), "--max-len", "32"]
    code = main(
        [
            "train",
            *common,
            "--rank",
            "4",
            "--alpha",
            "8",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--no-progress",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert "Training summary" in capsys.readouterr().out
    assert main(["eval", *common, "--adapter", str(out / "adapter"), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["examples"] == 16
    merged = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--model",
                str(tiny),
                "--adapter",
                str(out / "adapter"),
                "--output",
                str(merged),
            ]
        )
        == 0
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert all(type(m).__name__ != "AdaptedLayer" for m in model.modules())
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_eval_perplexity(tiny, tmp_path, capsys):
    f = tmp_path / "text.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert main(["eval", "--model", str(tiny), "--data", str(f), "--max-len", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1.0


def test_missing_model_path_is_a_clear_error(reviews, capsys):
    code = main(["train", "--model", "./no/such/model", "--data", str(reviews), "--no-progress"])
    assert code == 2
    assert "model path './no/such/model' does not exist" in capsys.readouterr().err


def test_missing_data_path(tiny, tmp_path, capsys):
    code = main(
        ["train", "--model", str(tiny), "--data", str(tmp_path / "nope.jsonl"), "--no-progress"]
    )
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_unknown_method_and_lors_on_dense(tiny, reviews, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "dora"])
    assert e.value.code == 2
    code = main(
        [
            "train",
            "--model",
            str(tiny),
            "--data",
            str(reviews),
            "--method",
            "lors",
            "--no-progress",
            "--output",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    assert "has a zero weight" in capsys.readouterr().err


def test_unknown_target(tiny, reviews, tmp_path, capsys):
    code = main(
        [
            "train",
            "--model",
            str(tiny),
            "--data",
            str(reviews),
            "--targets",
            "query",
            "--no-progress",
            "--output",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    assert "matched no layer" in capsys.readouterr().err


def test_prune_command(tiny, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("to be or not to be, that is the question. " * 200)
    out = tmp_path / "pruned"
    args = [
        "prune",
        "--model",
        str(tiny),
        "--method",
        "wanda",
        "--sparsity",
        "2:4",
        "--data",
        str(text),
    ]
    assert main([*args, "--samples", "4", "--seq-len", "32", "--output", str(out)]) == 0
    assert "50.0%" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].mlp.down_proj.weight
    assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) == 2
    assert main(["prune", "--model", str(tiny), "--sparsity", "3:2", "--output", str(out)]) == 2

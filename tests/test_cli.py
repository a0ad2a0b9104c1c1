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


def _train_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["train"]


def test_every_config_field_is_a_train_flag():
    import dataclasses

    from lorakit.config import LoRAConfig, TrainConfig

    dests = {a.dest: a for a in _train_parser()._actions}
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "adapter"]
    fields += [f.name for f in dataclasses.fields(LoRAConfig)]
    missing = [f for f in fields if f not in dests]
    assert not missing, f"config fields without a flag: {missing}"
    assert sorted(TrainConfig.flat_keys()) == sorted(fields)
    for name in fields:  # the flag is the field's name, and its help is the field's
        assert dests[name].option_strings[0] == "--" + name.replace("_", "-")
        assert dests[name].help
    assert "full" in dests["method"].choices
    assert "sqrt(r)" in dests["alpha"].help  # right for lors too


def _parse_train(argv):
    from lorakit.cli import _train_config

    return _train_config(_train_parser().parse_args(argv))


def test_flags_reach_every_adapter_option():
    cfg = _parse_train(
        ["--method", "lors", "--sparse-grad", "straight_through", "--no-use-rslora",
         "--adapter-dtype", "float32", "--targets", "q_proj,v_proj", "--init", "gradient_svd",
         "--modules-to-save", "lm_head", "--no-progress"]
    )  # fmt: skip
    a = cfg.adapter
    assert (a.method, a.sparse_grad, a.use_rslora, a.adapter_dtype) == (
        "lors",
        "straight_through",
        False,
        "float32",
    )
    assert a.targets == ("q_proj", "v_proj") and a.init == "gradient_svd"
    assert a.modules_to_save == ("lm_head",) and cfg.progress is False
    assert (a.rank, a.alpha) == (16, 32.0)  # the training defaults, not LoRAConfig's
    assert _parse_train(["--method", "lors"]).adapter.use_rslora is True  # derived per method
    assert _parse_train(["--method", "full"]).adapter is None


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_config_file_with_flag_overrides(tmp_path, suffix):
    values = {"method": "lora_fa", "rank": 4, "lr": 0.01, "targets": ["q_proj"], "max_steps": 7}
    file = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        import yaml

        file.write_text(yaml.safe_dump(values))
    elif suffix == ".json":
        file.write_text(json.dumps(values))
    else:
        file.write_text(
            'method = "lora_fa"\nrank = 4\nlr = 0.01\ntargets = ["q_proj"]\nmax_steps = 7\n'
        )
    cfg = _parse_train(["--config", str(file), "--rank", "8", "--max-steps", "3"])
    assert cfg.adapter.method == "lora_fa" and cfg.adapter.targets == ("q_proj",)
    assert cfg.lr == 0.01 and cfg.adapter.rank == 8 and cfg.max_steps == 3  # flags win


def test_config_file_unknown_keys_refused_by_name(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("rank: 4\nlearning_rate: 0.1\n")
    with pytest.raises(
        ValueError, match=r"unknown config keys \['learning_rate'\]; valid keys .*'lr'"
    ):
        _parse_train(["--config", str(file)])


def test_run_folder_keeps_the_resolved_config_and_it_reruns(tiny, reviews, tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    args = ["--model", str(tiny), "--data", str(reviews), "--max-len", "32", "--rank", "4"]
    args += ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--output", str(out)]
    assert main(["train", *args]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rank"] == 4 and saved["method"] == "lora" and saved["use_rslora"] is False
    # the same run from its own file: resuming it finds nothing different
    assert main(["train", "--config", str(out / "config.yaml"), "--resume"]) == 0

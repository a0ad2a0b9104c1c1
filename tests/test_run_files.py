"""Run files read numbers the way users write them: every key of a ``--config`` file is coerced
to its field's declared type (YAML 1.1 reads ``4e-3`` as a string), or refused naming the key,
the value and the type."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from lorakit.cli import _train_config, build_parser
from lorakit.config import TRAIN_ADAPTER, TrainConfig


def _from_file(tmp_path, text: str, suffix: str = ".yaml") -> TrainConfig:
    file = tmp_path / f"run{suffix}"
    file.write_text(text)
    parser = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    return _train_config(parser.parse_args(["--config", str(file)]))


def test_yaml_reads_4e_3_as_a_string_and_the_run_file_as_a_number(tmp_path):
    assert yaml.safe_load("lr: 4e-3") == {"lr": "4e-3"}  # why: YAML 1.1 floats need a dot
    for text in ("lr: 4e-3", 'lr: "4e-3"', "lr: 0.004", "lr: 4.0e-3"):
        cfg = _from_file(tmp_path, text + "\nweight_decay: 1e-2\nalpha: 3e1\n")
        assert cfg.lr == 0.004 and isinstance(cfg.lr, float), text
        assert cfg.weight_decay == 0.01 and cfg.adapter.alpha == 30.0


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".json", '{"lr": "4e-3", "max_steps": "200", "packing": "true", "rank": 8.0}'),
        (".toml", 'lr = 4e-3\nmax_steps = 200\npacking = true\nrank = "8"\n'),
        (".yaml", "lr: 4e-3\nmax_steps: 2e2\npacking: yes\nrank: '8'\n"),
    ],
)
def test_every_format_means_the_same(tmp_path, suffix, text):
    cfg = _from_file(tmp_path, text, suffix)
    assert (cfg.lr, cfg.max_steps, cfg.packing, cfg.adapter.rank) == (0.004, 200, True, 8)
    assert type(cfg.max_steps) is int and type(cfg.adapter.rank) is int


def test_each_declared_type(tmp_path):
    cfg = _from_file(
        tmp_path,
        "max_len: '128'\nwarmup: '0.1'\nreduce_memory: 'on'\nprogress: 0\noutput: 2024\n"
        "dtype: bfloat16\nval_data: null\nchat_template: none\nadapter_dtype: 'null'\n"
        "label_names: negative, positive\nmodules_to_save: [lm_head]\ntargets: [q_proj, v_proj]\n"
        "use_rslora: 'false'\nmethod: lora_fa\n",
    )
    assert (cfg.max_len, cfg.warmup, cfg.reduce_memory, cfg.progress) == (128, 0.1, True, False)
    assert (cfg.output, cfg.dtype, cfg.val_data, cfg.chat_template) == (
        "2024",
        "bfloat16",
        None,
        None,
    )
    assert cfg.label_names == ("negative", "positive")
    a = cfg.adapter
    assert (a.method, a.adapter_dtype, a.use_rslora) == ("lora_fa", None, False)
    assert a.modules_to_save == ("lm_head",) and a.targets == ("q_proj", "v_proj")
    assert _from_file(tmp_path, "method: full\nlr: 1e-5\n").adapter is None


def _as_text(value) -> str:
    """A value written as a quoted string (as a JSON run file or a careful YAML user would)."""
    if value is None:
        return "null"
    if isinstance(value, (tuple, list)):
        return ",".join(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_field_written_as_a_string_means_its_value(tmp_path):
    """Each flat key, its default written as a string, gives the config of its typed default."""
    want = TrainConfig(adapter=TRAIN_ADAPTER.replace(use_rslora=False)).to_flat()
    want.pop("targets")  # "all-linear" vs a regex: a string target stays a string, by design
    text = {k: _as_text(v) for k, v in want.items()}
    cfg = _from_file(tmp_path, json.dumps(text), ".json")
    got = cfg.to_flat()
    assert {k: got[k] for k in want} == want
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"adapter"}
    assert fields <= set(text)  # no run field left out of the check


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("lr: fast", r"lr must be a number \(e\.g\. 4e-3 or 0\.004\), got 'fast' \(str\)"),
        ("lr: .nan", r"lr must be a number .*, got nan \(float\)"),
        ("max_steps: 12.5", r"max_steps must be an int, got 12\.5 \(float\)"),
        ("rank: true", r"rank must be an int, got True \(bool\)"),
        ("packing: maybe", r"packing must be a bool \(true/false\), got 'maybe' \(str\)"),
        ("dtype: fp8", r"dtype must be one of \['float32', 'bfloat16'.*\], got 'fp8' \(str\)"),
        ("method: dora", r"method must be one of \['lora', 'lora_fa', 'lors', 'full'\], got 'dora'"),
        ("label_names: 3", r"label_names must be a list of strings .*, got 3 \(int\)"),
        ("targets: [q_proj, 3]", r"targets must be a string or a list of strings .*got \['q_proj', 3\]"),
        ("adapter_dtype: int8", r"adapter_dtype must be one of \[.*\] or null, got 'int8' \(str\)"),
        ("output: [a]", r"output must be a string, got \['a'\] \(list\)"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key_the_value_and_the_type(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        _from_file(tmp_path, text + "\n")

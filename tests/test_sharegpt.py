"""ShareGPT records (`conversations` of {from, value}) read as `messages`, in files and hub data
sets, and every data-format error lists every accepted format."""

from __future__ import annotations

import json
import re

import pytest

from lorakit import data
from lorakit.train import TrainConfig, train

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Answer in one word."},
        {"from": "human", "value": "Capital of France?"},
        {"from": "gpt", "value": "Paris."},
    ]
}
MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
# What every data-format error names: the five accepted forms.
EVERY_FORMAT = (
    r"'text' \(optionally with an int 'label'\), 'prompt' and 'completion', 'messages' \(a list "
    r"of \{'role', 'content'\}\), or 'conversations' \(ShareGPT: a list of \{'from': "
    r"human\|gpt\|system, 'value'\}\)"
)


def _jsonl(path, *records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_sharegpt_records_are_messages(tmp_path):
    role_content = {"conversations": MESSAGES[1:]}  # {role, content} inside conversations too
    f = _jsonl(tmp_path / "chat.jsonl", SHAREGPT, role_content, {"messages": MESSAGES})
    assert data.load_records(f) == [
        {"messages": MESSAGES},
        {"messages": MESSAGES[1:]},
        {"messages": MESSAGES},  # one form: messages and conversations mix
    ]


def test_a_sharegpt_file_trains_as_chat(tiny, tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", *[SHAREGPT] * 4)
    flat = dict(model=str(tiny), data=f, rank=4, max_steps=1, batch_size=2, max_len=128)
    train(TrainConfig.from_flat(flat | {"output": str(tmp_path / "run"), "progress": False}))
    assert json.loads((tmp_path / "run" / "task.json").read_text())["task"] == "chat"


def test_sharegpt_hub_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list([SHAREGPT | {"id": "a"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)
    assert data.load_records("org/sharegpt", "train") == [{"messages": MESSAGES}]


@pytest.mark.parametrize(
    ("turn", "match"),
    [
        (
            {"from": "bot", "value": "x"},
            r"line 1: conversations turn 0 is from 'bot'; allowed: human, gpt, system, user, "
            r"assistant",
        ),
        (
            {"speaker": "human", "text": "x"},
            r"line 1: conversations turn 0 must be an object with 'from' and 'value' \(or 'role' "
            r"and 'content'\), got \['speaker', 'text'\]",
        ),
        ({"from": "gpt", "value": " "}, r"line 1 \(conversations\): message 0 \(assistant\) has "),
    ],
)
def test_bad_sharegpt_turns_are_named(tmp_path, turn, match):
    with pytest.raises(ValueError, match=match):
        data.load_records(_jsonl(tmp_path / "bad.jsonl", {"conversations": [turn]}))


def test_every_format_error_lists_every_format(tmp_path, monkeypatch):
    errors = []
    for name, body in [("a.jsonl", '{"body": "x"}\n'), ("b.jsonl", '["x"]\n')]:
        (tmp_path / name).write_text(body)
        with pytest.raises(ValueError) as e:
            data.load_records(str(tmp_path / name))
        errors.append(str(e.value))
    (tmp_path / "c.csv").write_text("sentence,label\nx,1\n")
    with pytest.raises(ValueError) as e:
        data.load_records(str(tmp_path / "c.csv"))
    errors.append(str(e.value))
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list([{"sentence": "x"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)
    with pytest.raises(ValueError) as e:
        data.load_records("org/odd", "train")
    errors.append(str(e.value))
    for error in errors:
        assert re.search(EVERY_FORMAT, error), error

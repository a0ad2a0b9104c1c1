"""A run's input encoding is decided once and reused: classes and prompt saved with the adapter and
read back by ``lorakit eval``, the completion loss reported by eval as training reports it,
``lorakit generate`` continuing plain prompts for a prompt/completion adapter, and resume
refusing data other than the checkpoint's."""

from __future__ import annotations

import json
import re

import pytest

from lorakit import scoring
from lorakit.classify import Classes, classes_for
from lorakit.cli import main
from lorakit.train import TrainConfig, train

THREE_CLASSES = [("awful", 0), ("fine", 2), ("dreadful", 0), ("great", 2), ("so-so", 1)] * 2


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tiny, data, out, **kw) -> TrainConfig:
    flat = dict(
        model=str(tiny), data=str(data), rank=4, alpha=8, max_steps=2, batch_size=4, lr=5e-3,
        max_len=64, save_every=1, output=str(out), progress=False,
    )  # fmt: skip
    return TrainConfig.from_flat({**flat, **kw})


def _perfect(records, classes: Classes):
    """A classifier that answers every prompt of ``records`` with its true class."""
    truth = {
        p: classes.index(r["label"]) for p, r in zip(classes.prompts(records), records, strict=True)
    }

    def classify(model, tok, prompts, words, batch_size):
        return [truth[p] for p in prompts]

    return classify


@pytest.mark.parametrize("values", [(0, 1, 2), (3, 7, 9)], ids=["0..K-1", "other values"])
def test_eval_scores_a_limited_subset_against_the_right_classes(monkeypatch, values):
    """The first 4 rows of a 3-class file hold labels {0, 2}; a perfect classifier scores 100 %
    (it scored 50 % when the classes were rebuilt from the rows left after --limit). Label values
    that are not 0..K-1 map to classes the same way."""
    records = [{"text": t, "label": values[y]} for t, y in THREE_CLASSES]
    found = classes_for(records)
    assert found.values == values
    classes = Classes(found.values, found.names, "Review: {text}\nAnswer:", (" n", " m", " p"))
    monkeypatch.setattr(scoring, "classify", _perfect(records, classes))
    assert {r["label"] for r in records[:4]} == {values[0], values[2]}
    assert scoring.score(None, None, records, classes=classes, limit=4) == {
        "accuracy": 1.0,
        "examples": 4,
    }


def test_classes_are_saved_with_the_adapter_and_reused_by_eval(tiny, tmp_path, capsys):
    data = _jsonl(tmp_path / "three.jsonl", [{"text": t, "label": y} for t, y in THREE_CLASSES])
    out = tmp_path / "run"
    cfg = _cfg(tiny, data, out, prompt="plain", label_names=["bad", "okay", "good"])
    prep = train(cfg)["prepared"]
    spec = scoring.saved_spec(out / "adapter")
    assert spec == json.loads((out / "task.json").read_text()) == prep.spec()
    assert spec["classes"]["names"] == ["bad", "okay", "good"]
    assert spec["classes"]["words"] == [" bad", " okay", " good"]
    # eval needs no --label-names or --prompt: it reads them from the adapter
    small = _jsonl(tmp_path / "two.jsonl", [{"text": t, "label": y} for t, y in THREE_CLASSES[:4]])
    args = ["eval", "--model", str(tiny), "--data", str(small), "--adapter", str(out / "adapter")]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 4 and 0 <= result["accuracy"] <= 1
    assert main([*args, "--label-names", "x,y,z"]) == 2
    assert "differ from the adapter's classes" in capsys.readouterr().err


def test_eval_reports_the_completion_loss_training_reports(tiny, tmp_path, capsys):
    rows = [{"prompt": f"Q: {a} plus {b}?\nA:", "completion": f" {a + b}"} for a in range(4) for b in range(3)]  # fmt: skip
    data = _jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "run"
    summary = train(_cfg(tiny, data, out, val_data=str(data), micro_batch_size=2))["summary"]
    args = ["eval", "--model", str(tiny), "--data", str(data), "--adapter", str(out / "adapter")]
    assert main([*args, "--max-len", "64", "--batch-size", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    from lorakit import data
    from lorakit.models import load_model

    _, tok = load_model(str(tiny))
    want = sum(sum(y != -100 for y in e["labels"][1:]) for e in data.encode_examples(rows, tok, 64))
    assert result["completion_tokens"] == want  # the completion's tokens and the eos token


def test_generate_continues_a_plain_prompt_for_a_prompt_completion_adapter(tiny, tmp_path, capsys):
    from lorakit.adapters import load_adapter
    from lorakit.generate import complete
    from lorakit.inject import merge
    from lorakit.models import load_model

    rows = [{"prompt": f"Say {w}:", "completion": f" {w}"} for w in ("yes", "no", "maybe", "ok")]
    out = tmp_path / "run"
    train(_cfg(tiny, _jsonl(tmp_path / "sft.jsonl", rows), out))
    assert scoring.saved_spec(out / "adapter") == {"task": "sft"}
    model, tok = load_model(str(tiny))
    merge(load_adapter(model, out / "adapter"))
    want = complete(model, tok, "Say yes:", max_new_tokens=5, temperature=0, stream=False)
    capsys.readouterr()
    args = ["generate", "--model", str(tiny), "--adapter", str(out / "adapter")]
    assert main([*args, "--prompt", "Say yes:", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()
    # --format chat still renders the chat template (what generate always did before)
    chat = ["--format", "chat", "--prompt", "Say yes:", "--max-new-tokens", "5"]
    assert main([*args, *chat, "--temperature", "0"]) == 0


@pytest.mark.parametrize("change", ["data file", "chat template", "tokenizer"])
def test_resume_refuses_other_data_and_says_what_changed(tiny, tmp_path, change):
    from transformers import AutoTokenizer

    from lorakit.models import load_model

    chats = [
        {"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello"}]}
        for i in range(8)
    ]  # fmt: skip
    data = _jsonl(tmp_path / "chat.jsonl", chats)
    jinja = tmp_path / "t.jinja"
    template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    jinja.write_text(template)
    out = tmp_path / "run"
    kw = {"chat_template": str(jinja)}  # the same file each time; its text may change
    train(_cfg(tiny, data, out, **kw))
    tokenizer, model = None, None
    if change == "data file":
        _jsonl(data, chats[:-1])
        match = r"chat\.jsonl; the number of training records: 8 -> 7"
    elif change == "chat template":
        jinja.write_text(template.replace("assistant:", "assistant: "))
        # (the labels stay the same: " Hello" straddles either generation prompt's end)
        match = r"\(the prompt, chat template or classes\)"
    else:
        model, tokenizer = load_model(str(tiny))
        tokenizer = AutoTokenizer.from_pretrained(str(tiny))
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
        match = r"the tokenizer \(vocabulary, merges or special tokens\)"
    with pytest.raises(
        ValueError, match="cannot resume: the data differs from the checkpoint's"
    ) as e:
        train(_cfg(tiny, data, out, **kw), resume=True, model=model, tokenizer=tokenizer)
    assert re.search(match, str(e.value)), str(e.value)
    # the same data resumes
    if change == "data file":
        _jsonl(data, chats)
        assert train(_cfg(tiny, data, out, **kw), resume=True)["summary"]["steps"] == 2

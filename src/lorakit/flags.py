"""Command-line flags from config dataclasses, and run files (YAML, JSON, TOML) of the same keys.

Shared by every command (``lorakit train`` and ``lorakit plan`` alike), below the CLI itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any


def _flag_kwargs(f: dataclasses.Field, hint: Any, default: Any) -> dict[str, Any]:
    """argparse keywords for a config field: type (or parse), choices, help with the default."""
    args = typing.get_args(hint) if typing.get_origin(hint) is not typing.Literal else ()
    optional = type(None) in args
    inner = [a for a in args if a is not type(None)] if args else [hint]
    help = f.metadata.get("help", "")
    kw: dict[str, Any] = {"help": help if "default:" in help else f"{help} (default: {default!r})"}
    if "parse" in f.metadata:
        return {**kw, "type": f.metadata["parse"]}
    if inner == [bool]:
        return {**kw, "action": argparse.BooleanOptionalAction}
    literal = [a for a in inner if typing.get_origin(a) is typing.Literal]
    if literal:
        choices = list(typing.get_args(literal[0]))
        return {
            **kw,
            "choices": choices + ([None] if optional else []),
            "type": _none_or(str, optional),
        }
    base = next(a for a in inner if a in (int, float, str))
    return {**kw, "type": _none_or(base, optional)}


def _none_or(kind: type, optional: bool):
    if not optional:
        return kind
    return lambda v: None if v.lower() in ("none", "null") else kind(v)


def add_config_flags(
    p: argparse.ArgumentParser,
    cls: type,
    *,
    only: tuple[str, ...] | None = None,
    skip: tuple[str, ...] = (),
    suppress: bool = True,
    defaults: Any = None,
) -> list[str]:
    """One ``--flag`` per field of config dataclass ``cls`` (``_`` -> ``-``); returns the names.

    With ``suppress`` a flag not given is absent from the namespace, so a ``--config`` file and
    the dataclass defaults fill it in (flags override the file). ``defaults``: an instance whose
    values the help shows as defaults (e.g. the adapter a training run uses).
    """
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = f.default if defaults is None else getattr(defaults, f.name)
        kw = _flag_kwargs(f, hints[f.name], default)
        kw["default"] = argparse.SUPPRESS if suppress else default
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
        names.append(f.name)
    return names


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping from a YAML, JSON or TOML run file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {file}: no such file")
    text = file.read_text()
    suffix = file.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
    elif suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"--config {file}: expected a .yaml, .yml, .json or .toml file")
    if not isinstance(data, dict):
        raise ValueError(f"--config {file}: expected a mapping of keys to values at the top")
    return data


def load_options(a: argparse.Namespace) -> dict[str, Any]:
    """``load_model``'s options from a command's flags (``--dtype``, ``--quantize``,
    ``--double-quant``, ``--attn-implementation``, ``--adapter``): a LoRS adapter needs its base
    quantized by lorakit, which keeps the pruned zero pattern."""
    from .config import DTYPES

    kw: dict[str, Any] = {"dtype": DTYPES[a.dtype]}
    kw["attn_implementation"] = getattr(a, "attn_implementation", "auto")
    if getattr(a, "quantize", "none") != "none":
        kw |= {"quantize": a.quantize, "double_quant": a.double_quant}
        if a.adapter:  # read (and checked) here, then again, small, by load_adapter
            from .peft_format import read_adapter

            method = read_adapter(a.adapter).metadata.get("lorakit_method")
            kw["keep_pattern"] = method == "lors"
    return kw

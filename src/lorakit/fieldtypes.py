"""Values of a flat run mapping (a ``--config`` file, flags, a checkpoint's config) read by their
fields' declared types, so a number means the same however it is written.

YAML 1.1 reads ``lr: 4e-3`` as the string ``"4e-3"`` (its float needs a dot: ``4.0e-3``), JSON
files quote numbers, TOML types them: ``4e-3``, ``"4e-3"`` and ``0.004`` all become the float
0.004 here. Each value is converted to its field's type (int, float, bool, str, a ``Literal``'s
choices, ``X | None``, ``tuple[str, ...]``) or refused with the key, the value and the type
expected. Ranges (``lr > 0``) stay with each config's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~", "")


class _Bad(Exception):
    """A value that does not fit the type (turned into the ValueError naming the key)."""


def _describe(hint: Any) -> str:
    """The type, as an error message states it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return "a list of strings (or one comma-separated string)"
    names = {
        int: "an int",
        float: "a number (e.g. 4e-3 or 0.004)",
        bool: "a bool (true/false)",
        str: "a string",
        type(None): "null",
    }
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise _Bad
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _Bad from None
    else:
        raise _Bad
    if not math.isfinite(number):
        raise _Bad
    return number


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    number = _number(value)
    if not number.is_integer():
        raise _Bad
    return int(number)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
        return value.strip().lower() in _TRUE
    raise _Bad


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # YAML reads `output: 2024` as int
        return str(value)
    raise _Bad


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # as on the command line: a,b,c
        return tuple(t.strip() for t in value.split(",") if t.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _Bad


def _literal(value: Any, choices: tuple) -> Any:
    if value in choices and not isinstance(value, bool):
        return value
    text = str(value).strip() if isinstance(value, (str, int, float)) else None
    if text in choices:
        return text
    raise _Bad


def _union(value: Any, args: tuple) -> Any:
    if type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        inner = rest[0] if len(rest) == 1 else typing.Union[rest]  # noqa: UP007
        if value is None:
            return None
        takes_none = any(
            typing.get_origin(a) is Literal and "none" in typing.get_args(a) for a in rest
        )
        if isinstance(value, str) and value.strip().lower() in _NONE and not takes_none:
            return None
        return _convert(value, inner)
    if str in args and isinstance(value, str):  # str | tuple[str, ...]: a string stays one
        return value
    for a in args:
        try:
            return _convert(value, a)
        except _Bad:
            continue
    raise _Bad


def _convert(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return _literal(value, args)
    if origin in (typing.Union, types.UnionType):
        return _union(value, args)
    if origin is tuple:
        return _strings(value)
    simple = {int: _int, float: _number, bool: _bool, str: _str}
    if hint in simple:
        return simple[hint](value)
    return value  # a nested config (TrainConfig.adapter) is not a flat key


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as field ``key`` of type ``hint`` holds it; ValueError naming the key, the value
    and the type expected if it cannot."""
    try:
        return _convert(value, hint)
    except _Bad:
        raise ValueError(
            f"{key} must be {_describe(hint)}, got {value!r} ({type(value).__name__})"
        ) from None


def coerce_fields(
    data: dict[str, Any], *classes: type, choices: dict[str, tuple] | None = None
) -> dict[str, Any]:
    """``data`` with every key that is a field of one of the dataclasses ``classes`` coerced to
    the field's declared type (other keys untouched; ``choices``: more values a Literal field
    accepts in this mapping, e.g. ``method: full``)."""
    hints: dict[str, Any] = {}
    for cls in classes:
        declared = typing.get_type_hints(cls)
        hints |= {f.name: declared[f.name] for f in dataclasses.fields(cls)}
    for key, extra in (choices or {}).items():
        hints[key] = Literal[(*typing.get_args(hints[key]), *extra)]
    return {k: coerce(k, v, hints[k]) if k in hints else v for k, v in data.items()}

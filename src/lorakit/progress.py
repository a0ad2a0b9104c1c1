"""Progress bars (tqdm) for every loop that can take more than a few seconds, made in one place.

- On a terminal: a tqdm bar on stderr, drawn once the loop has run :data:`DELAY` seconds (quick
  loops stay silent); a nested bar (validation inside training) is cleared when it ends.
- When stderr is not a terminal (a log file, CI, a pipe): plain lines instead of carriage-return
  redraws, one every :data:`LINE_EVERY` seconds and one when a loop that ran past the delay ends.
- Nothing on torchrun ranks other than 0, nor inside ``enabled(False)``: the CLI's
  ``--no-progress`` and a function's own ``progress=False`` (``prune``, ``TrainConfig.progress``).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["DELAY", "LINE_EVERY", "add_flags", "bar", "batch_starts", "enabled", "shown"]

DELAY = 2.0  # seconds a loop runs before its bar appears
LINE_EVERY = 30.0  # seconds between two plain lines when stderr is not a terminal
_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("lorakit_progress", default=True)


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Bars inside the block are shown (``True``) or not (``False``). ``True`` never turns back
    on what an enclosing ``enabled(False)`` turned off.

    Example:
        ``with lorakit.progress.enabled(False): lk.prune(model, "wanda", 0.5)``
    """
    token = _ON.set(_ON.get() and bool(on))
    try:
        yield
    finally:
        _ON.reset(token)


def shown(on: bool = True) -> bool:
    """Whether a bar asked for with ``on`` is drawn here: not turned off, and rank 0."""
    return bool(on) and _ON.get() and os.environ.get("RANK", "0") == "0"


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    on: bool = True,
    **kw: Any,
):
    """A tqdm bar over ``iterable`` (or updated by hand up to ``total``) on stderr; see the
    module docstring for when and how it is drawn. ``kw`` goes to tqdm (``initial``, ...)."""
    from tqdm import tqdm

    stream = sys.stderr
    kw |= {"total": total, "desc": desc, "unit": unit, "delay": DELAY, "disable": not shown(on)}
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, file=stream, leave=None, dynamic_ncols=True, **kw)
    return _lines_class()(
        iterable, file=_LineWriter(stream), leave=True, mininterval=LINE_EVERY, ascii=True, **kw
    )


def batch_starts(n: int, size: int, *, desc: str, unit: str, on: bool = True) -> Iterator[int]:
    """``range(0, n, size)`` (where each batch of ``size`` items starts) with a bar counting the
    items done, not the batches: ``--limit 16`` windows reads 16/16."""
    with bar(total=n, desc=desc, unit=unit, on=on) as b:
        for start in range(0, n, size):
            yield start
            b.update(min(size, n - start))


class _LineWriter:
    """A stream for tqdm that writes each redraw as a plain line: carriage returns, cursor moves
    and the blank redraws that clear a bar are dropped."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\x1b[A", "").replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


_LINES: list[type] = []


def _lines_class() -> type:
    """tqdm's class for plain lines (made on first use: tqdm is imported only then)."""
    if _LINES:
        return _LINES[0]
    from tqdm import tqdm

    class Lines(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            super().set_postfix(ordered_dict, refresh=False, **kwargs)  # a line per interval only

        def set_description(self, desc=None, refresh=True):
            super().set_description(desc, refresh=False)

        def close(self):
            late = getattr(self, "start_t", 0) + getattr(self, "delay", 0)
            if not self.disable and self.last_print_t < late <= self._time():
                self.last_print_t = (
                    self._time()
                )  # ran past the delay between two lines: end with one
            super().close()

    _LINES.append(Lines)
    return Lines


def add_flags(sub: argparse._SubParsersAction) -> None:
    """``--progress / --no-progress`` on every command that lacks one (``train`` has its
    config's), and each command then runs inside ``enabled(args.progress)``."""
    for parser in sub.choices.values():
        if not any(a.dest == "progress" for a in parser._actions):
            parser.add_argument(
                "--progress",
                action=argparse.BooleanOptionalAction,
                default=True,
                help="progress bars on stderr (plain lines when it is not a terminal)",
            )
        func = parser.get_default("func")
        if func is not None:
            parser.set_defaults(func=_with_progress(func))


def _with_progress(func: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        on = getattr(args, "progress", True) is not False
        with enabled(on), _hub_bars(on):
            return func(args)

    run.__wrapped__ = func  # type: ignore[attr-defined]
    return run


@contextlib.contextmanager
def _hub_bars(on: bool) -> Iterator[None]:
    """``--no-progress`` also quiets transformers' and the hub's own bars (loading weights,
    downloads), for the command's duration."""
    if on:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()

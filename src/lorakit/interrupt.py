"""Ctrl-C during training: finish the step in hand, save a checkpoint, say how to resume.

A first Ctrl-C (SIGINT) during :func:`lorakit.train.train`'s steps lets the running step finish,
writes a checkpoint at it (always, not only when ``save_every`` makes one due: it is the
checkpoint ``save_every`` would write there, so a resume still reaches the uninterrupted run's
adapter) and raises :class:`Interrupted`, a ``KeyboardInterrupt``. A second Ctrl-C stops at once,
keeping the last checkpoint written. Under torchrun a Ctrl-C stops every process at once (ranks
would first have to agree on a step). ``lorakit train`` then prints the ``--resume`` command
and exits with 130, without a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after saving a checkpoint at ``step`` (of ``max_steps``)."""

    def __init__(self, step: int, max_steps: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step} of {max_steps}; checkpoint in {checkpoint}")
        self.step, self.max_steps, self.checkpoint = step, max_steps, checkpoint


class _Flag:
    """A SIGINT handler that only records the first Ctrl-C (the next one acts as before)."""

    def __init__(self) -> None:
        self.hit = False
        self.previous: Any = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.hit = True
        signal.signal(signal.SIGINT, self.previous)
        print(
            "\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop now)",
            file=sys.stderr,
        )

    @contextlib.contextmanager
    def installed(self, enabled: bool) -> Iterator[None]:
        previous = signal.getsignal(signal.SIGINT)
        # Python can only set handlers in the main thread, and only restore ones it knows.
        enabled = enabled and previous is not None
        enabled = enabled and threading.current_thread() is threading.main_thread()
        if enabled:
            self.previous = previous
            signal.signal(signal.SIGINT, self)
        try:
            yield
        finally:
            if enabled:
                signal.signal(signal.SIGINT, previous)


def _saved_step(output: Path) -> int | None:
    from .checkpoint import find_checkpoint

    found = find_checkpoint(output)
    if found is None:
        return None
    return int(json.loads((found / "trainer_state.json").read_text())["step"])


def interruptible(run: Any, save: Callable[[Any], None]) -> Iterator[int]:
    """Yield the step to run until ``run.step`` reaches ``run.cfg.max_steps``; after a first
    Ctrl-C, once the step in hand is done, ``save(run)`` (unless a checkpoint of that step was
    just written) and raise :class:`Interrupted`.

    Args:
        run: a :class:`lorakit.train.Run`.
        save: writes its checkpoint (``lorakit.train._checkpoint``).
    """
    flag = _Flag()
    with flag.installed(enabled=not run.ctx.enabled):
        while run.step < run.cfg.max_steps:
            yield run.step
            if flag.hit:
                if _saved_step(run.out) != run.step:
                    save(run)
                raise Interrupted(run.step, run.cfg.max_steps, run.out / "checkpoint")


def resume_command(argv: list[str]) -> str:
    """The ``lorakit train`` command line ``argv`` (after ``lorakit``) resuming instead."""
    args = [a for a in argv if a != "--overwrite"]
    args += [] if "--resume" in args else ["--resume"]
    command = shlex.join(["lorakit", *args])
    if "RANK" in os.environ:  # started by torchrun: so is the resume
        command = command.replace("lorakit", "torchrun <as before> -m lorakit", 1)
    return command


def report(
    command: str, error: KeyboardInterrupt, argv: list[str], output: Callable[[], str]
) -> int:
    """Tell a Ctrl-C'd command's user where things stand (stderr); return the exit code.

    ``output``: the train run's output folder, asked only for ``lorakit train``.
    """
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 talks
        return EXIT_CODE
    where = f"lorakit {command}: interrupted"
    if command != "train":
        print(where, file=sys.stderr)
        return EXIT_CODE
    if isinstance(error, Interrupted):
        where += f" at step {error.step} of {error.max_steps}; checkpoint saved in"
        where += f" {error.checkpoint}"
    else:
        try:
            out = Path(output())
        except (ValueError, OSError):  # the flags themselves were bad: nothing ran
            out = None
        step = _saved_step(out) if out is not None else None
        if step is None:
            print(f"{where} before a checkpoint was written; nothing to resume", file=sys.stderr)
            return EXIT_CODE
        where += f"; the last checkpoint (step {step}) is in {out / 'checkpoint'}"
    print(f"{where}. Continue with:\n  {resume_command(argv)}", file=sys.stderr)
    return EXIT_CODE

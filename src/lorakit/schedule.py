"""How long a run trains and at what learning rate: the data order at step k, the lr schedule,
steps from ``--epochs``, and extending a run with a larger ``--max-steps``.

Everything here is a function of the config and the step, so a resumed run continues exactly
where it stopped:

- **Data order.** Global batch k holds positions ``[k·b, (k+1)·b)`` of an endless stream made of
  one seeded permutation of the n training examples per epoch; a batch may straddle two epochs.
- **Epochs.** ``epochs = E > 0`` trains ``ceil(E·n / b)`` steps (b: the global ``batch_size``, n:
  the training examples after encoding, i.e. windows of ``max_len`` tokens for plain text): the
  fewest global batches that show every example E times (fractional E: that share of an epoch).
  It replaces ``max_steps`` when that is left at its default; a ``max_steps`` that says another
  number is refused.
- **Extending.** ``--resume`` with a larger ``max_steps`` (or more epochs) continues a finished or
  killed run. The schedule is a function of the step and ``max_steps``, so it is recomputed over
  the new total: from the resume point the lr is what a run planned with the new ``max_steps`` has
  at that step (after a finished cosine run, which ended at lr 0, it steps back up to that value
  and decays to 0 at the new end). Data order and optimizer state continue unchanged, so with a
  constant schedule the extended run equals a run planned that long from the start.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch

from .config import TrainConfig

__all__ = ["batch_indices", "extends", "lr_lambda", "note", "resolve_steps", "resume_schedule"]

LENGTH_KEYS = ("max_steps", "epochs")  # what an extended resume may change


def note(text: str) -> None:
    """A line of the run's log (stderr, rank 0 only; above a progress bar if one is drawn)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        from tqdm import tqdm

        tqdm.write(f"lorakit train: {text}", file=sys.stderr)


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    ).tolist()


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: a seeded permutation per epoch, nothing else."""
    return [
        _epoch_order(n, seed, pos // n)[pos % n]
        for pos in range(step * batch_size, (step + 1) * batch_size)
    ]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warmup, then cosine / linear decay or constant."""
    warm = int(cfg.warmup * cfg.max_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, cfg.max_steps - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def resolve_steps(cfg: TrainConfig, n_train: int) -> TrainConfig:
    """``cfg`` with ``max_steps`` set from ``epochs`` (unchanged when epochs is 0)."""
    if not cfg.epochs:
        return cfg
    steps = math.ceil(Fraction(repr(cfg.epochs)) * n_train / cfg.batch_size)  # exact: 0.1 is 1/10
    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "max_steps")
    if cfg.max_steps not in (default, steps):
        raise ValueError(
            f"epochs {cfg.epochs:g} is {steps} steps ({n_train} training examples, batch_size "
            f"{cfg.batch_size}), but max_steps is {cfg.max_steps}; give one of the two (max_steps "
            f"left at its default {default} is set from epochs)"
        )
    if cfg.max_steps != steps:
        note(
            f"epochs {cfg.epochs:g}: {steps} steps of {cfg.batch_size} examples over "
            f"{n_train} training examples"
        )
    return dataclasses.replace(cfg, max_steps=steps)


def extends(then: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether resuming the flat config ``then`` as ``now`` changes only how long it trains, to
    at least as many steps (the changes :data:`LENGTH_KEYS` a resume may make)."""
    return now["max_steps"] >= then["max_steps"]


def resume_schedule(saved: dict[str, Any], step: int, cfg: TrainConfig, optimizer, scheduler):
    """After a resume with another ``max_steps`` than the checkpoint's (``saved``: its flat
    config), set the lr the schedule recomputed over the new total gives at ``step``, and say so.
    """
    before = TrainConfig.from_flat(saved)
    if before.max_steps == cfg.max_steps:
        return
    old, new = lr_lambda(before)(step), lr_lambda(cfg)(step)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * new
    warm = int(cfg.warmup * cfg.max_steps)
    note(
        f"extending the run from max_steps {before.max_steps} to {cfg.max_steps} at step {step}: "
        f"the lr schedule ({cfg.schedule}, {warm} warmup steps) is recomputed over "
        f"{cfg.max_steps} steps, so the lr of step {step + 1} is {cfg.lr * new:.4g} (the "
        f"{before.max_steps}-step schedule's was {cfg.lr * old:.4g}) and it follows the "
        f"{cfg.max_steps}-step schedule from there to step {cfg.max_steps}"
    )

"""The largest micro-batch and the longest rows that fit a memory budget.

Every answer is checked by plans: ``n`` fits and ``n + 1`` does not (micro-batches, or steps of
256 tokens). The search for the longest rows starts from a guess, the budget's crossing of the
line through two planned peaks (training memory grows linearly with the rows: flash/efficient
attention, a chunked loss), so most answers cost two plans; a guess that misses is only where a
bracketed bisection starts, so a peak that is not linear costs more plans, never a wrong answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import TrainConfig
from ..progress import bar
from .core import plan
from .report import MemoryPlan

MARGIN = 0.05  # of the budget, kept free: allocator fragmentation and the CUDA context
STEP = 256  # sequence lengths are searched in multiples of this


def _largest(fits, lo: int, limit: int, guess: int | None = None) -> int:
    """The largest n in [lo, limit] with fits(n), given fits is monotone; 0 if none.

    Without a guess it gallops up from ``lo`` (doubling); with one it brackets the answer
    around the guess (steps of 1, 2, 4 ... from it), then bisects."""
    if guess is not None and fits(guess):
        good, bad, step = guess, None, 1
    else:
        if not fits(lo):
            return 0
        good, bad, step = lo, guess, lo
    while bad is None:
        if good == limit:
            return good
        nxt = min(good + step, limit)
        good, bad = (nxt, None) if fits(nxt) else (good, nxt)
        step *= 2
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


class _Search:
    """Plans of ``cfg`` at (micro-batch, rows), each made once."""

    def __init__(self, cfg: TrainConfig, kw: dict[str, Any]):
        self.cfg, self.kw, self.plans = cfg, kw, {}
        self.bar = bar(desc="fit", unit="plan")  # how many plans the search has made

    def __call__(self, micro: int, seq: int) -> MemoryPlan:
        if (micro, seq) not in self.plans:
            world = self.kw.get("world_size", 1)
            c = dataclasses.replace(
                self.cfg, batch_size=micro * world, micro_batch_size=micro, max_len=seq
            )
            self.plans[micro, seq] = plan(c, **self.kw)
            self.bar.update(1)
        return self.plans[micro, seq]

    def longest(self, budget: int, margin: float, limit: int) -> int:
        """The most steps of 256 tokens at micro-batch 1 that fit (0: not even one)."""
        a, b = 1, min(8, limit)
        guess = None
        if b > a and self(1, a * STEP).fits(budget, margin):
            pa, pb = self(1, a * STEP).peak, self(1, b * STEP).peak
            room = budget * (1 - margin) - pa
            guess = limit if pb <= pa else a + int(room * (b - a) / (pb - pa))
            guess = max(a, min(guess, limit))
        return _largest(lambda n: self(1, n * STEP).fits(budget, margin), 1, limit, guess)


def _limit(cfg: TrainConfig, max_seq: int | None) -> int:
    from .shapes import load_config

    seq = max_seq or getattr(load_config(cfg.model), "max_position_embeddings", 131072)
    return max(seq // STEP, 1)


def fit(
    cfg: TrainConfig, budget: int, *, margin: float = MARGIN, max_seq: int | None = None, **kw: Any
) -> dict[str, Any]:
    """Search what fits ``budget`` bytes per rank (keeping ``margin`` of it free).

    Returns ``micro_batch_size`` (the largest at ``cfg.max_len``), ``max_len`` (the longest rows,
    a multiple of 256, at micro-batch 1, up to the model's ``max_position_embeddings``) and the
    plans at each answer. ``kw`` goes to :func:`plan` (strategy, world_size, target, adapt).
    """
    run = _Search(cfg, kw)
    with run.bar:
        micro = _largest(lambda b: run(b, cfg.max_len).fits(budget, margin), 1, 4096)
        steps = run.longest(budget, margin, _limit(cfg, max_seq))
    return {
        "budget": budget,
        "margin": margin,
        "micro_batch_size": micro,
        "max_len": steps * STEP,
        "at_micro_batch": run.plans.get((micro, cfg.max_len)),
        "at_max_len": run.plans.get((1, steps * STEP)),
        "plans": len(run.plans),
    }


def longest(
    cfg: TrainConfig,
    budgets: list[int],
    *,
    margin: float = MARGIN,
    max_seq: int | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """The longest rows at micro-batch 1 that fit each budget: ``max_len`` maps each budget to
    tokens (a multiple of 256; 0 if not even 256 fit); ``plans``: how many plans that took
    (shared between budgets)."""
    run, limit = _Search(cfg, kw), _limit(cfg, max_seq)
    with run.bar:
        found = {b: run.longest(b, margin, limit) * STEP for b in budgets}
    return {"max_len": found, "plans": len(run.plans)}

"""``lorakit train --fit 24GiB``: before the first step, the cheapest setting that fits.

The run is planned on fake tensors (:func:`lorakit.planner.plan`, the same code path as
training) setting by setting, from the one that costs nothing to the ones that trade time for
memory, and the first that fits the budget (less :data:`~lorakit.planner.fit.MARGIN`) is taken:

1. the run as asked;
2. ``reduce_memory`` (chunked loss, norm and MLP recompute, sdpa: same results, ~15 % slower);
3. the same at smaller micro-batches (gradient accumulation: the same global batch);
4. + activation checkpointing (one more forward per step), micro-batch from the largest down;
5. + MLP tiling (``mlp_tile`` 1024 tokens);
6. + offloaded checkpoints (host memory; transfers on the compute stream).

Settings the user chose are kept (an option already on stays on). When nothing fits, the error
says what the smallest setting needs and what would help: a 4-bit base, LoRA-FA, shorter rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from ..config import TrainConfig
from .fit import MARGIN
from .report import MemoryPlan, gib, parse_size

TILE = 1024


def _micro_batches(cfg: TrainConfig, world: int) -> list[int]:
    per_rank = cfg.batch_size // world
    largest = cfg.micro_batch_size or per_rank
    return [m for m in range(largest, 0, -1) if per_rank % m == 0]


def candidates(cfg: TrainConfig, world: int = 1) -> Iterator[tuple[str, TrainConfig]]:
    """(what changed, config) in the order they are tried, cheapest first."""
    micros = _micro_batches(cfg, world)
    seen = set()

    def make(why: str, micro: int, **opts) -> tuple[str, TrainConfig] | None:
        opts = {k: v for k, v in opts.items() if v or not getattr(cfg, k)}  # keep what is on
        c = dataclasses.replace(cfg, micro_batch_size=micro, **opts)
        key = (c.micro_batch_size, c.reduce_memory, c.checkpointing, c.mlp_tile, c.offload)
        if key in seen:
            return None
        seen.add(key)
        return why, c

    steps = [make("as asked", micros[0])]
    steps += [make("reduce_memory", m, reduce_memory=True) for m in micros]
    ckpt = {"reduce_memory": True, "checkpointing": True}
    steps += [make("reduce_memory + checkpointing", m, **ckpt) for m in micros]
    tile = {**ckpt, "mlp_tile": cfg.mlp_tile or TILE}
    steps += [make(f"+ mlp_tile {tile['mlp_tile']}", m, **tile) for m in micros]
    steps += [make("+ offloaded checkpoints", m, **tile, offload=True) for m in micros]
    yield from (s for s in steps if s is not None)


def choose(
    cfg: TrainConfig,
    budget: str | int,
    *,
    target: str = "gpu",
    world: int = 1,
    report: Callable[[str], None] = print,
    **kw,
) -> tuple[TrainConfig, MemoryPlan]:
    """The first of :func:`candidates` whose planned peak fits ``budget``; raises ValueError
    saying what would fit when none does."""
    from .core import plan

    limit = parse_size(budget) if isinstance(budget, str) else int(budget)
    last = None
    for why, c in candidates(cfg, world):
        p = plan(dataclasses.replace(c, fit=None), target=target, **kw)
        fits = p.fits(limit, MARGIN)
        report(
            f"fit {gib(limit)}: {why}, micro-batch {p.micro_batch_size}: peak {gib(p.peak)}"
            + (f", host {gib(p.host)}" if p.host else "")
            + (" -> fits" if fits else "")
        )
        if fits:
            return c, p
        last = p
    hints = []
    if cfg.quantize == "none":
        hints.append("a 4-bit base (--quantize nf4)")
    if cfg.method == "lora" or cfg.method == "full":
        hints.append("LoRA-FA (--method lora_fa)")
    hints.append(
        f"shorter rows (--max-len below {cfg.max_len}; `lorakit plan --fit` finds the longest)"
    )
    raise ValueError(
        f"nothing fits {gib(limit)} (less {MARGIN:.0%} kept free): the smallest setting, "
        f"micro-batch 1 with reduce_memory, checkpointing, mlp_tile and offload, peaks at "
        f"{gib(last.peak)}; try {', '.join(hints)}"
    )


def fit_run(cfg: TrainConfig, world: int = 1) -> TrainConfig:
    """``cfg`` with the setting :func:`choose` picks for ``cfg.fit``, planned for this machine's
    device (a GPU when CUDA is available, else this CPU); says what it chose and why."""
    import torch

    target = "gpu" if torch.cuda.is_available() else "cpu"
    print(f"lorakit train --fit {cfg.fit}: planning on {target} ...", flush=True)
    chosen, p = choose(cfg, cfg.fit, target=target, world=world)
    on = [n for n in ("reduce_memory", "checkpointing", "offload") if getattr(chosen, n)]
    on += [f"mlp_tile={chosen.mlp_tile}"] if chosen.mlp_tile else []
    print(
        f"lorakit train --fit {cfg.fit}: micro-batch {p.micro_batch_size}"
        + (f", {', '.join(on)}" if on else ", nothing else needed")
        + f"; planned peak {gib(p.peak)} ({p.peak_phase})",
        flush=True,
    )
    return chosen

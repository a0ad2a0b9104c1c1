"""``lorakit plan``: the flags of a training run (same names, same defaults) plus where it runs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

RUN_FLAGS = ("model", "dtype", "quantize", "double_quant", "batch_size", "micro_batch_size")
RUN_FLAGS += ("max_len", "reduce_memory", "checkpointing", "mlp_tile", "lr", "weight_decay")
RUN_FLAGS += ("init_samples", "offload")
ADAPTER_FLAGS = ("method", "rank", "alpha", "targets", "adapter_dtype", "init")


def add_command(sub) -> None:
    from ..config import FULL, TRAIN_ADAPTER, LoRAConfig, TrainConfig
    from ..flags import add_config_flags
    from .core import STRATEGIES, TARGETS
    from .fit import MARGIN
    from .shapes import BUILTIN

    p = sub.add_parser(
        "plan",
        help="training memory per GPU for any model, planned on fake tensors (no weights)",
        description="Run the phases of a training run (a training step, validation, gradient-SVD "
        "init with --init gradient_svd) on the real code path on fake tensors and report, per "
        "rank, what is live at the peak of the run and each phase's peak. --model: a built-in "
        "shape ("
        + ", ".join(BUILTIN)
        + "), a folder with config.json, or a hub id. Rows are --max-len tokens, unpadded.",
    )
    p.add_argument("--config", default=None, help="a run file (as for train); flags override it")
    add_config_flags(p, TrainConfig, only=RUN_FLAGS)
    add_config_flags(p, LoRAConfig, only=ADAPTER_FLAGS, defaults=TRAIN_ADAPTER)
    for action in p._actions:
        if action.dest == "method":
            action.choices = [*action.choices, FULL]
    p.add_argument("--strategy", default="single", choices=STRATEGIES, help="(default: single)")
    p.add_argument("--world-size", type=int, default=1, help="ranks for ddp / fsdp (default: 1)")
    p.add_argument(
        "--target",
        default="gpu",
        choices=TARGETS,
        help="gpu: 16-bit computed natively, foreach AdamW; cpu: this machine (default: gpu)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--plot", default=None, help="write a stacked-bar PNG of the peak here")
    p.add_argument(
        "--fit",
        default=None,
        help="a memory size per rank (24GiB, 80GB): search the largest micro-batch at --max-len "
        "and the longest rows at micro-batch 1 that fit, and the cheapest setting of this run "
        "that fits (reduce, checkpointing, MLP tile, offload: what train --fit picks)",
    )
    p.add_argument(
        "--margin", type=float, default=MARGIN, help=f"of --fit kept free (default: {MARGIN})"
    )
    p.set_defaults(func=cmd_plan)


def _config(a: argparse.Namespace):
    from ..config import TrainConfig
    from ..flags import read_config_file

    own = {"config", "command", "func", "strategy", "world_size", "target", "json", "plot"}
    own |= {"fit", "margin"}
    flags = {k: v for k, v in vars(a).items() if k not in own}
    values = read_config_file(a.config) if a.config else {}
    return TrainConfig.from_flat({**values, **flags})


def cmd_plan(a: argparse.Namespace) -> int:
    from .core import plan
    from .fit import fit
    from .report import parse_size, plot

    budget = parse_size(a.fit) if a.fit is not None else None
    if not 0 <= a.margin < 1:
        raise ValueError(f"--margin is a fraction of --fit in [0, 1), got {a.margin}")
    cfg = _config(a)
    where: dict[str, Any] = {"strategy": a.strategy, "world_size": a.world_size, "target": a.target}
    result = plan(cfg, **where)
    found = fit(cfg, budget, margin=a.margin, **where) if budget is not None else None
    if found is not None:  # and the cheapest setting of this run that fits, as train --fit picks
        found["setting"] = _setting(cfg, budget, a)
    if a.plot:
        shown = [result] + [
            found[k] for k in ("at_micro_batch", "at_max_len") if found and found[k]
        ]
        plot(shown, a.plot, budgets=(budget,) if budget else ())
    if a.json:
        out = result.to_dict()
        if found is not None:
            out["fit"] = {
                k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in found.items()
            }
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(result.table())
    if found is not None:
        print(_fit_text(found))
        print("\n".join(found["setting"]["tried"]))
        print(found["setting"]["chosen"])
    return 0


def _setting(cfg, budget: int, a: argparse.Namespace) -> dict[str, Any]:
    """What ``lorakit train --fit`` would choose for this run: the settings tried, the choice."""
    from .choose import choose

    tried: list[str] = []
    world = {"strategy": a.strategy, "world_size": a.world_size}
    try:
        chosen, p = choose(
            cfg, budget, target=a.target, world=a.world_size, report=tried.append, **world
        )
    except ValueError as e:
        return {"tried": tried, "chosen": f"lorakit train --fit: {e}"}
    keys = ("micro_batch_size", "reduce_memory", "checkpointing", "mlp_tile", "offload")
    setting = {k: getattr(chosen, k) for k in keys}
    return {"tried": tried, "chosen": f"lorakit train --fit would train with {setting}", **setting}


def _fit_text(found: dict[str, Any]) -> str:
    from .report import gib

    usable = found["budget"] * (1 - found["margin"])
    lines = [
        f"fits {gib(found['budget'])} per rank (peak <= {gib(usable)}, margin "
        f"{found['margin']:.0%}), searched with {found['plans']} plans:"
    ]
    if not found["micro_batch_size"] and not found["max_len"]:
        return lines[0] + "\n  nothing: even micro-batch 1 x 256 tokens does not fit"
    for key, what in (("at_micro_batch", "micro-batch"), ("at_max_len", "tokens per row")):
        p = found[key]
        value = found["micro_batch_size"] if key == "at_micro_batch" else found["max_len"]
        if p is None or not value:
            lines.append(f"  largest {what}: none fits")
            continue
        lines.append(
            f"  largest {what}: {value} (micro-batch {p.micro_batch_size} x {p.max_len} tokens, "
            f"peak {gib(p.peak)})"
        )
    return "\n".join(lines)

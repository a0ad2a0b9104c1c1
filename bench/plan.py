"""Planned training memory per GPU at 8B and 70B scale: lorakit next to full FT and PEFT LoRA.

Every row is one step of the real code path on fake tensors (``lorakit.planner.plan``, target
gpu: bf16 computed natively, foreach AdamW); PEFT's LoRA runs through the same planner
(``adapt=``), so the rows compare like with like. Batch 1 per rank, rank 16, all linear layers.

Then, per model, the longest rows at batch 1 that fit 24, 48 and 80 GiB (``planner.fit.longest``:
each answer n is checked, n fits and n + 256 does not, up to the model's context length).

    .venv/bin/python bench/plan.py        # MODELS=llama-3.1-8b,llama-2-70b SEQS=2048,8192 LONGEST=1
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

from lorakit.config import TrainConfig  # noqa: E402
from lorakit.planner import plan  # noqa: E402
from lorakit.planner.fit import MARGIN, longest  # noqa: E402
from lorakit.planner.report import GiB, plot  # noqa: E402
from lorakit.planner.shapes import load_config  # noqa: E402


def peft_lora(model):
    from peft import LoraConfig, get_peft_model

    # PEFT moves each new module to its base layer's device with .to(), which cannot swap a fake
    # parameter; the fake model is on one device already, so those moves are skipped (only here).
    to = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *a, **k: self
    try:
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    finally:
        torch.nn.Module.to = to


ROWS = [  # label, flat keys, strategy, adapt
    ("full FT", {"method": "full"}, "single", None),
    ("PEFT LoRA", {"method": "lora"}, "single", peft_lora),
    ("lorakit LoRA", {"method": "lora"}, "single", None),
    ("lorakit LoRA-FA", {"method": "lora_fa"}, "single", None),
    ("LoRA-FA + reduce", {"method": "lora_fa", "reduce_memory": True}, "single", None),
    (
        "LoRA-FA + reduce + ckpt",
        {"method": "lora_fa", "reduce_memory": True, "checkpointing": True},
        "single",
        None,
    ),
    ("QLoRA (nf4)", {"method": "lora", "quantize": "nf4"}, "single", None),
    (
        "QLoRA-FA + reduce",
        {"method": "lora_fa", "quantize": "nf4", "reduce_memory": True},
        "single",
        None,
    ),
    ("full FT, FSDP x8", {"method": "full"}, "fsdp", None),
    ("LoRA, FSDP x8", {"method": "lora"}, "fsdp", None),
    ("LoRA-FA + reduce, FSDP x8", {"method": "lora_fa", "reduce_memory": True}, "fsdp", None),
]


BUDGETS = (24, 48, 80)


def _longest_table(name: str) -> list[str]:
    context = load_config(name).max_position_embeddings
    lines = [
        f"## {name}, bf16, batch 1: the longest rows that fit (tokens; context {context})",
        "",
        "| row | " + " | ".join(f"{g} GiB" for g in BUDGETS) + " | plans | s |",
        "|---|" + "---:|" * (len(BUDGETS) + 2),
    ]
    budgets = [g * GiB for g in BUDGETS]
    for label, flat, strategy, adapt in ROWS:
        world = 8 if strategy == "fsdp" else 1
        cfg = TrainConfig.from_flat({"model": name, "dtype": "bfloat16", **flat})
        t0 = time.perf_counter()
        try:
            found = longest(
                cfg, budgets, strategy=strategy, world_size=world, adapt=adapt, label=label
            )
        except Exception as e:  # a row that cannot be planned says why
            lines.append(f"| {label} | error: {type(e).__name__}: {str(e)[:80]} |")
            continue
        cells = [f"{found['max_len'][b]:,}" if found["max_len"][b] else "-" for b in budgets]
        lines.append(
            f"| {label} | {' | '.join(cells)} | {found['plans']} | {time.perf_counter() - t0:.0f} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        f"A row fits when its peak is under {1 - MARGIN:.0%} of the budget; `-`: not even 256 "
        "tokens fit.",
        "",
    ]
    return lines


def main() -> None:
    models = os.environ.get("MODELS", "llama-3.1-8b,llama-2-70b").split(",")
    seqs = [int(s) for s in os.environ.get("SEQS", "2048,8192").split(",")]
    lines = [
        "# Planned training memory at scale",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"Planned on: {machine()}",
        "",
        "GiB per rank at the peak of a steady-state step; `saved` is what one forward keeps for "
        "backward. A row fits a GPU of 24 / 48 / 80 GiB when its peak is under 95 % of it.",
        "",
    ]
    shown = []
    for name in models:
        for seq in seqs:
            lines += [f"## {name}, bf16, batch 1 x {seq} tokens", ""]
            lines += [
                "| row | weights | trainable + grads + optimizer | saved | peak | fits | plan s |"
            ]
            lines += ["|---|---:|---:|---:|---:|---|---:|"]
            for label, flat, strategy, adapt in ROWS:
                world = 8 if strategy == "fsdp" else 1
                t0 = time.perf_counter()
                try:
                    p = plan(
                        model=name,
                        dtype="bfloat16",
                        batch_size=world,
                        max_len=seq,
                        strategy=strategy,
                        world_size=world,
                        adapt=adapt,
                        label=label,
                        **flat,
                    )
                except Exception as e:  # a row that cannot be planned says why
                    lines.append(
                        f"| {label} | error: {type(e).__name__}: {str(e)[:80]} | | | | | |"
                    )
                    print(lines[-1], flush=True)
                    continue
                parts = p.at_peak
                train = parts.get("trainable", 0) + p.gradients + parts.get("optimizer", 0)
                fits = "/".join(str(g) for g in (24, 48, 80) if p.peak <= g * GiB * 0.95) or "-"
                lines.append(
                    f"| {label} | {parts.get('weights', 0) / GiB:.2f} | {train / GiB:.2f} | "
                    f"{p.activations / GiB:.2f} | {p.peak / GiB:.2f} | {fits} | "
                    f"{time.perf_counter() - t0:.1f} |"
                )
                print(lines[-1], flush=True)
                if seq == seqs[0]:
                    shown.append(p)
            lines.append("")
        if os.environ.get("LONGEST", "1") == "1":
            lines += _longest_table(name)
    lines.append("Command: `.venv/bin/python bench/plan.py`")
    write("plan.md", "\n".join(lines) + "\n")
    plot(
        shown,
        Path(__file__).parent / "results" / "plan.png",
        budgets=(24 * GiB, 48 * GiB, 80 * GiB),
    )


if __name__ == "__main__":
    main()

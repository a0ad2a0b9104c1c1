"""Planned training memory per GPU at 8B and 70B scale: lorakit next to full FT and PEFT LoRA.

Every row is one step of the real code path on fake tensors (``lorakit.planner.plan``, target
gpu: bf16 computed natively, foreach AdamW); PEFT's LoRA runs through the same planner
(``adapt=``), so the rows compare like with like. Batch 1 per rank, rank 16, all linear layers.

Then, per model, the longest rows at batch 1 that fit 24, 48 and 80 GiB (``planner.fit.longest``:
each answer n is checked, n fits and n + 256 does not, up to the model's context length).

    .venv/bin/python bench/plan.py        # MODELS=llama-3.1-8b,llama-2-70b SEQS=2048,8192 LONGEST=1
    SECTION=moe .venv/bin/python bench/plan.py   # only the MoE / Gemma 3 section of plan.md
    SECTION=long .venv/bin/python bench/plan.py  # only the long-context section
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, splice, write  # noqa: E402

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


def peft_moe(model):
    """PEFT LoRA on every linear layer and, through ``target_parameters``, the experts."""
    from peft import LoraConfig, get_peft_model

    experts = ["experts.gate_up_proj", "experts.down_proj"]
    to = torch.nn.Module.to  # as in peft_lora
    torch.nn.Module.to = lambda self, *a, **k: self
    try:
        config = LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", target_parameters=experts
        )
        return get_peft_model(model, config)
    finally:
        torch.nn.Module.to = to


_EXPERTS = {"targets": ["all-linear", "experts"]}
MOE_ROWS = [  # label, flat keys, adapt
    ("PEFT LoRA, experts (target_parameters)", {"method": "lora"}, peft_moe),
    ("lorakit LoRA, all-linear (experts skipped)", {"method": "lora"}, None),
    ("lorakit LoRA, experts", {"method": "lora", **_EXPERTS}, None),
    ("lorakit LoRA-FA, experts", {"method": "lora_fa", **_EXPERTS}, None),
    ("LoRA-FA, experts + reduce", {"method": "lora_fa", "reduce_memory": True, **_EXPERTS}, None),
    (
        "LoRA-FA, experts + reduce + ckpt",
        {"method": "lora_fa", "reduce_memory": True, "checkpointing": True, **_EXPERTS},
        None,
    ),
]
DENSE_ROWS = [(label, flat, adapt) for label, flat, strategy, adapt in ROWS[1:6]]
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


def _row(name: str, seq: int, label: str, flat: dict, adapt, strategy="single") -> tuple:
    """(table line, plan or None) of one planned row."""
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
        return f"| {label} | error: {type(e).__name__}: {str(e)[:80]} | | | | | |", None
    parts = p.at_peak
    train = parts.get("trainable", 0) + p.gradients + parts.get("optimizer", 0)
    fits = "/".join(str(g) for g in (24, 48, 80) if p.peak <= g * GiB * 0.95) or "-"
    line = (
        f"| {label} | {parts.get('weights', 0) / GiB:.2f} | {train / GiB:.2f} | "
        f"{p.activations / GiB:.2f} | {p.peak / GiB:.2f} | {fits} | "
        f"{time.perf_counter() - t0:.1f} |"
    )
    return line, p


HEADER = [
    "| row | weights | trainable + grads + optimizer | saved | peak | fits | plan s |",
    "|---|---:|---:|---:|---:|---|---:|",
]
MOE_START, MOE_END = "<!-- moe: SECTION=moe bench/plan.py -->", "<!-- /moe -->"


def moe_section(seq: int = 2048) -> list[str]:
    """MoE experts (PEFT target_parameters beside lorakit's) and Gemma 3, at one length."""
    lines = [MOE_START, "", "## MoE experts and Gemma 3, bf16, batch 1 x 2048 tokens", ""]
    lines += [
        "MoE rows adapt every linear layer (r=16) and, where the row says so, both expert "
        "tensors of every layer: PEFT through `target_parameters` (its `all-linear` on "
        "transformers-5 MoE also adapts the router), lorakit through its grouped expert "
        "adapters (`--targets all-linear,experts`). lorakit plans an even routing (the saved "
        "bytes do not depend on it).",
        "",
    ]
    for name, rows in (
        ("qwen3-30b-a3b", MOE_ROWS),
        ("mixtral-8x7b", MOE_ROWS),
        ("gemma-3-4b", DENSE_ROWS),
    ):
        lines += [f"### {name}", "", *HEADER]
        for label, flat, adapt in rows:
            lines.append(_row(name, seq, label, flat, adapt)[0])
            print(lines[-1], flush=True)
        lines.append("")
    return [*lines, MOE_END]


LONG_START, LONG_END = "<!-- long: SECTION=long bench/plan.py -->", "<!-- /long -->"
_QV_MLP = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LONG = {"reduce_memory": True, "checkpointing": True, "offload": True}
LONG_ROWS = [  # label, flat keys, published figure it is set against
    (
        "QLoRA-FA + reduce + ckpt + offload + tile 4096, r=32 all linear, 78,592 tokens",
        {"method": "lora_fa", "quantize": "nf4", "rank": 32, "alpha": 64, "max_len": 78592}
        | _LONG
        | {"mlp_tile": 4096},
        "unsloth QLoRA, 24 GB: 78,475 tokens",
    ),
    (
        "QLoRA-FA + reduce + ckpt + offload + tile 16384, r=32 all linear, 342,784 tokens",
        {"method": "lora_fa", "quantize": "nf4", "rank": 32, "alpha": 64, "max_len": 342784}
        | _LONG
        | {"mlp_tile": 16384},
        "unsloth QLoRA, 80 GB: 342,733 tokens",
    ),
    (
        "LoRA r=8 (q, v, o, MLP) + reduce + ckpt + offload + tile 1024, 2 x 2,048",
        {"method": "lora", "rank": 8, "alpha": 16, "targets": _QV_MLP, "batch_size": 2}
        | _LONG
        | {"mlp_tile": 1024},
        "torchtune LoRA (compiled), same settings: 16.2 GiB",
    ),
    (
        "QLoRA r=8 (q, v, o, MLP) + reduce + ckpt + offload + tile 1024, 2 x 2,048",
        {"method": "lora", "rank": 8, "alpha": 16, "targets": _QV_MLP, "batch_size": 2}
        | {"quantize": "nf4"}
        | _LONG
        | {"mlp_tile": 1024},
        "torchtune QLoRA, same settings: 7.4 GiB",
    ),
]


def long_section() -> list[str]:
    """Llama-3.1-8B long-context rows beside the published figures they answer."""
    lines = [LONG_START, "", "## Long context on one GPU: llama-3.1-8b, bf16, batch 1", ""]
    lines += [
        "Each row is one plan (GiB; the peak is the largest phase's, validation included); "
        "`host` is the pinned host memory the offloaded checkpoints take. Published figures: "
        "unsloth's long-context blog table (Llama-3.1-8B QLoRA, r=32, all linear layers, "
        "offloaded checkpointing) and torchtune's README memory table (Llama-3.1-8B, batch 2 x "
        "2,048, activation checkpointing, r=8 on q, v, o and the MLP). This section and the MoE "
        "one were planned after the fused loss's chunk became sized by the vocabulary (512 "
        "tokens at 128,256); the 8B / 70B tables above used 1,024-token chunks, so their "
        "reduce rows' peaks are up to about 0.25 GiB above today's.",
        "",
        "| row | training step | validation | peak | host | fits | published |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for label, flat, published in LONG_ROWS:
        flat = {"batch_size": 1, "max_len": 2048, **flat}
        p = plan(model="llama-3.1-8b", dtype="bfloat16", label=label, **flat)
        fits = "/".join(str(g) for g in (24, 48, 80) if p.peak <= g * GiB * 0.95) or "-"
        step, val = p.phases["train_step"], p.phases["validation"]
        lines.append(
            f"| {label} | {step / GiB:.2f} | {val / GiB:.2f} | {p.peak / GiB:.2f} | "
            f"{p.host / GiB:.2f} | {fits} | {published} |"
        )
        print(lines[-1], flush=True)
    return [*lines, "", LONG_END]


def main() -> None:
    if os.environ.get("SECTION") == "long":
        splice("plan.md", long_section(), "Command: `")
        return
    if os.environ.get("SECTION") == "moe":  # regenerate that section of plan.md alone
        splice("plan.md", moe_section(), "Command: `")
        return
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
            lines += HEADER
            for label, flat, strategy, adapt in ROWS:
                line, p = _row(name, seq, label, flat, adapt, strategy)
                lines.append(line)
                print(line, flush=True)
                if p is not None and seq == seqs[0]:
                    shown.append(p)
            lines.append("")
        if os.environ.get("LONGEST", "1") == "1":
            lines += _longest_table(name)
    lines += moe_section()
    lines += long_section()
    lines.append("Command: `.venv/bin/python bench/plan.py`")
    write("plan.md", "\n".join(lines) + "\n")
    plot(
        shown,
        Path(__file__).parent / "results" / "plan.png",
        budgets=(24 * GiB, 48 * GiB, 80 * GiB),
    )


if __name__ == "__main__":
    main()

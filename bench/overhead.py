"""lorakit LoRA vs PEFT LoRA on the real SmolLM2-135M: saved activations and step time.

Batch 1, seq 512, r=16, alpha=32, all 7 projections, fp32 and bf16, in one run; both libraries'
default adapters (fp32 on the bf16 base), plus bf16-adapter reference rows. A step is
forward + backward + AdamW step. Saved activations are the unique storages autograd keeps for
backward, parameters and buffers excluded (lorakit.profile). Timed steps alternate between peers.
The table's machine line names the CPU, its bf16 / fp16 / AMX flags and the dtype lorakit's 16-bit
layers compute in on it (lorakit.hardware), below it the lorakit / PEFT step-time ratio per dtype.

    .venv/bin/python bench/overhead.py            # STEPS=5 BF16_STEPS=3 SEQ=512 to change
    .venv/bin/python bench/overhead.py --plot     # re-draw overhead.png from overhead.md
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    PROJECTIONS,
    RESULTS,
    Peer,
    env_flag,
    fresh,
    machine,
    mib,
    pyplot,
    run_interleaved,
    smollm2,
    splice,
    table_rows,
    write,
)

import lorakit as lk  # noqa: E402


def peers_for(base: torch.nn.Module, dtype: torch.dtype) -> list[Peer]:
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS)
    ours = lk.LoRAConfig(rank=16, alpha=32, targets=PROJECTIONS)
    peers = [
        Peer("PEFT LoRA", get_peft_model(fresh(base), peft_cfg)),
        Peer("lorakit LoRA", lk.inject(fresh(base), ours)),
    ]
    if dtype != torch.float32:
        # Both libraries default to fp32 adapters on a 16-bit base (fp32 master weights and
        # optimizer states). Reference rows (memory only, not timed) with bf16 adapters instead:
        # PEFT without its upcast (which also drops its fp32 copy of x), and lorakit with an
        # explicit adapter_dtype (the same saved bytes: lorakit never copies x either way).
        off = get_peft_model(fresh(base), peft_cfg, autocast_adapter_dtype=False)
        peers.append(Peer("PEFT LoRA, bf16 adapter (upcast off)", off, timed=False))
        bf16 = lk.inject(fresh(base), ours.replace(adapter_dtype="bfloat16"))
        peers.append(Peer("lorakit LoRA, bf16 adapter", bf16, timed=False))
    return peers


def plot(md: Path, out: Path) -> None:
    """Two panels from ``md``'s table: saved MiB per row, and each timed row's median step time
    relative to PEFT's in the same dtype (seconds written on the bars)."""
    plt = pyplot()
    rows = table_rows(md.read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [f"{r[0]}: {r[1]}" for r in rows]
    left.barh(names, [float(r[3]) for r in rows], color="tab:blue")
    left.set_xlabel("saved for backward, MiB")
    left.invert_yaxis()
    timed = [r for r in rows if r[5] != "-"]
    ratios = [float(r[6].rstrip("x")) for r in timed]
    bars = right.barh([f"{r[0]}: {r[1]}" for r in timed], ratios)
    for bar, r in zip(bars, timed, strict=True):
        bar.set_color("tab:orange" if r[1].startswith("lorakit") else "tab:gray")
        y = bar.get_y() + bar.get_height() / 2
        right.text(bar.get_width(), y, f" {r[6]} ({r[5]} s)", va="center")
    right.axvline(1.0, color="k", ls="--", lw=1, zorder=0)
    right.set_xlim(0, 1.75)
    right.set_xlabel("median step time vs PEFT, same dtype")
    right.invert_yaxis()
    fig.suptitle("lorakit LoRA vs PEFT LoRA, SmolLM2-135M, batch 1, seq 512, r=16, 7 projections")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


COMPILE_START, COMPILE_END = (
    "<!-- compile: SECTION=compile bench/overhead.py -->",
    "<!-- /compile -->",
)


def compile_section(seq: int = 512, steps: int = 3) -> list[str]:
    """``--compile`` (torch.compile, inductor) against eager and PEFT, fp32, step time."""
    import time

    from peft import LoraConfig, get_peft_model

    base = smollm2(torch.float32)
    ours = lk.LoRAConfig(method="lora", rank=16, alpha=32, targets=PROJECTIONS)

    def adapted(method: str, reduce: bool, compiled: bool) -> torch.nn.Module:
        model = lk.inject(fresh(base), ours.replace(method=method))
        if reduce:
            lk.reduce_activation_memory(model)
        if compiled:
            model.compile()
        return model

    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS)
    peers = [Peer("PEFT LoRA", get_peft_model(fresh(base), peft_cfg))]
    for method, reduce in (("lora", False), ("lora_fa", True)):
        label = "lorakit LoRA" if method == "lora" else "lorakit LoRA-FA + reduce"
        peers.append(Peer(f"{label}, eager", adapted(method, reduce, False)))
        peers.append(Peer(f"{label}, --compile", adapted(method, reduce, True)))
    ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    run_interleaved(peers, ids, steps=steps, warmup=2)  # the first steps compile
    total = time.perf_counter() - t0
    ref = peers[0]
    lines = [
        COMPILE_START,
        "",
        f"## `--compile` (torch.compile, inductor), fp32, seq {seq}",
        "",
        f"Same model and adapters as above; {steps} timed steps per row after two warm-up steps "
        f"(which compile), round-robin; the whole section took {total:.0f} s. No graph break in "
        "an adapted decoder block (tests/test_compile.py), the same loss and gradients as eager.",
        "",
        "| peer | median step s | time vs PEFT |",
        "|---|---:|---:|",
    ]
    lines += [f"| {p.name} | {p.median:.3f} | {p.median / ref.median:.2f}x |" for p in peers]
    return [*lines, "", COMPILE_END]


def main() -> None:
    if os.environ.get("SECTION") == "compile":
        splice("overhead.md", compile_section(), "Command: `")
        return
    if "--plot" in sys.argv:  # re-draw the figure from the committed table
        plot(RESULTS / "overhead.md", RESULTS / "overhead.png")
        return
    torch.manual_seed(0)
    seq = env_flag("SEQ", 512)
    ids = torch.randint(0, 49152, (1, seq))  # content does not change memory or time
    rows, ratios = [], []
    for dtype, steps in (
        (torch.float32, env_flag("STEPS", 5)),
        (torch.bfloat16, env_flag("BF16_STEPS", 3)),
    ):
        name = str(dtype).removeprefix("torch.")
        print(f"== {name}", flush=True)
        base = smollm2(dtype)
        peers = peers_for(base, dtype)
        run_interleaved(peers, ids, steps=steps)
        ref = peers[0]
        for p in peers:
            timed = p.timed and p.times
            rows.append(
                f"| {name} | {p.name} | {p.trainable_count:,} | {mib(p.saved_bytes)} | "
                f"{p.saved_bytes / ref.saved_bytes:.2f}x | "
                + (f"{p.median:.2f} | {p.median / ref.median:.2f}x |" if timed else "- | - |")
            )
        ours = next(p for p in peers if p.name == "lorakit LoRA")
        ratios.append(
            f"- {name}: lorakit / PEFT median step time {ours.median:.2f} / {ref.median:.2f} s "
            f"= **{ours.median / ref.median:.2f}x**"
        )
        del base, peers
    table = "\n".join(
        [
            "# lorakit LoRA vs PEFT LoRA: per-step overhead",
            "",
            f"SmolLM2-135M (real weights), batch 1, seq {seq}, r=16, alpha=32, all 7 projections; "
            "step = forward + backward + AdamW. Saved = unique storages kept for backward, "
            "parameters/buffers excluded. Ratios are against PEFT LoRA in the same run.",
            "",
            f"Machine: {machine()}.",
            "",
            "| dtype | peer | trainable params | saved MiB | saved vs PEFT | median step s | time vs PEFT |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *ratios,
            "",
            "Command: `.venv/bin/python bench/overhead.py`",
            "",
        ]
    )
    print(table)
    plot(write("overhead.md", table), RESULTS / "overhead.png")


if __name__ == "__main__":
    main()

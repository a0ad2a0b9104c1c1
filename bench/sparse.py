"""Sparse fine-tuning cost: LoRS (both gradient modes) vs SQFT, SPP (with and without activation
checkpointing), plain LoRA and the LoRS authors' reference LorsFn, on SmolLM2-135M pruned with
Wanda (2:4 and 50 %).

Batch 1, fp32, the 7 projections adapted, alpha 32. Saved = unique storages autograd keeps for
backward, parameters/buffers excluded; weight-sized extra = the part of it whose storages have as
many elements as an adapted weight (dense masked deltas, masks, W' copies); total = weights +
grads + AdamW states of the trainables + saved. Step time (forward + backward + AdamW) is the
median of round-robin steps after one warm-up step (the reference's profiler divides the first
steps' time including warm-up; here warm-up is never timed). Timing runs at 2:4, seq 512, r=16;
the other settings report memory. The reference LorsFn is loaded from $LORS_REF (default
/tmp/lors_ref/lors_autograd.py, fetched from the LoRS authors' repository, not committed); its
row is omitted when absent.

    .venv/bin/python bench/sparse.py        # STEPS=5 to change; --plot re-draws sparse.png from sparse.md
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import sparse_baselines as sb  # noqa: E402
from common import (  # noqa: E402
    PROJECTIONS,
    RESULTS,
    Peer,
    machine,
    pyplot,
    run_interleaved,
    smollm2,
    static_bytes,
    table_rows,
    write,
)

import lorakit as lk  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.profile import MiB, SavedTensors, _param_storages  # noqa: E402


def rows(rank: int) -> dict:
    def lors(mode):
        cfg = lk.LoRAConfig(
            method="lors", rank=rank, alpha=32, targets=PROJECTIONS, sparse_grad=mode
        )
        return lambda m: lk.inject(m, cfg)

    out = {
        "lorakit LoRS exact": lors("exact"),
        "lorakit LoRS straight-through": lors("straight_through"),
        "SQFT": lambda m: sb.replace(m, PROJECTIONS, lambda b: sb.SQFTLinear(b, rank, 32)),
        "SQFT-gc": lambda m: sb.replace(
            m, PROJECTIONS, lambda b: sb.SQFTLinear(b, rank, 32, gc=True)
        ),
        "SPP": lambda m: sb.replace(m, PROJECTIONS, sb.SPPLinear),
        "SPP-gc": lambda m: sb.replace(m, PROJECTIONS, lambda b: sb.SPPLinear(b, gc=True)),
        "lorakit LoRA (not sparse after merge)": lambda m: lk.inject(
            m, lk.LoRAConfig(method="lora", rank=rank, alpha=32, targets=PROJECTIONS)
        ),
    }
    if sb.REFERENCE is not None:
        out["reference LorsFn (LoRS authors)"] = lambda m: sb.replace(
            m, PROJECTIONS, lambda b: sb.ReferenceLoRSLinear(b, rank, 32)
        )
    return out


def saved_split(model, ids) -> tuple[int, int]:
    """(saved bytes, of which weight-sized) for one forward with labels."""
    sizes = {
        m.weight.numel()
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in PROJECTIONS and hasattr(m, "weight")
    }
    sizes |= {
        m.base.weight.numel()
        for m in model.modules()
        if isinstance(getattr(m, "base", None), torch.nn.Linear)
    }
    saved = SavedTensors(exclude=_param_storages([model]))
    extra = 0

    def pack(t):
        nonlocal extra
        before = len(saved.storages)
        alias = saved.pack(t)
        if (
            len(saved.storages) > before
            and t.untyped_storage().nbytes() // t.element_size() in sizes
        ):
            extra += t.untyped_storage().nbytes()
        return alias

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
    finally:
        saved.release()
    del loss
    return saved.bytes, extra


def pruned_base(sparsity: str | float, tok) -> torch.nn.Module:
    model = smollm2(torch.float32)
    lk.prune(model, "wanda", sparsity, tokenizer=tok, n_samples=16, seq_len=256, progress=False)
    return model


def plot(md: Path, out: Path) -> None:
    """Two panels from ``md``'s table at the timed setting (2:4, seq 512, r 16): saved bytes per
    row (the weight-sized part stacked on top) and median step time."""
    plt = pyplot()
    rows = [r for r in table_rows(md.read_text()) if r[:3] == ["2:4", "512", "16"]]
    names = [textwrap.fill(r[3], 26) for r in rows]
    extra = [float(r[6]) for r in rows]
    rest = [float(r[4]) - e for r, e in zip(rows, extra, strict=True)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    left.barh(names, rest, color="tab:blue", label="activations")
    left.barh(names, extra, left=rest, color="tab:red", label="weight-sized (masks, deltas, W')")
    left.set_xlabel("saved for backward, MiB")
    left.legend(fontsize=8, loc="lower right")
    left.invert_yaxis()
    times = [float(r[8]) for r in rows]  # every row of this setting is timed
    right.barh(names, times, color="tab:gray")
    ref = [t for r, t in zip(rows, times, strict=True) if r[3].startswith("reference")]
    if ref:
        right.axvline(ref[0], color="k", ls="--", lw=1, label=f"reference LorsFn {ref[0]:.2f} s")
        right.legend(fontsize=8, loc="lower right")
    right.set_xlabel("median step s (forward + backward + AdamW)")
    fig.suptitle("SmolLM2-135M pruned 2:4 (Wanda), fp32, batch 1, seq 512, r=16")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    if "--plot" in sys.argv:  # re-draw the figure from the committed table
        plot(RESULTS / "sparse.md", RESULTS / "sparse.png")
        return
    steps = int(os.environ.get("STEPS", 5))
    _, tok = load_model("smollm2-135m")
    lines, checks = [], []
    timed: dict[str, float] = {}
    for sparsity in ("2:4", 0.5):
        base = pruned_base(sparsity, tok)
        masks = {n: p == 0 for n, p in base.named_parameters() if n.endswith(".weight")}
        for seq in (512, 1024):
            for rank in (16, 64):
                ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(0))
                time_it = sparsity == "2:4" and seq == 512 and rank == 16
                print(f"== {sparsity} seq {seq} r {rank}", flush=True)
                built = {
                    name: make(copy.deepcopy(base)).train() for name, make in rows(rank).items()
                }
                mem = {n: saved_split(m, ids) for n, m in built.items()}
                static = {n: sum(static_bytes(m)) for n, m in built.items()}
                if time_it:
                    peers = [Peer(n, m) for n, m in built.items()]
                    run_interleaved(peers, ids, steps=steps)
                    timed = {p.name: p.median for p in peers}
                    for name in ("lorakit LoRS exact", "lorakit LoRS straight-through"):
                        model = lk.merge(built[name])
                        params = dict(model.named_parameters())
                        kept = all(
                            bool((params[k][m] == 0).all()) for k, m in masks.items() if k in params
                        )
                        checks.append(
                            f"- {name}: after {steps + 1} steps and merge, every pruned zero is still zero: {kept}"
                        )
                ref = mem["lorakit LoRA (not sparse after merge)"][0]
                for name, (saved, extra) in mem.items():
                    t = timed.get(name) if time_it else None
                    tcell = f"{t:.2f}" if t else "-"
                    lines.append(
                        f"| {sparsity} | {seq} | {rank} | {name} | {saved / MiB:.1f} | "
                        f"{saved / ref:.2f}x | {extra / MiB:.1f} | {(static[name] + saved) / MiB:.0f} | {tcell} |"
                    )
                    print(lines[-1], flush=True)
                del built
                gc.collect()
        del base
        gc.collect()

    lora_t = timed.get("lorakit LoRA (not sparse after merge)")
    ref_t = timed.get("reference LorsFn (LoRS authors)")
    verdicts = []
    if timed:
        ex, st = timed["lorakit LoRS exact"], timed["lorakit LoRS straight-through"]
        verdicts.append(
            f"- exact-mode step time vs plain LoRA: {ex / lora_t:.2f}x (target <= 1.5x)"
        )
        if ref_t:
            verdicts.append(
                f"- straight-through step time vs the reference LorsFn: {st / ref_t:.2f}x (target <= 1.0x)"
            )
        for base_row in ("SQFT-gc", "SPP-gc"):
            verdicts.append(
                f"- vs {base_row}: exact {ex / timed[base_row]:.2f}x, straight-through {st / timed[base_row]:.2f}x (target < 1)"
            )
    text = "\n".join(
        [
            "# Sparse fine-tuning: LoRS vs SQFT, SPP, LoRA and the reference LoRS code",
            "",
            __doc__.split("\n\n")[1].replace("\n", " "),
            "",
            f"Machine: {machine()}. Wanda calibration: 16 shakespeare windows of 256 tokens.",
            "",
            "| sparsity | seq | r | row | saved MiB | saved vs LoRA | weight-sized extra MiB | total MiB | median step s |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
            *lines,
            "",
            *verdicts,
            *checks,
            "",
            "Command: `.venv/bin/python bench/sparse.py`",
            "",
        ]
    )
    print(text)
    plot(write("sparse.md", text), RESULTS / "sparse.png")


if __name__ == "__main__":
    main()

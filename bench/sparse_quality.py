"""Quality of sparsity-preserving fine-tuning: SmolLM2-135M pruned 2:4 with Wanda, then recovered.

Perplexity on held-out shakespeare (the 4 test plays, windows of 256 tokens) for the dense model,
the pruned model, and the pruned model after the same fine-tuning budget with each method:
SQFT (masked LoRA: the same masked forward and true gradient as LoRS exact, with PEFT's
alpha/r scaling; it differs from LoRS in what it keeps for backward), LoRS exact gradients
(alpha/sqrt(r), the LoRS scripts' scaling), LoRS straight-through (the paper's), LoRS exact with
the paper's gradient-SVD init, SPP, and plain LoRA (not sparse after merging; measured
unmerged). Every row trains r=16 on all 7 projections with AdamW, cosine schedule, the same
batches in the same order (shakespeare train windows). Then rotten-tomatoes: zero-shot accuracy
of the pruned model and after a LoRS fine-tune at the demo's budget (test split).

    .venv/bin/python bench/sparse_quality.py     # STEPS=40 BATCH=2 RT=1 ROWS=LoRS,SPP to change; --plot re-draws the PNG
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PROJECTIONS, RESULTS, machine, pyplot, smollm2, table_rows, write  # noqa: E402
from sparse_baselines import SPPLinear, SQFTLinear, replace  # noqa: E402
from sparse_baselines import merge as merge_baseline  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit import data  # noqa: E402
from lorakit.classify import classify  # noqa: E402
from lorakit.evaluate import accuracy, perplexity  # noqa: E402
from lorakit.models import load_model  # noqa: E402

SEQ = 256
CALIBRATION = 32  # Wanda calibration windows of SEQ tokens (as in `lorakit demo --sparse`)


def lr_at(step: int, steps: int, peak: float, warm: float = 0.06) -> float:
    w = max(1, int(warm * steps))
    if step < w:
        return peak * (step + 1) / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def finetune(model, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """The shared budget: `steps` AdamW steps of `batch` windows; returns seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = order[[(step * batch + i) % len(order) for i in range(batch)]]
        ids = blocks[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            print(f"    step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    return time.perf_counter() - t0


def zeros_kept(model, masks: dict[str, torch.Tensor]) -> bool:
    weights = dict(model.named_parameters())
    return all(bool((weights[n][m] == 0).all()) for n, m in masks.items())


def lors(sparse_grad: str, init: str = "kaiming"):
    def build(model, train_blocks):
        cfg = lk.LoRAConfig(
            method="lors", rank=16, alpha=32, targets=PROJECTIONS, sparse_grad=sparse_grad
        )
        lk.inject(model, cfg)
        if init == "gradient_svd":
            from lorakit import gradient_svd_init

            batches = [train_blocks[i : i + 2] for i in range(0, 16, 2)]
            gradient_svd_init(model, lambda m, b: m(input_ids=b, labels=b).loss / 8, batches)
        return model

    return build


def lora(model, train_blocks):
    return lk.inject(model, lk.LoRAConfig(method="lora", rank=16, alpha=32, targets=PROJECTIONS))


def spp(model, train_blocks):
    return replace(model, PROJECTIONS, SPPLinear)


def sqft(model, train_blocks):
    return replace(model, PROJECTIONS, lambda b: SQFTLinear(b, 16, 32))


ROWS = {
    "SPP": spp,
    "SQFT (masked LoRA, scaling alpha/r)": sqft,
    "LoRS exact (scaling alpha/sqrt(r))": lors("exact"),
    "LoRS straight-through": lors("straight_through"),
    "LoRS exact + gradient-SVD init": lors("exact", "gradient_svd"),
    "dense + LoRA (reference: the same budget without pruning)": lora,
    "LoRA (unmasked; not sparse after merge)": lora,
}


def rotten_tomatoes(pruned, tok, steps: int) -> list[str]:
    from lorakit.classify import classification_prompt
    from lorakit.config import TrainConfig
    from lorakit.demo import DEMO
    from lorakit.train import train

    test = data.load_records("rotten-tomatoes", "test")
    template, words = classification_prompt(
        tok, data.label_names("rotten-tomatoes"), DEMO["prompt"]
    )
    prompts = [template.replace("{text}", r["text"]) for r in test]
    labels = [r["label"] for r in test]
    model = copy.deepcopy(pruned)
    zero_shot = accuracy(classify(model, tok, prompts, words), labels)
    print(f"  RT zero-shot (pruned): {zero_shot:.1%}", flush=True)
    cfg = TrainConfig.from_flat(dict(
        method="lors", rank=DEMO["rank"], alpha=DEMO["alpha"], max_steps=steps,
        batch_size=DEMO["batch_size"], lr=DEMO["lr"], max_len=DEMO["max_len"],
        prompt=DEMO["prompt"], eval_examples=64, save_every=0, progress=False,
        output=tempfile.mkdtemp(prefix="lorakit-sq-"),
    ))  # fmt: skip
    summary = train(cfg, model=model, tokenizer=tok)["summary"]
    tuned = accuracy(classify(model, tok, prompts, words), labels)
    lk.merge(model)
    print(f"  RT LoRS: {tuned:.1%}", flush=True)
    return [
        f"| pruned 2:4, zero-shot | {zero_shot:.1%} | - |",
        f"| pruned 2:4 + LoRS ({steps} steps of {DEMO['batch_size']}) | {tuned:.1%} | "
        f"{summary['time_s']:.0f} |",
    ]


def plot(md: Path, out: Path) -> None:
    """Held-out perplexity per row of the perplexity table in ``md``, as horizontal bars."""
    plt = pyplot()
    rows = [r for r in table_rows(md.read_text()) if len(r) == 5]
    dense = next(float(r[1]) for r in rows if r[0] == "dense")
    pruned = next(float(r[1]) for r in rows if r[0].startswith("Wanda"))
    rows = [r for r in rows if r[0] != "dense" and not r[0].startswith("Wanda")]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    colors = ["tab:green" if r[3].startswith("yes") else "tab:gray" for r in rows]
    names = [textwrap.fill(r[0], 34) for r in rows]
    ax.barh(names, [float(r[1]) for r in rows], color=colors)
    ax.axvline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.1f}")
    ax.axvline(pruned, color="tab:red", ls="--", lw=1, label=f"Wanda 2:4 {pruned:.1f}")
    ax.invert_yaxis()
    ax.set_xlabel("held-out perplexity (lower is better); green rows stay 2:4 after merging")
    ax.set_title("SmolLM2-135M pruned 2:4, same fine-tuning budget per row")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    if "--plot" in sys.argv:  # re-draw the figure from the committed table
        plot(RESULTS / "sparse_quality.md", RESULTS / "sparse_quality.png")
        return
    steps = int(os.environ.get("STEPS", 40))
    batch = int(os.environ.get("BATCH", 2))
    lr = float(os.environ.get("LR", 1e-3))
    only = [r for r in os.environ.get("ROWS", "").split(",") if r]
    _, tok = load_model("smollm2-135m")
    train_blocks = data.lm_blocks(data.load_records("shakespeare", "train"), tok, SEQ)
    held_out = data.lm_blocks(data.load_records("shakespeare", "test"), tok, SEQ)[:32]

    dense_model = smollm2(torch.float32).eval()
    dense = perplexity(dense_model, held_out)
    print(f"dense ppl {dense:.3f}", flush=True)
    pruned_model = copy.deepcopy(dense_model)
    lk.prune(pruned_model, "wanda", "2:4", tokenizer=tok, n_samples=CALIBRATION, seq_len=SEQ)
    masks = {n: p == 0 for n, p in pruned_model.named_parameters() if (p == 0).any()}
    pruned = perplexity(pruned_model, held_out)
    print(f"pruned ppl {pruned:.3f}", flush=True)

    lines = [
        f"| dense | {dense:.2f} | - | - | - |",
        f"| Wanda 2:4, no fine-tuning | {pruned:.2f} | 0 % | yes | - |",
    ]
    for name, build in ROWS.items():
        if only and not any(o in name for o in only):
            continue
        print(f"== {name}", flush=True)
        torch.manual_seed(0)
        start = dense_model if name.startswith("dense") else pruned_model
        model = build(copy.deepcopy(start), train_blocks)
        seconds = finetune(model, train_blocks, steps, batch, lr, seed=0)
        ppl = perplexity(model, held_out)
        recovered = (pruned - ppl) / (pruned - dense)
        if name.startswith("dense"):
            sparse = "- (dense)"
        elif "LoRA (" not in name:
            lk.merge(model) if "LoRS" in name else merge_baseline(model)
            merged_ppl = perplexity(model, held_out)
            sparse = "yes" if zeros_kept(model, masks) else "NO"
            sparse += f" (merged ppl {merged_ppl:.2f})"
        else:
            lk.merge(model)
            sparse = "no" if not zeros_kept(model, masks) else "yes"
        lines.append(f"| {name} | {ppl:.2f} | {recovered:.0%} | {sparse} | {seconds:.0f} |")
        print(lines[-1], flush=True)
        del model
    rt = rotten_tomatoes(pruned_model, tok, steps=24) if os.environ.get("RT", "1") == "1" else []

    text = "\n".join(
        [
            "# Recovering a 2:4-pruned SmolLM2 with sparsity-preserving fine-tuning",
            "",
            __doc__.split("\n\n")[1].replace("\n", " "),
            "",
            f"Machine: {machine()}. Budget per row: {steps} steps x {batch} windows x {SEQ} "
            f"tokens ({steps * batch * SEQ:,} tokens), lr {lr:g}, r=16, alpha=32. Wanda "
            f"calibration: {CALIBRATION} shakespeare-train windows of {SEQ} tokens. Held-out: "
            f"{len(held_out)} windows of the test plays.",
            "",
            "| model | held-out ppl | gap recovered | zeros kept after merge | train s |",
            "|---|---:|---:|---|---:|",
            *lines,
            "",
            "Gap recovered = (pruned ppl - ppl) / (pruned ppl - dense ppl).",
            "",
            "## rotten-tomatoes on the pruned model (test split, 1,057 reviews)",
            "",
            "| model | accuracy | train s |",
            "|---|---:|---:|",
            *rt,
            "",
            "Command: `.venv/bin/python bench/sparse_quality.py`",
            "",
        ]
    )
    print(text)
    plot(write("sparse_quality.md", text), RESULTS / "sparse_quality.png")


if __name__ == "__main__":
    main()

"""``lorakit demo``: the main job on the embedded model and data, in a few minutes on 2 CPU cores.

SmolLM2-135M-Instruct, rotten-tomatoes sentiment: zero-shot accuracy on the test split, a LoRA
fine-tune on the train split, accuracy again, the adapter saved in PEFT's format, the model merged
into plain layers, and a check that the merged model makes the same predictions.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import data
from .classify import classification_prompt, classify
from .config import TrainConfig
from .evaluate import accuracy
from .fileio import save_pretrained
from .inject import merge
from .models import load_model
from .train import train

# Chosen so the whole demo fits in ~5 minutes on 2 CPU cores (see README for the measured run).
# The short plain prompt costs ~44 tokens per review instead of ~71 with SmolLM2's chat template.
MERGE_CHECK = 200
DEMO = {
    "max_steps": 24,
    "batch_size": 16,
    "lr": 2e-3,
    "rank": 16,
    "alpha": 32.0,
    "max_len": 96,
    "prompt": "plain",
}


def run_demo(
    output: str = "runs/demo",
    max_steps: int | None = None,
    seed: int = 0,
    method: str = "lora",
    quantize: str = "none",
) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the output to the demo's own lines
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    label = {"lora": "LoRA", "lora_fa": "LoRA-FA"}.get(method, method)
    base = "" if quantize == "none" else f" ({quantize} 4-bit base)"
    print(
        f"lorakit demo: SmolLM2-135M-Instruct{base} + {label} on rotten-tomatoes sentiment\n",
        flush=True,
    )
    model, tok = load_model("smollm2-135m", quantize=None if quantize == "none" else quantize)
    test = data.load_records("rotten-tomatoes", "test")
    template, words = classification_prompt(
        tok, data.label_names("rotten-tomatoes"), DEMO["prompt"]
    )
    prompts = [template.replace("{text}", r["text"]) for r in test]
    labels = [r["label"] for r in test]

    t = time.perf_counter()
    zero_shot = accuracy(classify(model, tok, prompts, words), labels)
    print(
        f"zero-shot accuracy on {len(test)} test reviews: {zero_shot:.1%} ({time.perf_counter() - t:.0f} s)",
        flush=True,
    )

    run = {"model": "smollm2-135m", "data": "rotten-tomatoes", "method": method, "seed": seed}
    run["quantize"] = quantize
    run |= {"eval_examples": 64, "save_every": 0, "output": output}
    cfg = TrainConfig.from_flat({**DEMO, **run, "max_steps": max_steps or DEMO["max_steps"]})
    result = train(cfg, model=model, tokenizer=tok, overwrite=True)
    summary = result["summary"]

    t = time.perf_counter()
    tuned_preds = classify(model, tok, prompts, words)
    tuned = accuracy(tuned_preds, labels)
    print(f"fine-tuned accuracy: {tuned:.1%} ({time.perf_counter() - t:.0f} s)", flush=True)

    merge(model)
    kinds = {type(m).__name__ for m in model.modules()}
    n_check = min(MERGE_CHECK, len(prompts))  # a subset keeps the demo within ~5 minutes
    merged_preds = classify(model, tok, prompts[:n_check], words)
    agree = sum(a == b for a, b in zip(merged_preds, tuned_preds[:n_check], strict=True)) / n_check
    merged_dir = Path(output) / "merged"
    save_pretrained(merged_dir, model, tok)  # 0644 files, as adapters

    rows = [
        ("zero-shot accuracy", f"{zero_shot:.1%}"),
        (f"{label} fine-tuned accuracy", f"{tuned:.1%}"),
        (
            "merged model",
            f"{agree:.1%} same predictions as unmerged on the first {n_check} test reviews",
        ),
        ("merged layers", "plain nn.Linear" if "AdaptedLayer" not in kinds else "NOT MERGED"),
        *_training_rows(summary),
        ("adapter (PEFT format)", str(Path(output) / "adapter")),
        ("merged model folder", str(merged_dir)),
        ("loss curve", str(Path(output) / "loss.png")),
        ("total time", f"{time.perf_counter() - t0:.0f} s"),
    ]
    _print_rows(rows)
    return 0 if agree == 1.0 and "AdaptedLayer" not in kinds else 1


# The sparse story: chosen so it runs in a few minutes on 2 CPU cores.
SPARSE_DEMO = {
    "sparsity": "2:4",
    "calibration": 32,  # Wanda calibration windows of `max_len` tokens (shakespeare train)
    "max_steps": 40,
    "batch_size": 2,
    "max_len": 256,
    "lr": 1e-3,
    "rank": 16,
    "alpha": 32.0,
    "eval_windows": 24,  # held-out shakespeare windows of `max_len` tokens for perplexity
}


def run_sparse_demo(output: str = "runs/demo-sparse", max_steps: int | None = None, seed: int = 0):
    """Prune SmolLM2 to 2:4 with Wanda, show the perplexity drop, fine-tune with LoRS, show the
    recovery, merge, and verify that every pruned weight is still zero and 2:4 holds."""
    from transformers.utils import logging as hf_logging

    from .evaluate import perplexity

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    cfg_d = SPARSE_DEMO
    print(
        "lorakit demo --sparse: SmolLM2-135M-Instruct, Wanda 2:4 pruning, LoRS fine-tuning on "
        "shakespeare\n",
        flush=True,
    )
    model, tok = load_model("smollm2-135m")
    held_out = data.lm_blocks(data.load_records("shakespeare", "test"), tok, cfg_d["max_len"])
    held_out = held_out[: cfg_d["eval_windows"]]
    dense = perplexity(model, held_out)
    print(f"dense perplexity on {len(held_out)} held-out windows: {dense:.2f}", flush=True)

    zeros, what = _wanda(model, tok, cfg_d)
    pruned = perplexity(model, held_out)
    print(f"{what}; perplexity {pruned:.2f}", flush=True)

    train_keys = ("rank", "alpha", "max_steps", "batch_size", "lr", "max_len")
    run = {"model": "smollm2-135m", "data": "shakespeare", "method": "lors", "seed": seed}
    run |= {"eval_examples": cfg_d["eval_windows"], "save_every": 0, "output": output}
    run |= {k: cfg_d[k] for k in train_keys} | {"max_steps": max_steps or cfg_d["max_steps"]}
    cfg = TrainConfig.from_flat(run)
    summary = train(cfg, model=model, tokenizer=tok, overwrite=True)["summary"]
    tuned = perplexity(model, held_out)
    recovered = (pruned - tuned) / (pruned - dense) if pruned > dense else float("nan")
    print(f"LoRS fine-tuned perplexity: {tuned:.2f} ({recovered:.0%} of the gap)", flush=True)

    merge(model)
    layers = [(module, zeros[name]) for name, module in model.named_modules() if name in zeros]
    kept = all(bool((m.weight[z] == 0).all()) for m, z in layers)
    two_four = all(bool(((m.weight.reshape(-1, 4) != 0).sum(-1) <= 2).all()) for m, _ in layers)
    merged = perplexity(model, held_out)
    merged_dir = Path(output) / "merged"
    save_pretrained(merged_dir, model, tok)  # 0644 files, as adapters
    kinds = {type(m).__name__ for m in model.modules()}
    rows = [
        ("dense perplexity", f"{dense:.2f}"),
        (f"pruned ({cfg_d['sparsity']}, Wanda)", f"{pruned:.2f}"),
        ("LoRS fine-tuned", f"{tuned:.2f} ({recovered:.0%} of the gap recovered)"),
        ("merged", f"{merged:.2f} (plain nn.Linear: {'AdaptedLayer' not in kinds})"),
        ("pruned zeros after merge", "all still zero" if kept else "SOME CHANGED"),
        ("2:4 pattern after merge", "holds in every layer" if two_four else "BROKEN"),
        (
            "training",
            f"{summary['steps']} steps of {cfg.batch_size}x{cfg.max_len} tokens, "
            f"{summary['time_s']:.0f} s",
        ),
        ("merged model folder", str(merged_dir)),
        ("total time", f"{time.perf_counter() - t0:.0f} s"),
    ]
    _print_rows(rows)
    return 0 if kept and two_four and "AdaptedLayer" not in kinds else 1


def _wanda(model, tok, cfg_d) -> tuple[dict[str, torch.Tensor], str]:
    """Prune to the demo's sparsity with Wanda: each pruned layer's zero pattern, and a line
    saying what was done."""
    from .prune import prune

    t = time.perf_counter()
    achieved = prune(
        model,
        "wanda",
        cfg_d["sparsity"],
        tokenizer=tok,
        n_samples=cfg_d["calibration"],
        seq_len=cfg_d["max_len"],
    )
    mean_sp = sum(achieved.values()) / len(achieved)
    what = (
        f"Wanda {cfg_d['sparsity']}: {len(achieved)} layers at {mean_sp:.1%} zeros "
        f"({time.perf_counter() - t:.0f} s)"
    )
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if n in achieved}
    return zeros, what


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


def _training_rows(summary: dict) -> list[tuple[str, str]]:
    share = 100 * summary["trainable_params"] / summary["total_params"]
    return [
        ("trainable params", f"{summary['trainable_params']:,} ({share:.2f} %)"),
        (
            "training",
            f"{summary['steps']} steps, {summary['time_s']:.0f} s, "
            f"{summary['tokens_per_s']:.0f} tok/s",
        ),
        ("peak memory", f"{summary['peak_memory_mib']:.0f} MiB"),
    ]

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
from .evaluate import accuracy, classify
from .inject import merge
from .models import load_model
from .train import TrainConfig, classification_prompt, train

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
    output: str = "runs/demo", max_steps: int | None = None, seed: int = 0, method: str = "lora"
) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the output to the demo's own lines
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    label = {"lora": "LoRA", "lora_fa": "LoRA-FA"}.get(method, method)
    print(
        f"lorakit demo: SmolLM2-135M-Instruct + {label} on rotten-tomatoes sentiment\n", flush=True
    )
    model, tok = load_model("smollm2-135m")
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

    cfg = TrainConfig(
        model="smollm2-135m",
        data="rotten-tomatoes",
        method=method,
        rank=DEMO["rank"],
        alpha=DEMO["alpha"],
        max_steps=max_steps or DEMO["max_steps"],
        batch_size=DEMO["batch_size"],
        lr=DEMO["lr"],
        max_len=DEMO["max_len"],
        prompt=DEMO["prompt"],
        seed=seed,
        eval_examples=64,
        save_every=0,
        output=output,
    )
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
    model.save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)

    rows = [
        ("zero-shot accuracy", f"{zero_shot:.1%}"),
        (f"{label} fine-tuned accuracy", f"{tuned:.1%}"),
        (
            "merged model",
            f"{agree:.1%} same predictions as unmerged on the first {n_check} test reviews",
        ),
        ("merged layers", "plain nn.Linear" if "AdaptedLayer" not in kinds else "NOT MERGED"),
        (
            "trainable params",
            f"{summary['trainable_params']:,} ({100 * summary['trainable_params'] / summary['total_params']:.2f} %)",
        ),
        (
            "training",
            f"{summary['steps']} steps, {summary['time_s']:.0f} s, {summary['tokens_per_s']:.0f} tok/s",
        ),
        ("peak memory", f"{summary['peak_memory_mib']:.0f} MiB"),
        ("adapter (PEFT format)", str(Path(output) / "adapter")),
        ("merged model folder", str(merged_dir)),
        ("loss curve", str(Path(output) / "loss.png")),
        ("total time", f"{time.perf_counter() - t0:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    return 0 if agree == 1.0 and "AdaptedLayer" not in kinds else 1

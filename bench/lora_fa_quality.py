"""LoRA vs LoRA-FA (v1, and v2 with the gradient correction) at the demo's budget.

SmolLM2-135M-Instruct on rotten-tomatoes sentiment: rank 16, alpha 32, all linear layers, 24 steps
of 16 reviews, lr 2e-3 (and LoRA-FA also at 4e-3), the demo's plain prompt; accuracy on the 1,057
test reviews. Same seed, same data order for every row.

    .venv/bin/python bench/lora_fa_quality.py        # STEPS=24 to change
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

from lorakit import data  # noqa: E402
from lorakit.classify import classification_prompt, classify  # noqa: E402
from lorakit.config import TrainConfig  # noqa: E402
from lorakit.demo import DEMO  # noqa: E402
from lorakit.evaluate import accuracy  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.train import train  # noqa: E402

# (label, method, v2 gradient correction, learning rate; None: the demo's)
ROWS = [
    ("LoRA", "lora", False, None),
    ("LoRA-FA (v1)", "lora_fa", False, None),
    ("LoRA-FA v2 (grad correction)", "lora_fa", True, None),
    # Only B trains, so each step moves the weights less: LoRA-FA at twice the demo's rate.
    ("LoRA-FA (v1), lr 4e-3", "lora_fa", False, 4e-3),
    ("LoRA-FA v2 (grad correction), lr 4e-3", "lora_fa", True, 4e-3),
]


def main() -> None:
    steps = int(os.environ.get("STEPS", DEMO["max_steps"]))
    test = data.load_records("rotten-tomatoes", "test")
    lines = []
    for label, method, corr, lr in ROWS:
        torch.manual_seed(0)
        model, tok = load_model("smollm2-135m")
        template, words = classification_prompt(
            tok, data.label_names("rotten-tomatoes"), DEMO["prompt"]
        )
        cfg = TrainConfig.from_flat(
            dict(
                method=method,
                grad_correction=corr,
                rank=DEMO["rank"],
                alpha=DEMO["alpha"],
                max_steps=steps,
                batch_size=DEMO["batch_size"],
                lr=lr or DEMO["lr"],
                max_len=DEMO["max_len"],
                prompt=DEMO["prompt"],
                eval_examples=64,
                save_every=0,
                progress=False,
                output=tempfile.mkdtemp(prefix="lorakit-fa-"),
            )
        )
        summary = train(cfg, model=model, tokenizer=tok)["summary"]
        prompts = [template.replace("{text}", r["text"]) for r in test]
        acc = accuracy(classify(model, tok, prompts, words), [r["label"] for r in test])
        lines.append(
            f"| {label} | {summary['trainable_params']:,} | {summary['final_loss']:.4f} | {acc:.1%} | "
            f"{summary['time_s']:.0f} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(
        [
            "# LoRA-FA quality at the demo's budget",
            "",
            __doc__.split("\n\n")[1].replace("\n", " "),
            "",
            f"Machine: {machine()}.",
            "",
            "| method | trainable params | last-step train loss | test accuracy | train s |",
            "|---|---:|---:|---:|---:|",
            *lines,
            "",
            "Command: `.venv/bin/python bench/lora_fa_quality.py`",
            "",
        ]
    )
    print(text)
    write("lora_fa_quality.md", text)


if __name__ == "__main__":
    main()

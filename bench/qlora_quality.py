"""Quality on a 4-bit base at the demo's budget: LoRA and LoRA-FA, nf4 next to full precision.

SmolLM2-135M-Instruct on rotten-tomatoes sentiment, the demo's run (rank 16, alpha 32, all linear
layers, 24 steps of 16 reviews, lr 2e-3, the plain prompt), on the float32 base and on its nf4
quantization (``load_model(quantize="nf4")``: double quant, compute dtype float32); accuracy on
the 1,057 test reviews, zero-shot and fine-tuned, per seed (the seed sets the adapter's init; the
data order is the same for every row of one seed).

    .venv/bin/python bench/qlora_quality.py   # ROWS="lora:0,1,2;lora_fa:0" QUANT=none,nf4
"""

from __future__ import annotations

import os
import statistics
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

LABELS = {"lora": "LoRA", "lora_fa": "LoRA-FA"}


ZERO: dict[str, float] = {}  # zero-shot accuracy per base (it depends on nothing else)


def run(method: str, quantize: str, seed: int, prompts, labels) -> tuple[float, float, float]:
    """(zero-shot accuracy, fine-tuned accuracy, train seconds) of one demo run."""
    torch.manual_seed(seed)
    model, tok = load_model("smollm2-135m", quantize=None if quantize == "none" else quantize)
    template, words = classification_prompt(tok, data.label_names("rotten-tomatoes"), "plain")
    texts = [template.replace("{text}", t) for t in prompts]
    if quantize not in ZERO:
        ZERO[quantize] = accuracy(classify(model, tok, texts, words), labels)
    zero = ZERO[quantize]
    flat = dict(DEMO)
    flat |= {"method": method, "quantize": quantize, "seed": seed, "eval_examples": 64}
    flat |= {"save_every": 0, "progress": False, "output": tempfile.mkdtemp(prefix="lorakit-q-")}
    summary = train(TrainConfig.from_flat(flat), model=model, tokenizer=tok)["summary"]
    return zero, accuracy(classify(model, tok, texts, words), labels), summary["time_s"]


def main() -> None:
    rows = os.environ.get("ROWS", "lora:0;lora_fa:0")  # method:seeds;...
    plan = [
        (m, [int(x) for x in seeds.split(",")])
        for m, seeds in (r.split(":") for r in rows.split(";"))
    ]
    quants = os.environ.get("QUANT", "none,nf4").split(",")
    test = data.load_records("rotten-tomatoes", "test")
    prompts, labels = [r["text"] for r in test], [r["label"] for r in test]
    lines, means = [], []
    for method, seeds in plan:
        for quant in quants:
            accs = []
            for seed in seeds:
                zero, acc, secs = run(method, quant, seed, prompts, labels)
                accs.append(acc)
                base = "float32" if quant == "none" else quant
                lines.append(
                    f"| {LABELS[method]} | {base} | {seed} | {zero:.1%} | {acc:.1%} | {secs:.0f} |"
                )
                print(lines[-1], flush=True)
            spread = f" ± {statistics.stdev(accs):.1%}" if len(accs) > 1 else ""
            means.append(
                f"| {LABELS[method]} | {'float32' if quant == 'none' else quant} | "
                f"{statistics.mean(accs):.1%}{spread} | {len(accs)} |"
            )
    text = "\n".join(
        [
            "# Quality on a 4-bit base at the demo's budget",
            "",
            __doc__.split("\n\n")[1].replace("\n", " "),
            "",
            f"Machine: {machine()}.",
            "",
            "| method | base | seed | zero-shot | fine-tuned | train s |",
            "|---|---|---:|---:|---:|---:|",
            *lines,
            "",
            "| method | base | fine-tuned, mean over seeds | seeds |",
            "|---|---|---:|---:|",
            *means,
            "",
            f'Command: `ROWS="{rows}" .venv/bin/python bench/qlora_quality.py`',
            "",
        ]
    )
    write("qlora_quality.md", text)


if __name__ == "__main__":
    main()

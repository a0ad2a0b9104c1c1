"""Training throughput with 1 and 2 processes (torchrun, DDP and FSDP2), same global batch.

SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, rotten-tomatoes label-word training,
global batch 8 (micro-batch 4 per process), max_len 128. Each configuration runs `lorakit train`
in a fresh process group; throughput is the median of the per-step tokens/s that the run logs
(steps after the first two, which warm up). The machine's cores are split between processes
(OMP_NUM_THREADS = cores / processes), so on a CPU this measures what data parallelism costs or
gains on the same hardware, not added hardware. With a GPU, one process on one GPU is measured.

    .venv/bin/python bench/scaling.py        # STEPS=10 to change
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

ARGS = [
    "--model", "smollm2-135m", "--data", "rotten-tomatoes", "--method", "lora", "--rank", "16",
    "--alpha", "32", "--batch-size", "8", "--micro-batch-size", "4", "--max-len", "128",
    "--lr", "2e-3", "--prompt", "plain", "--save-every", "0", "--eval-examples", "8",
    "--no-progress",
]  # fmt: skip


def run(procs: int, strategy: str | None, steps: int, cores: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="lorakit-scaling-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
    args = [*ARGS, "--max-steps", str(steps), "--output", str(out)]
    if procs == 1:
        cmd = [sys.executable, "-m", "lorakit", "train", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(procs), "-m", "lorakit", "train", *args,
            "--strategy", strategy,
        ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[2:] or rows
    return {
        "tok_s": statistics.median(r["tok_per_s"] for r in timed),
        "step_s": statistics.median(r["step_s"] for r in timed),
        "loss": rows[-1]["loss"],
    }


def main() -> None:
    steps = int(os.environ.get("STEPS", 10))
    cores = os.cpu_count() or 1
    configs = [(1, None), (2, "ddp"), (2, "fsdp")]
    results = {}
    for procs, strategy in configs:
        name = f"{procs} process" + ("" if procs == 1 else f"es, {strategy}")
        print(f"== {name}", flush=True)
        results[name] = run(procs, strategy, steps, cores)
        print(f"  {results[name]}", flush=True)
    ref = results["1 process"]
    lines = [
        f"| {name} | {r['tok_s']:.0f} | {r['tok_s'] / ref['tok_s']:.2f}x | {r['step_s']:.2f} | "
        f"{r['loss']:.4f} |"
        for name, r in results.items()
    ]
    gpu = ""
    if torch.cuda.is_available():
        r = run(1, None, steps, cores)
        gpu = f"\nOne GPU ({torch.cuda.get_device_name()}): {r['tok_s']:.0f} tokens/s.\n"
    text = "\n".join(
        [
            "# Scaling: 1 vs 2 processes (torchrun), same global batch",
            "",
            __doc__.split("\n\n")[1].replace("\n", " "),
            "",
            f"Machine: {machine()}; {cores} cores split between the processes.",
            "",
            "| run | tokens/s | vs 1 process | median step s | last-step loss |",
            "|---|---:|---:|---:|---:|",
            *lines,
            gpu,
            "The last-step loss agrees across rows: the same global batches, the same math.",
            "",
            "Command: `.venv/bin/python bench/scaling.py`",
            "",
        ]
    )
    print(text)
    write("scaling.md", text)


if __name__ == "__main__":
    main()

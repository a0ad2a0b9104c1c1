"""The planner against real training, and what planning itself costs.

1. Peak: for each case, real training steps of SmolLM2-135M in a fresh process
   (``bench/plan_rss.py``: its resident-memory growth over three steps, from a start with the
   weights paged in and the adapter injected) next to the plan of the same run on this CPU
   (``target="cpu"``: the planned peak minus the frozen weights and trainable parameters, which
   the fresh process holds before its first step).
   The child runs with glibc's allocator pinned (``MALLOC_MMAP_THRESHOLD_=65536``: every large
   block is its own mapping, returned to the system when freed; ``MALLOC_TRIM_THRESHOLD_=0``,
   ``MALLOC_ARENA_MAX=1``), so its resident size follows what is live instead of what the
   allocator kept from earlier steps, and with nothing else of the parent's environment.
2. Cost: the wall time and the peak resident memory of ``lorakit plan`` processes on 70B shapes.

    .venv/bin/python bench/plan_validate.py      # CASES=all|quick
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

from lorakit.config import TrainConfig  # noqa: E402
from lorakit.planner import plan  # noqa: E402

HERE = Path(__file__).parent
ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MALLOC_ARENA_MAX": "1",
}

CASES = [  # label, flat keys (SmolLM2-135M, float32, batch 2 x 256 tokens)
    ("LoRA", {"method": "lora"}),
    ("LoRA-FA + reduce", {"method": "lora_fa", "reduce_memory": True}),
    ("LoRA + checkpointing", {"method": "lora", "checkpointing": True}),
    ("LoRS", {"method": "lors"}),
    ("full FT", {"method": "full"}),
]
COSTS = [  # label, lorakit plan arguments
    ("LoRA, seq 8192", ["--method", "lora", "--max-len", "8192"]),
    (
        "LoRA-FA + reduce, FSDP x8, seq 2048",
        ["--method", "lora_fa", "--reduce-memory", "--max-len", "2048"]
        + ["--strategy", "fsdp", "--world-size", "8", "--batch-size", "8"],
    ),
]


def clean_env() -> dict[str, str]:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return {**keep, **ALLOCATOR, "TRANSFORMERS_VERBOSITY": "error"}


def measured(flat: dict) -> dict:
    cmd = [sys.executable, str(HERE / "plan_rss.py"), json.dumps(flat)]
    env = {**clean_env(), "PYTHONPATH": str(HERE.parent / "src")}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def planned_growth(flat: dict) -> int:
    p = plan(TrainConfig.from_flat(flat), target="cpu")
    return p.peak - p.at_peak.get("weights", 0) - p.at_peak.get("trainable", 0)


def cost(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident bytes of one ``lorakit plan`` process."""
    cmd = [sys.executable, "-m", "lorakit", "plan", "--model", "llama-2-70b"]
    cmd += ["--dtype", "bfloat16", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**os.environ})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{cmd} failed")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def main() -> None:
    quick = os.environ.get("CASES", "all") == "quick"
    MiB = 1024**2
    lines = [
        "# The planner against real training",
        "",
        " ".join(line.strip() for line in __doc__.split("\n\n")[1].splitlines()),
        "",
        f"Run on: {machine()}",
        "",
        "Wall times count every other job on these cores (the load average above); resident "
        "bytes do not depend on them.",
        "",
        "## Peak: planned vs the resident-memory growth of real steps (SmolLM2-135M, float32, "
        "batch 2 x 256)",
        "",
        "| run | planned MiB | measured MiB | measured / planned |",
        "|---|---:|---:|---:|",
    ]
    for label, keys in CASES[:2] if quick else CASES:
        flat = {"model": "smollm2-135m", "batch_size": 2, "max_len": 256, **keys}
        want, got = planned_growth(flat), measured(flat)["increase"]
        lines.append(f"| {label} | {want / MiB:.1f} | {got / MiB:.1f} | {got / want:.4f} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "## Cost of planning a 70B shape (llama-2-70b, bf16, batch 1 per rank)",
        "",
        "| plan | wall s | peak RSS MiB |",
        "|---|---:|---:|",
    ]
    for label, args in [] if quick else COSTS:
        seconds, rss = cost(args)
        lines.append(f"| {label} | {seconds:.1f} | {rss / MiB:.0f} |")
        print(lines[-1], flush=True)
    lines += ["", "Command: `.venv/bin/python bench/plan_validate.py`"]
    write("plan_validate.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

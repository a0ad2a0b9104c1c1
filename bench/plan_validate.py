"""The planner against real training, and what planning itself costs.

1. Phases: each phase the planner plans (gradient-SVD init, a training step, validation) run on
   real tensors of SmolLM2-135M and measured by the planner's own storage accounting
   (``lorakit.planner.tracker.live_peak``: every storage an op returns, from that op to its
   free), next to the plan (``target="cpu"``). Deterministic, the same on any CPU; it does not
   see what a kernel allocates and frees inside itself (oneDNN / AMX scratch, sdpa's per-thread
   buffers), which the resident memory below does.
2. Peak: for each case, real training steps of SmolLM2-135M in a fresh process
   (``bench/plan_rss.py``: its resident-memory growth over three steps, from a start with the
   weights paged in and the adapter injected) next to the plan of the same run's training step
   on this CPU (the planned peak minus the frozen weights, the trainable parameters and the
   batch, which the fresh process holds before its first step).
   The child runs with glibc's allocator pinned (``MALLOC_MMAP_THRESHOLD_=65536``: every large
   block is its own mapping, returned to the system when freed; ``MALLOC_TRIM_THRESHOLD_=0``,
   ``MALLOC_ARENA_MAX=1``), so its resident size follows what is live instead of what the
   allocator kept from earlier steps, and with nothing else of the parent's environment;
   ``MKL_DISABLE_FAST_MM=1`` keeps MKL from caching freed GEMM buffers.
   What the kernels hold besides depends on the CPU and its libraries (on an Intel Xeon with
   AMX, LoRA-FA + reduce read 1.059 and LoRA + checkpointing 1.079 of the plan before MKL's
   cache was turned off; 1.0003 and 1.016 on an AMD EPYC), so the test suite checks the phases (1.)
   and this is a benchmark.
3. Cost: the wall time and the peak resident memory of ``lorakit plan`` processes on 70B shapes.

    .venv/bin/python bench/plan_validate.py      # CASES=all|quick
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, splice, write  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.config import DTYPES, TrainConfig  # noqa: E402
from lorakit.distributed import SINGLE  # noqa: E402
from lorakit.evaluate import token_losses  # noqa: E402
from lorakit.gradient_init import gradient_svd_init  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.planner import plan  # noqa: E402
from lorakit.planner.report import PHASES  # noqa: E402
from lorakit.planner.tracker import live_peak  # noqa: E402
from lorakit.tasks import batch_loss  # noqa: E402
from lorakit.train import _adapt  # noqa: E402

HERE = Path(__file__).parent
ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MALLOC_ARENA_MAX": "1",
    "MKL_DISABLE_FAST_MM": "1",  # MKL's own cache of freed GEMM buffers (8 MiB on a Xeon)
}

CASES = [  # label, flat keys (SmolLM2-135M, float32, batch 2 x 256 tokens)
    ("LoRA, gradient-SVD init (8 samples)", {"method": "lora", "init": "gradient_svd"}),
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
    cfg = TrainConfig.from_flat(flat)
    p = plan(cfg, target="cpu")
    held = p.phase_at_peak["train_step"]
    batch = 3 * cfg.batch_size * cfg.max_len * 8  # ids, mask, labels: made before the steps
    return p.phases["train_step"] - held.get("weights", 0) - held.get("trainable", 0) - batch


def _rows(n: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 1000, (n, seq), generator=torch.Generator().manual_seed(n))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _state(model, optimizer=None) -> list[torch.Tensor]:
    found = [*model.parameters(), *model.buffers()]
    for s in optimizer.state.values() if optimizer is not None else ():
        found += [t for t in s.values() if torch.is_tensor(t)]
    return found


def _step(model, optimizer, params, batch) -> None:  # train_step's tensor work
    count = batch["labels"][:, 1:].numel()
    loss = batch_loss(model, batch)
    (loss * 1 / count).backward()
    loss.detach().item()
    torch.nn.utils.clip_grad_norm_(params, float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def real_phases(cfg: TrainConfig) -> dict[str, int]:
    """Each phase run on real tensors (set up as training sets them up), its live-storage peak."""
    model, _ = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
    if cfg.method == "lors":
        lk.prune(model, "magnitude", 0.5, progress=False)
    _adapt(model, cfg, "lm", SINGLE)
    model.train()
    found = {}
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.adapter is not None and cfg.adapter.init == "gradient_svd":
        n = cfg.init_samples
        batches = [_rows(min(micro, n - i), cfg.max_len) for i in range(0, n, micro)]
        found["gradient_svd_init"] = live_peak(
            lambda: gradient_svd_init(model, lambda m, b: batch_loss(m, b) / n, batches),
            _state(model) + [t for b in batches for t in b.values()],
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = _rows(micro, cfg.max_len)
    _step(model, optimizer, params, batch)
    state = _state(model, optimizer) + list(batch.values())
    found["train_step"] = live_peak(lambda: _step(model, optimizer, params, batch), state)
    model.eval()
    with torch.no_grad():
        found["validation"] = live_peak(lambda: token_losses(model, batch), state)
    return found


# ``lorakit plan`` in a fresh process that reports its own peak resident size (``VmHWM`` of the
# image it exec'd; a child's ``ru_maxrss`` would include the forked image of this process).
PROBE = """import re, sys
from lorakit.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024, file=sys.stderr)
sys.exit(code)
"""


def cost(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident bytes of one ``lorakit plan`` process."""
    cmd = [sys.executable, "-c", PROBE, "plan", "--model", "llama-2-70b"]
    cmd += ["--dtype", "bfloat16", *args]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode:
        raise RuntimeError(f"{cmd} failed: {run.stderr[-2000:]}")
    return seconds, int(run.stderr.strip().splitlines()[-1])


FIT_START, FIT_END = "<!-- fit: SECTION=fit bench/plan_validate.py -->", "<!-- /fit -->"


def fit_section(budget: str = "1.5GiB") -> list[str]:
    """``lorakit train --fit`` on SmolLM2-135M at 4 x 2,048 tokens: the setting it chooses, and
    the resident growth of real steps in that setting next to the plan."""
    from lorakit.planner.choose import choose

    MiB = 1024**2
    flat = {"model": "smollm2-135m", "method": "lora", "batch_size": 4, "max_len": 2048}
    tried: list[str] = []
    chosen, p = choose(TrainConfig.from_flat(flat), budget, target="cpu", report=tried.append)
    keys = {k: getattr(chosen, k) for k in ("micro_batch_size", "reduce_memory", "checkpointing")}
    keys |= {"mlp_tile": chosen.mlp_tile, "offload": chosen.offload}
    want, got = planned_growth({**flat, **keys}), measured({**flat, **keys})["increase"]
    held = p.phase_at_peak[p.peak_phase]
    static = held.get("weights", 0) + held.get("trainable", 0)
    lines = [
        FIT_START,
        "",
        f"## `lorakit train --fit {budget}` (SmolLM2-135M, float32, LoRA, batch 4 x 2,048)",
        "",
        "What it tried, in order (planned on this CPU):",
        "",
    ]
    lines += [f"- {t}" for t in tried]
    lines += [
        "",
        f"Chosen: {keys}. Planned peak {p.peak / MiB:.0f} MiB, of which weights and trainable "
        f"parameters {static / MiB:.0f} MiB. Real steps in that setting (a fresh process, as "
        f"above): resident growth {got / MiB:.1f} MiB against {want / MiB:.1f} MiB planned "
        f"({got / want:.3f}x), so weights + growth = {(static + got) / MiB:.0f} MiB of the "
        f"{budget} budget.",
        "",
        FIT_END,
    ]
    return lines


def main() -> None:
    if os.environ.get("SECTION") == "fit":
        splice("plan_validate.md", fit_section(), "Command: `")
        return
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
        "## Each phase: planned vs its live storages on real tensors (SmolLM2-135M, float32, "
        "batch 2 x 256)",
        "",
        "| run | phase | planned bytes | real bytes | real - planned |",
        "|---|---|---:|---:|---:|",
    ]
    cases = CASES[1:3] if quick else CASES
    for label, keys in cases:
        flat = {"model": "smollm2-135m", "batch_size": 2, "max_len": 256, "init_samples": 8}
        cfg = TrainConfig.from_flat({**flat, **keys})
        planned, real = plan(cfg, target="cpu"), real_phases(cfg)
        for k, v in planned.phases.items():
            peak = " (the peak)" if k == planned.peak_phase and len(planned.phases) > 2 else ""
            lines.append(f"| {label} | {PHASES[k]}{peak} | {v:,} | {real[k]:,} | {real[k] - v:,} |")
            print(lines[-1], flush=True)
    lines += [
        "",
        "## Peak: planned training step vs the resident-memory growth of real steps "
        "(SmolLM2-135M, float32, batch 2 x 256)",
        "",
        "| run | planned MiB | measured MiB | measured / planned |",
        "|---|---:|---:|---:|",
    ]
    for label, keys in cases:
        if "init" in keys:  # a step is a step, however A began
            continue
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
    lines += ["", *fit_section()]
    lines += ["", "Command: `.venv/bin/python bench/plan_validate.py`"]
    write("plan_validate.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

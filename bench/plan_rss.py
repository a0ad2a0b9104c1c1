"""Peak resident memory of real training steps, in a fresh process: the planner's check.

    .venv/bin/python bench/plan_rss.py '{"method": "lora", "max_len": 512}'   # prints JSON

Loads the model, builds the run as ``lorakit train`` does, resets the kernel's peak-resident mark
(``/proc/self/clear_refs``: loading the weights peaks higher than it ends, and that peak must not
count), and reads the peak (``VmHWM``) after each of three steps, minus the resident size before
the first step (weights loaded and paged in, adapter injected, one 8-token forward + backward run
so kernels' code is resident).
Shares no code with the planner beyond the training code path itself.
"""

from __future__ import annotations

import json
import re
import resource
import sys

import torch


def peak_rss() -> int:
    """The peak resident size since the last reset (``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    from lorakit.config import DTYPES, TrainConfig
    from lorakit.distributed import SINGLE
    from lorakit.models import load_model
    from lorakit.tasks import batch_loss
    from lorakit.train import _adapt

    flat = json.loads(sys.argv[1])
    cfg = TrainConfig.from_flat(flat)
    model, _ = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
    _adapt(model, cfg, "lm", SINGLE)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    micro = cfg.micro_batch_size or cfg.batch_size
    ids = torch.randint(0, 1000, (micro, cfg.max_len))
    batch = {"input_ids": ids, "labels": ids.clone()}
    count = micro * (cfg.max_len - 1)
    # Page in what the first step would otherwise fault in and count: the weights (their file
    # may be mapped lazily) and the kernels' code, with an 8-token forward + backward.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()
    small = ids[:1, :8]
    batch_loss(model, {"input_ids": small, "labels": small.clone()}).backward()
    opt.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:  # the peak mark restarts from here
        f.write("5")
    before = rss_now()
    peaks = []
    for _ in range(3):
        (batch_loss(model, batch) / count).backward()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks.append(peak_rss() - before)
    print(json.dumps({"before": before, "increase": peaks[-1], "per_step": peaks}))


if __name__ == "__main__":
    main()

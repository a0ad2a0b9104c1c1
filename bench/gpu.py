"""The GPU checks, in one short run: the planner against the CUDA allocator, and QLoRA on a GPU.

1. ``lorakit plan`` (target gpu) next to ``torch.cuda.max_memory_allocated`` of the same run's
   real second step (set up by ``lorakit.train``'s own ``_adapt``; the step is what
   ``train_step`` runs: summed loss / targets, backward, norm clip, AdamW, zero_grad). The model
   is the named shape with random weights: memory does not depend on the values.
2. QLoRA side by side on one bf16 model (SmolLM2-1.7B's shape, random weights, saved and
   reloaded 4-bit through transformers' ``BitsAndBytesConfig``, nf4 + double quant): PEFT
   QLoRA, lorakit QLoRA / QLoRA-FA with and without ``reduce_activation_memory``, and bf16 LoRA of
   both libraries; saved activations, peak allocated memory of a step, median step time.

    python bench/gpu.py            # on a CUDA machine; QUICK=1 for small shapes (and on CPU,
                                   # where part 1 checks only that the code path runs)
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PROJECTIONS, Peer, causal_lm_loss, fresh, machine, step, write  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.config import DTYPES, TrainConfig  # noqa: E402
from lorakit.distributed import SINGLE  # noqa: E402
from lorakit.planner import plan  # noqa: E402
from lorakit.planner.shapes import load_config  # noqa: E402
from lorakit.profile import MiB  # noqa: E402
from lorakit.tasks import batch_loss  # noqa: E402
from lorakit.train import _adapt  # noqa: E402

QUICK = os.environ.get("QUICK") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GiB = 1024**3

# label, flat keys
SMALL = {"model": "smollm2-135m", "batch_size": 4, "max_len": 1024, "dtype": "bfloat16"}
BIG = {"model": "smollm2-1.7b", "batch_size": 1, "max_len": 4096, "dtype": "bfloat16"}
if QUICK:
    SMALL |= {"batch_size": 1, "max_len": 64}
    BIG = SMALL | {"max_len": 96}
CASES = [
    ("LoRA", SMALL | {"method": "lora"}),
    ("LoRA, fp32", SMALL | {"method": "lora", "dtype": "float32"}),
    ("LoRA-FA", SMALL | {"method": "lora_fa"}),
    ("LoRA-FA + reduce", SMALL | {"method": "lora_fa", "reduce_memory": True}),
    ("LoRA + checkpointing", SMALL | {"method": "lora", "checkpointing": True}),
    ("LoRS", SMALL | {"method": "lors"}),
    ("full FT", SMALL | {"method": "full"}),
    ("QLoRA (nf4)", SMALL | {"method": "lora", "quantize": "nf4"}),
    ("LoRA", BIG | {"method": "lora"}),
    ("LoRA-FA + reduce", BIG | {"method": "lora_fa", "reduce_memory": True}),
    (
        "LoRA-FA + reduce + ckpt",
        BIG | {"method": "lora_fa", "reduce_memory": True, "checkpointing": True},
    ),
    ("full FT", BIG | {"method": "full"}),
    (
        "QLoRA-FA + reduce (nf4)",
        BIG | {"method": "lora_fa", "reduce_memory": True, "quantize": "nf4"},
    ),
]

# float32 after the planner learned CUDA's attention fallback (math kernel for GQA heads):
# a GQA shape and one with as many key/value heads as query heads (memory-efficient kernel).
FP32 = [
    ("LoRA", SMALL | {"method": "lora", "dtype": "float32"}),
    ("LoRA-FA + reduce", SMALL | {"method": "lora_fa", "reduce_memory": True, "dtype": "float32"}),
    ("LoRA", {"model": "llama-2-7b", "batch_size": 1, "max_len": 1024, "dtype": "float32"}),
]
if os.environ.get("PART") == "fp32":
    CASES = FP32 if not QUICK else [(n, f | SMALL | {"dtype": "float32"}) for n, f in FP32[:1]]


def random_model(cfg: TrainConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(load_config(cfg.model), dtype=DTYPES[cfg.dtype])
    if cfg.method == "lors":  # LoRS trains a pruned model
        lk.prune(model, "magnitude", 0.5, progress=False)
    return model.train()


def real_peak(cfg: TrainConfig) -> tuple[int, int]:
    """(allocated before the measured step, max allocated during it) of a real run."""
    model = random_model(cfg)
    _adapt(model, cfg, "lm", SINGLE)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.max_len), device=DEVICE)
    batch = {"input_ids": ids, "labels": ids.clone()}
    count = cfg.batch_size * (cfg.max_len - 1)

    def one_step() -> None:
        (batch_loss(model, batch) / count).backward()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()  # the optimizer states exist from here on, as in every step but a run's first
    if not CUDA:
        return 0, 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    one_step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return before, peak


def plan_table() -> list[str]:
    rows = []
    for label, flat in CASES:
        cfg = TrainConfig.from_flat(flat)
        t0 = time.perf_counter()
        p = plan(cfg, target="gpu")
        seconds = time.perf_counter() - t0
        persistent = sum(p.at_peak.get(k, 0) for k in ("weights", "trainable", "optimizer"))
        try:
            before, peak = real_peak(cfg)
        except Exception as e:  # one failed row must not lose the others (one device run)
            print(f"{label}: {type(e).__name__}: {e}", flush=True)
            before = peak = 0
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        ratio = f"{peak / p.peak:.4f}" if peak else "-"
        shape = f"{cfg.model}, {cfg.dtype}, {cfg.batch_size} x {cfg.max_len}"
        rows.append(
            f"| {shape} | {label} | {persistent / MiB:,.0f} | {before / MiB:,.0f} | "
            f"{p.peak / MiB:,.0f} | {peak / MiB:,.0f} | {ratio} | {seconds:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def qlora_rows(steps: int) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit import quant

    flat = BIG | {"method": "lora"}
    cfg = TrainConfig.from_flat(flat)
    dense = random_model(cfg)
    folder = tempfile.mkdtemp()
    dense.save_pretrained(folder)
    base4 = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.bfloat16,
        quantization_config=quant.bnb_config(
            "nf4", double_quant=True, compute_dtype=torch.bfloat16
        ),
        device_map={"": DEVICE},
    ).train()
    quant.keep_canonical(base4)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS)

    def ours(model, method, reduce=False):
        torch.manual_seed(0)
        m = lk.inject(
            fresh(model), lk.LoRAConfig(method=method, rank=16, alpha=32, targets=PROJECTIONS)
        )
        return lk.reduce_activation_memory(m) if reduce else m

    builds = {
        "PEFT QLoRA (nf4, double quant)": lambda: get_peft_model(fresh(base4), peft_cfg),
        "lorakit QLoRA": lambda: ours(base4, "lora"),
        "lorakit QLoRA + reduce": lambda: ours(base4, "lora", True),
        "lorakit QLoRA-FA": lambda: ours(base4, "lora_fa"),
        "lorakit QLoRA-FA + reduce": lambda: ours(base4, "lora_fa", True),
        "PEFT LoRA, bf16 base": lambda: get_peft_model(fresh(dense), peft_cfg),
        "lorakit LoRA, bf16 base": lambda: ours(dense, "lora"),
    }
    vocab = dense.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.max_len), device=DEVICE)
    rows: list[str] = []
    ref: tuple[int, float] | None = None  # PEFT QLoRA's (saved bytes, median step)
    for name, build in builds.items():  # one at a time: each row's peak is its own
        try:
            row, saved, median = qlora_row(name, build(), ids, steps, ref)
            ref = ref or (saved, median)
        except Exception as e:  # one failed row must not lose the others (one device run)
            row = f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} |"
        rows.append(row)
        print(row, flush=True)
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
    return rows


def qlora_row(name, model, ids, steps, ref) -> tuple[str, int, float]:
    peer = Peer(name, model)
    loss = causal_lm_loss(peer.model, ids)
    step(peer, loss, count=True)  # counts saved bytes
    step(peer, loss)  # warm-up: AdamW's states exist from here on
    before = torch.cuda.memory_allocated() if CUDA else 0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    peer.times = [step(peer, loss) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() - before if CUDA else 0
    saved, median = peer.saved_bytes, peer.median
    ref_saved, ref_median = ref or (saved, median)
    row = (
        f"| {name} | {before / MiB:,.0f} | {saved / MiB:,.0f} | {saved / ref_saved:.2f}x "
        f"| {peak / MiB:,.0f} | {median * 1e3:.1f} | {median / ref_median:.2f}x "
        f"| {peer.losses[0]:.4f} |"
    )
    return row, saved, median


def main() -> None:
    steps = 2 if QUICK else int(os.environ.get("STEPS", 10))
    head = f"`python bench/gpu.py` on {machine()}"
    if os.environ.get("PART") == "fp32":
        write("gpu_plan_fp32.md", "\n".join([head, "", *plan_table(), ""]))
        return
    write(
        "gpu_plan.md",
        "\n".join(
            [
                "# The planner against the CUDA allocator",
                "",
                head,
                "",
                "Random weights in each named shape (memory does not depend on the values); "
                "`persistent`: weights + trainable parameters + optimizer states; `before`: "
                "`torch.cuda.memory_allocated()` before the measured step (the same things, and "
                "cuBLAS's workspace); `peak`: planned, and `torch.cuda.max_memory_allocated()` of "
                "the real second step.",
                "",
                "| shape | run | planned persistent MiB | real before MiB | planned peak MiB "
                "| real peak MiB | real / planned | plan s |",
                "|---|---|---:|---:|---:|---:|---:|---:|",
                *plan_table(),
                "",
            ]
        ),
    )
    b = BIG
    write(
        "gpu_qlora.md",
        "\n".join(
            [
                "# QLoRA on a GPU: PEFT and lorakit on the same 4-bit base",
                "",
                head,
                "",
                f"{b['model']} shape (random weights), bf16, batch {b['batch_size']} x "
                f"{b['max_len']} tokens, r=16, alpha=32, all 7 projections; nf4 + double quant "
                "through transformers' BitsAndBytesConfig; AdamW. `resident`: allocated after the warm-up steps (base, adapter, AdamW states); `peak`: "
                "`max_memory_allocated` over the timed steps minus what was allocated before "
                f"them (activations, gradients, transients); step: median of {steps} "
                "(forward + backward + AdamW, synchronized).",
                "",
                "| row | resident MiB | saved MiB | saved vs PEFT QLoRA | step peak over resident MiB "
                "| step ms | step vs PEFT QLoRA | first loss |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
                *qlora_rows(steps),
                "",
            ]
        ),
    )


if __name__ == "__main__":
    main()

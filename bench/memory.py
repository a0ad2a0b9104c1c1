"""Training memory of LoRA, LoRA-FA and full fine-tuning, lorakit vs PEFT, on the real SmolLM2-135M.

Rows: full fine-tuning, PEFT LoRA, PEFT LoRA-FA (`create_lorafa_optimizer`: A frozen, B trained),
lorakit LoRA and LoRA-FA, each with and without `reduce_activation_memory` (its defaults; the MLP
recomputes gate/up in backward), plus LoRA-FA + reduce with `mlp="elementwise"` (no GEMM
recomputed) and with HF activation checkpointing on top. r=16, alpha=32, all 7
projections, batch 1. Adapters are each library's default dtype: fp32 on the bf16 base too (fp32
master weights, grads and AdamW states; PEFT's autocast_adapter_dtype, lorakit's
adapter_dtype=None). Saved = unique storages autograd keeps for backward, parameters/buffers
excluded. Total = weights + trainable params' grads + AdamW states (2 per trainable) + saved.
Step time (forward + backward + AdamW, median of timed steps after one warm-up, round-robin) is
measured at seq 512 in fp32; other settings report memory only (a bf16 step of this model took
~90 s on a 2-core CPU without bf16 units). A single LLaMA-7B-shaped decoder block (d=4096, d_ff=11008) shows
the scaling the LoRA-FA paper targets.

    .venv/bin/python bench/memory.py      # SEQS=512,1024,2048 BF16_SEQS=512 STEPS=3 to change
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    PROJECTIONS,
    Peer,
    fresh,
    machine,
    run_interleaved,
    smollm2,
    splice,
    static_bytes,
    write,
)

import lorakit as lk  # noqa: E402
from lorakit.profile import MiB, count_saved  # noqa: E402


def row_builders(base: torch.nn.Module) -> dict[str, Callable[[], torch.nn.Module]]:
    """Each row's model, built on demand (memory-only settings hold one model at a time)."""
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS)

    def full():
        model = fresh(base)
        return model.requires_grad_(True)

    def peft_fa():
        model = get_peft_model(fresh(base), peft_cfg)
        for n, p in model.named_parameters():  # what create_lorafa_optimizer does to the model
            if "lora_A" in n:
                p.requires_grad_(False)
        return model

    def ours(method, **reduce):
        def build():
            cfg = lk.LoRAConfig(method=method, rank=16, alpha=32, targets=PROJECTIONS)
            torch.manual_seed(0)  # identical adapters with and without reduce: losses must agree
            model = lk.inject(fresh(base), cfg)
            return lk.reduce_activation_memory(model, **reduce) if reduce else model

        return build

    rows = {
        "full fine-tuning": full,
        "PEFT LoRA": lambda: get_peft_model(fresh(base), peft_cfg),
        "PEFT LoRA-FA": peft_fa,
    }
    for method, label in (("lora", "LoRA"), ("lora_fa", "LoRA-FA")):
        rows[f"lorakit {label}"] = ours(method)
        rows[f"lorakit {label} + reduce"] = ours(method, mlp="recompute")
    rows["lorakit LoRA-FA + reduce (mlp=elementwise)"] = ours("lora_fa", mlp="elementwise")
    rows["lorakit LoRA-FA + reduce + checkpointing"] = ours("lora_fa", checkpointing=True)
    return rows


def make_peer(name: str, model: torch.nn.Module, timed: bool) -> Peer:
    peer = Peer(name, model, timed=timed)
    if name == "PEFT LoRA-FA":
        peer.optimizer = lorafa_optimizer(model)
    return peer


def loss_agreement(peers) -> list[str]:
    """Max |loss difference| over all steps between each lorakit row and its reduced twin."""
    by_name = {p.name: p for p in peers}
    out = []
    for p in peers:
        twin = by_name.get(p.name + " + reduce")
        if twin is not None and p.losses and twin.losses:
            diff = max(abs(a - b) for a, b in zip(p.losses, twin.losses, strict=False))
            out.append(
                f"- {p.name} vs + reduce: max |Δloss| over {len(p.losses)} steps = {diff:.2e}"
            )
    return out


def lorafa_optimizer(model, lr=1e-4):
    from peft.optimizers import create_lorafa_optimizer

    return create_lorafa_optimizer(model=model, r=16, lora_alpha=32, lr=lr)


def smollm2_tables(
    settings: list[tuple[torch.dtype, int]], steps: int, agreement: list[str]
) -> list[str]:
    lines = []
    for dtype in dict.fromkeys(d for d, _ in settings):
        dname = str(dtype).removeprefix("torch.")
        base = smollm2(dtype)
        builders = row_builders(base)
        for seq in [s for d, s in settings if d == dtype]:
            ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(0))
            timed = dtype == torch.float32 and seq == 512
            print(f"== {dname} seq {seq}", flush=True)
            if timed:  # round-robin timing needs every row alive at once
                peers = [make_peer(n, b(), True) for n, b in builders.items()]
                run_interleaved(peers, ids, steps=steps)
                agreement.extend(f"{dname} seq {seq}: {line[2:]}" for line in loss_agreement(peers))
            else:  # memory only: one model at a time, freed before the next
                peers = []
                for name, build in builders.items():
                    p = make_peer(name, build(), False)
                    loss, p.saved_bytes = count_saved(
                        p.model, lambda m=p.model, x=ids: m(input_ids=x, labels=x).loss
                    )
                    del loss
                    p.static = static_bytes(p.model)
                    p.model = p.optimizer = None
                    gc.collect()
                    peers.append(p)
                    print(f"  {p.name}: {p.saved_bytes / MiB:.1f} MiB", flush=True)
            for p in peers:
                if p.model is not None:
                    p.static = static_bytes(p.model)
            ref = next(p for p in peers if p.name == "PEFT LoRA")
            ref_total = sum(ref.static) + ref.saved_bytes
            for p in peers:
                total = sum(p.static) + p.saved_bytes
                t = (
                    f"{p.median:.2f} | {p.median / ref.median:.2f}x"
                    if p.times and ref.times
                    else "- | -"
                )
                lines.append(
                    f"| {dname} | {seq} | {p.name} | {p.trainable_count:,} | {p.saved_bytes / MiB:.1f} | "
                    f"{p.saved_bytes / ref.saved_bytes:.2f}x | {total / MiB:.0f} | {total / ref_total:.2f}x | {t} |"
                )
            del peers
            gc.collect()
        del builders, base
        gc.collect()
    return lines


def breakdown_table(seq: int = 512) -> list[str]:
    """Saved MiB by category for each row, fp32, seq 512 (forward only, one model at a time)."""
    from lorakit.profile import CATEGORIES, saved_breakdown

    base = smollm2(torch.float32)
    ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(0))
    out = [
        "| row | " + " | ".join(CATEGORIES) + " | total |",
        "|---|" + "---:|" * (len(CATEGORIES) + 1),
    ]
    for name, build in row_builders(base).items():
        model = build().train()
        loss, parts = saved_breakdown(model, lambda m=model: m(input_ids=ids, labels=ids).loss)
        del loss, model
        gc.collect()
        cells = " | ".join(f"{parts[c] / MiB:.1f}" for c in CATEGORIES)
        out.append(f"| {name} | {cells} | {sum(parts.values()) / MiB:.1f} |")
        print(out[-1], flush=True)
    return out


def block_table(seq: int = 512) -> list[str]:
    """One LLaMA-7B-shaped decoder block, bf16: saved bytes per method."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, layer_idx=0).to(torch.bfloat16)
    rope = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, seq, 4096, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq)[None]
    cos, sin = rope(x, pos)

    def run(model):
        def fn():
            out = model(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
            return (out[0] if isinstance(out, tuple) else out).float().pow(2).mean()

        return count_saved(model, fn)[1]

    targets = PROJECTIONS
    rows = []
    peft_cfg = LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    peft_block = get_peft_model(fresh(block), peft_cfg)
    rows.append(("PEFT LoRA", run(peft_block)))
    for n, p in peft_block.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    rows.append(("PEFT LoRA-FA", run(peft_block)))
    del peft_block
    for method, label in (("lora", "LoRA"), ("lora_fa", "LoRA-FA")):
        m = lk.inject(
            fresh(block), lk.LoRAConfig(method=method, rank=16, alpha=32, targets=targets)
        )
        rows.append((f"lorakit {label}", run(m)))
        # reduce_activation_memory's block-level parts: RMSNorm and SiLU·up recompute.
        from lorakit.memory import RMSNorm, _gated_mlp_recompute_forward

        m.input_layernorm = RMSNorm(m.input_layernorm)
        m.post_attention_layernorm = RMSNorm(m.post_attention_layernorm)
        m.mlp.forward = _gated_mlp_recompute_forward.__get__(m.mlp)
        rows.append((f"lorakit {label} + reduce (norms, MLP recompute)", run(m)))
        del m
        gc.collect()
    ref = rows[0][1]
    out = [f"| {name} | {b / MiB:.1f} | {b / ref:.2f}x |" for name, b in rows]
    n = seq
    out.append(
        f"\nLoRA-FA formula check: 7 projections x 2·N·r bytes = {7 * 2 * n * 16 / MiB:.2f} MiB of adapter "
        f"activations per block at N={n}, r=16 (LoRA keeps the inputs: 2·N·(3·4096 + 11008) + ... bytes)."
    )
    return out


def plot(lines: list[str], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "float32":
            data.setdefault(cells[2], {})[int(cells[1])] = float(cells[4])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pts in data.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], "o-", label=name)
    ax.set_xlabel("sequence length (batch 1)")
    ax.set_ylabel("saved activations, MiB")
    ax.set_title("SmolLM2-135M, fp32, r=16, all 7 projections")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    print(f"wrote {file}")


FAMILY_START, FAMILY_END = (
    "<!-- families: SECTION=families bench/memory.py -->",
    "<!-- /families -->",
)
FAMILY_SHAPE = {  # SmolLM2-135M's widths, 8 layers, random weights
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "tie_word_embeddings": False,
}
FAMILIES = {
    "gemma3_text": {"query_pre_attn_scalar": 64, "sliding_window": 256},
    "qwen3_moe": {  # 8 experts of width 768, 2 per token
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 768,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.0,
    },
    "llama": {},
}


def family_table(seq: int = 512) -> list[str]:
    """Saved bytes on other families (random weights, fp32, batch 1): PEFT LoRA vs lorakit."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    lines = [
        FAMILY_START,
        "",
        f"## Other families (random weights, SmolLM2-135M widths, 8 layers, fp32, seq {seq})",
        "",
        "Every row adapts all linear layers (r=16, alpha=32) and, on qwen3_moe, both expert "
        "tensors of every layer (PEFT: `target_parameters`; lorakit: `all-linear,experts`; "
        "PEFT's `all-linear` also adapts the qwen3_moe router). Saved bytes counted as above; "
        "the first loss of every row is the base model's. Reproduce this section alone: "
        "`SECTION=families .venv/bin/python bench/memory.py`.",
        "",
        "| family | row | saved MiB | saved vs PEFT LoRA | loss |",
        "|---|---|---:|---:|---:|",
    ]
    ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(0))
    for family, extra in FAMILIES.items():
        config = AutoConfig.for_model(family, **FAMILY_SHAPE, **extra)
        moe = family.endswith("moe")
        experts = ["experts.gate_up_proj", "experts.down_proj"] if moe else None
        targets = ["all-linear", "experts"] if moe else "all-linear"

        def build(config=config):
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

        peft_cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        peft_cfg.target_parameters = experts
        rows = {"PEFT LoRA": lambda cfg=peft_cfg: get_peft_model(build(), cfg)}
        for method, reduce in (("lora", False), ("lora_fa", False), ("lora_fa", True)):
            label = f"lorakit {'LoRA' if method == 'lora' else 'LoRA-FA'}" + (
                " + reduce" if reduce else ""
            )

            def make(method=method, reduce=reduce, targets=targets):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cfg = lk.LoRAConfig(method=method, rank=16, alpha=32, targets=targets)
                    model = lk.inject(build(), cfg)
                    return lk.reduce_activation_memory(model) if reduce else model

            rows[label] = make
        ref = None
        for label, make in rows.items():
            model = make().train()
            loss, saved = count_saved(model, lambda m=model: m(input_ids=ids, labels=ids).loss)
            ref = ref or saved
            lines.append(
                f"| {family} | {label} | {saved / MiB:.1f} | {saved / ref:.2f}x | {float(loss):.5f} |"
            )
            print(lines[-1], flush=True)
            del model, loss
            gc.collect()
    return [*lines, "", FAMILY_END]


def main() -> None:
    if os.environ.get("SECTION") == "families":
        splice("memory.md", family_table(), "Command: `")
        return
    seqs = [int(s) for s in os.environ.get("SEQS", "512,1024,2048").split(",")]
    bf16_seqs = [int(s) for s in os.environ.get("BF16_SEQS", "512").split(",")]
    steps = int(os.environ.get("STEPS", 3))
    agreement: list[str] = []
    settings = [(torch.float32, s) for s in seqs] + [(torch.bfloat16, s) for s in bf16_seqs]
    lines = smollm2_tables(settings, steps, agreement)
    parts = breakdown_table()
    block = block_table()
    text = "\n".join(
        [
            "# Training memory: LoRA, LoRA-FA, full fine-tuning — lorakit vs PEFT",
            "",
            __doc__.split("\n\n")[1].replace("\n", " "),
            "",
            f"Machine: {machine()}.",
            "",
            "| dtype | seq | row | trainable | saved MiB | saved vs PEFT LoRA | total MiB | total vs PEFT LoRA | median step s | time vs PEFT LoRA |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
            *lines,
            "",
            "Loss agreement of `reduce_activation_memory` (same adapters, same steps, fp32):",
            "",
            *[f"- {a}" for a in agreement],
            "",
            "## Where the saved activations come from (fp32, seq 512, MiB)",
            "",
            *parts,
            "",
            "## One LLaMA-7B-shaped decoder block (d=4096, d_ff=11008, 32 heads), bf16, seq 512, r=16",
            "",
            "| row | saved MiB | vs PEFT LoRA |",
            "|---|---:|---:|",
            *block,
            "",
            *family_table(),
            "",
            "Command: `.venv/bin/python bench/memory.py`",
            "",
        ]
    )
    print(text)
    write("memory.md", text)
    plot(lines, Path(__file__).parent / "results" / "memory.png")


if __name__ == "__main__":
    main()

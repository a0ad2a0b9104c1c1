"""QLoRA side by side: PEFT on a 4-bit base against lorakit's LoRA and LoRA-FA on the same base.

SmolLM2-135M, float32 activations, batch 1, seq 512, r=16, alpha=32, all 7 projections, one run:
PEFT QLoRA (transformers' ``BitsAndBytesConfig`` nf4 + double quant, ``get_peft_model``; no
``prepare_model_for_kbit_training``, whose default turns on gradient checkpointing: every row is
measured without checkpointing), lorakit QLoRA and QLoRA-FA on the same 4-bit base, each with and
without ``reduce_activation_memory``, and full-precision lorakit LoRA for reference. Columns:
base weight bytes (parameters, buffers and bitsandbytes' block scales and codebooks; adapter
tensors excluded), adapter + grads + AdamW bytes, saved activations (unique storages autograd keeps, parameters
excluded), total, median step time (forward + backward + AdamW, round-robin after a warm-up),
and the first step's loss against full precision (B = 0 there: the quantization error alone).
Then the saved bytes of the same rows on a bf16 model, and a LLaMA-7B-shaped decoder block (d=4096, d_ff=11008), bytes only, shows the scaling.

    .venv/bin/python bench/qlora.py    # STEPS=4 timed steps per row, BF16=0 skips the bf16
                                       # memory rows; --plot re-draws the PNG
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    PROJECTIONS,
    RESULTS,
    Peer,
    env_flag,
    fresh,
    machine,
    pyplot,
    run_interleaved,
    table_rows,
    write,
)

import lorakit as lk  # noqa: E402
from lorakit import quant  # noqa: E402
from lorakit.profile import MiB, count_saved  # noqa: E402

SEQ = 512
PEFT = "PEFT QLoRA (nf4, double quant)"


def weight_bytes(model: torch.nn.Module) -> int:
    """The base: parameters and buffers that are not adapter tensors (unique storages), plus
    every 4-bit weight's quant state tensors (block scales, their scales, codebooks)."""
    seen, total = set(), 0
    named = [*model.named_parameters(), *model.named_buffers()]
    tensors = [t for n, t in named if "lora_" not in n]
    for t in list(tensors):
        qs = quant.state(t)
        while qs is not None:  # block scales, their own scales (double quant), codebooks
            tensors += [
                x for x in (qs.absmax, qs.code, getattr(qs, "offset", None)) if x is not None
            ]
            qs = qs.state2 if qs.nested else None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def trainable_bytes(model: torch.nn.Module) -> int:
    """Adapter tensors (LoRA-FA's frozen A included), plus grads and 2 AdamW states of the
    trainable ones."""
    named = [*model.named_parameters(), *model.named_buffers()]
    adapter = sum(t.numel() * t.element_size() for n, t in named if "lora_" in n)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return adapter + 3 * grads


def builders(dtype: torch.dtype = torch.float32, full_precision: bool = True):
    from peft import LoraConfig, get_peft_model

    base4, _ = lk.load_model("smollm2-135m", dtype=dtype, quantize="nf4", double_quant=True)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS)

    def ours(model, method, reduce=False):
        def build():
            torch.manual_seed(0)
            cfg = lk.LoRAConfig(method=method, rank=16, alpha=32, targets=PROJECTIONS)
            m = lk.inject(fresh(model), cfg)
            return lk.reduce_activation_memory(m) if reduce else m

        return build

    rows = {
        PEFT: lambda: get_peft_model(fresh(base4), peft_cfg),
        "lorakit QLoRA": ours(base4, "lora"),
        "lorakit QLoRA + reduce": ours(base4, "lora", True),
        "lorakit QLoRA-FA": ours(base4, "lora_fa"),
        "lorakit QLoRA-FA + reduce": ours(base4, "lora_fa", True),
    }
    if full_precision:
        rows["lorakit LoRA, full precision"] = ours(lk.load_model("smollm2-135m")[0], "lora")
    return rows


def bf16_table() -> list[str]:
    """The same rows on a bf16 model (bitsandbytes computes in bf16), saved bytes only: one
    forward + backward per row (PEFT's bf16 layers run bf16 GEMMs, slow on CPUs without bf16
    units, so they are not timed here)."""
    ids = torch.randint(0, 49152, (1, SEQ), generator=torch.Generator().manual_seed(0))
    rows, ref = [], None
    for name, build in builders(torch.bfloat16, full_precision=False).items():
        model = build().train()
        loss, saved = count_saved(model, lambda m=model: m(input_ids=ids, labels=ids).loss)
        del loss, model
        gc.collect()
        ref = ref or saved
        rows.append(f"| {name} | {saved / MiB:.1f} | {saved / ref:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def smollm2_table(steps: int) -> list[str]:
    ids = torch.randint(0, 49152, (1, SEQ), generator=torch.Generator().manual_seed(0))
    peers = [Peer(name, build()) for name, build in builders().items()]
    gc.collect()
    run_interleaved(peers, ids, steps=steps)
    by = {p.name: p for p in peers}
    ref, fp = by[PEFT], by["lorakit LoRA, full precision"]
    rows = []
    for p in peers:
        w, t, s = weight_bytes(p.model), trainable_bytes(p.model), p.saved_bytes
        rel = abs(p.losses[0] - fp.losses[0]) / fp.losses[0]
        rows.append(
            f"| {p.name} | {w / MiB:.1f} | {t / MiB:.1f} | {s / MiB:.1f} | "
            f"{s / ref.saved_bytes:.2f}x | {(w + t + s) / MiB:.1f} | {p.median:.2f} | "
            f"{p.median / ref.median:.2f}x | {p.losses[0]:.4f} | {rel:.2e} |"
        )
    return rows


def block_table() -> list[str]:
    """One LLaMA-7B-shaped decoder block on a 4-bit base, fp32 activations: bytes only."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from lorakit.memory import RMSNorm, _gated_mlp_recompute_forward

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, layer_idx=0)
    for m in block.modules():  # a bare block is not initialised by transformers: N(0, 0.02)
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    block = lk.quantize(block, "nf4", keep_pattern=False)
    x = torch.randn(1, SEQ, 4096, requires_grad=True)
    pos = torch.arange(SEQ)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)

    def saved(model):
        def fn():
            out = model(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
            return (out[0] if isinstance(out, tuple) else out).pow(2).mean()

        return count_saved(model, fn)[1]

    peft_block = get_peft_model(
        fresh(block), LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)
    )
    rows = [(PEFT, weight_bytes(peft_block), trainable_bytes(peft_block), saved(peft_block))]
    del peft_block
    for method, label in (("lora", "QLoRA"), ("lora_fa", "QLoRA-FA")):
        m = lk.inject(
            fresh(block), lk.LoRAConfig(method=method, rank=16, alpha=32, targets=PROJECTIONS)
        )
        rows.append((f"lorakit {label}", weight_bytes(m), trainable_bytes(m), saved(m)))
        m.input_layernorm = RMSNorm(m.input_layernorm)  # reduce_activation_memory's block parts
        m.post_attention_layernorm = RMSNorm(m.post_attention_layernorm)
        m.mlp.forward = _gated_mlp_recompute_forward.__get__(m.mlp)
        rows.append((f"lorakit {label} + reduce (norms, MLP recompute)", *rows[-1][1:3], saved(m)))
        del m
        gc.collect()
    ref = rows[0][3]
    fp32_weights = sum(p.numel() * 4 for p in LlamaDecoderLayer(cfg, layer_idx=0).parameters())
    out = [
        f"| {n} | {w / MiB:.1f} | {t / MiB:.1f} | {s / MiB:.1f} | {s / ref:.2f}x |"
        for n, w, t, s in rows
    ]
    out.append(f"\nThe same block's weights in fp32: {fp32_weights / MiB:.1f} MiB.")
    return out


def plot(text: str, file: Path) -> None:
    plt = pyplot()
    rows = [r for r in table_rows(text) if len(r) == 10]
    names = [r[0] for r in rows]
    parts = [("base weights", 1), ("adapter + grads + AdamW", 2), ("saved activations", 3)]
    fig, ax = plt.subplots(figsize=(9, 4))
    left = [0.0] * len(rows)
    for label, col in parts:
        vals = [float(r[col]) for r in rows]
        ax.barh(names, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("MiB (SmolLM2-135M, batch 1, seq 512, r=16, fp32 activations)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    print(f"wrote {file}")


def main() -> None:
    md = RESULTS / "qlora.md"
    if "--plot" in sys.argv:
        plot(md.read_text(), RESULTS / "qlora.png")
        return
    steps = env_flag("STEPS", 4)
    lines = [
        "# QLoRA: PEFT and lorakit on the same 4-bit base, side by side",
        "",
        f"`.venv/bin/python bench/qlora.py` on {machine()}; peft, transformers and bitsandbytes "
        "as pinned in requirements.txt.",
        "",
        f"## SmolLM2-135M, nf4 + double quant, fp32 activations, batch 1, seq {SEQ}, r=16, all 7 "
        f"projections ({steps} timed steps per row, round-robin)",
        "",
        "| row | base weights MiB | adapter + grads + AdamW MiB | saved MiB | saved vs PEFT | total MiB "
        "| step s | step vs PEFT | first loss | vs full precision |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *smollm2_table(steps),
        "",
        f"## The same on a bf16 model (nf4, compute dtype bf16), seq {SEQ}: saved bytes only",
        "",
        "PEFT keeps its fp32 adapters' input as an fp32 copy per layer; lorakit keeps x in bf16.",
        "",
        "| row | saved MiB | saved vs PEFT |",
        "|---|---:|---:|",
        *(bf16_table() if env_flag("BF16", 1) else ["| (skipped: BF16=0) | | |"]),
        "",
        f"## One LLaMA-7B-shaped decoder block (d=4096, d_ff=11008, 32 heads), nf4, seq {SEQ}, "
        "r=16 (bytes only)",
        "",
        "| row | base weights MiB | adapter + grads + AdamW MiB | saved MiB | saved vs PEFT |",
        "|---|---:|---:|---:|---:|",
        *block_table(),
        "",
    ]
    text = "\n".join(lines)
    write("qlora.md", text)
    plot(text, RESULTS / "qlora.png")


if __name__ == "__main__":
    main()

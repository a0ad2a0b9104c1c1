"""LoRA on MoE experts: lorakit's grouped expert adapters vs PEFT's ``target_parameters``.

A Mixtral-shaped model, small but not a toy: hidden 512, 8 experts of width 1024 (top-2),
4 layers, 8 query / 4 key-value heads, vocab 4096, random weights, batch 1 x 512 tokens, fp32.
Every peer adapts the four attention projections and both expert tensors (``gate_up_proj``,
``down_proj``) with r=16, alpha=32, and starts from the same A and B (PEFT loads lorakit's
initial adapter), so the losses of every step agree.

Rows: PEFT LoRA; PEFT LoRA with A frozen (LoRA-FA as its authors ship it); lorakit LoRA; lorakit
LoRA-FA; lorakit LoRA-FA + ``reduce_activation_memory``. Reported in one run:
- saved: bytes autograd keeps for backward (unique storages, parameters and buffers excluded);
- step peak: the peak of live storages a whole training step allocates above the weights and
  optimizer states it starts with (forward, backward, AdamW), measured with the planner's own
  accounting (``lorakit.planner.tracker.live_peak``), so PEFT's per-forward W + ΔW of every
  expert counts and what kernels allocate inside themselves does not;
- step time: median of round-robin timed steps after one warm-up (forward + backward + AdamW).

    .venv/bin/python bench/moe.py          # STEPS=5 SEQ=512 to change
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Peer, env_flag, machine, run_interleaved, step, write  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.planner.tracker import live_peak  # noqa: E402
from lorakit.profile import MiB  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 1024,
    "router_aux_loss_coef": 0.0,
    "tie_word_embeddings": False,
}


def base() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **SHAPE))


def peers(folder: Path) -> list[Peer]:
    from peft import PeftModel

    config = lk.LoRAConfig(method="lora", rank=16, alpha=32, targets=ATTENTION + EXPERTS)
    ours = lk.inject(base(), config)
    lk.save_adapter(ours, folder / "lora")  # the shared start: same A, B = 0
    ours_fa = lk.inject(base(), config.replace(method="lora_fa"))
    _copy_a(ours, ours_fa)
    reduced = lk.inject(base(), config.replace(method="lora_fa"))
    _copy_a(ours, reduced)
    lk.reduce_activation_memory(reduced)
    peft = PeftModel.from_pretrained(base(), folder / "lora", is_trainable=True)
    peft_fa = PeftModel.from_pretrained(base(), folder / "lora", is_trainable=True)
    for n, p in peft_fa.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    return [
        Peer("PEFT LoRA (target_parameters)", peft),
        Peer("PEFT LoRA, A frozen", peft_fa),
        Peer("lorakit LoRA", ours),
        Peer("lorakit LoRA-FA", ours_fa),
        Peer("lorakit LoRA-FA + reduce", reduced),
    ]


def _copy_a(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give ``dst``'s adapters ``src``'s A (LoRA-FA keeps it frozen), so every row starts alike."""
    from lorakit.adapters import adapter_tensors

    theirs = adapter_tensors(dst, "default")
    with torch.no_grad():
        for path, adapter in adapter_tensors(src, "default").items():
            theirs[path].lora_A.copy_(adapter.lora_A)


def step_peak(peer: Peer, ids: torch.Tensor) -> int:
    """Live-storage peak of one more training step above what exists before it (weights,
    buffers, optimizer states), which are counted from the start and subtracted."""
    held = [*peer.model.parameters(), *peer.model.buffers()]
    held += [t for s in peer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    peak = live_peak(lambda: step(peer, lambda: peer.model(input_ids=ids, labels=ids).loss), held)
    return peak - sum(storages.values())


def main() -> None:
    seq, steps = env_flag("SEQ", 512), env_flag("STEPS", 5)
    ids = torch.randint(
        0, SHAPE["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1)
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = peers(Path(tmp))
    run_interleaved(rows, ids, steps)
    peaks = {p.name: step_peak(p, ids) for p in rows}
    ref = rows[0]
    lines = [
        "# MoE experts: lorakit vs PEFT target_parameters",
        "",
        f"Machine: {machine()}",
        "",
        f"Mixtral-shaped, random weights: {SHAPE}; batch 1 x {seq} tokens, fp32, r=16, alpha=32, "
        f"q/k/v/o + experts.gate_up_proj + experts.down_proj. {steps} timed steps per row, "
        f"round-robin after one warm-up. Reproduce: `.venv/bin/python bench/moe.py`.",
        "",
        "| row | saved MiB | vs PEFT | step peak MiB | vs PEFT | step s | vs PEFT | "
        "losses (steps 1, last) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in rows:
        lines.append(
            f"| {p.name} | {p.saved_bytes / MiB:.1f} | {p.saved_bytes / ref.saved_bytes:.2f}x | "
            f"{peaks[p.name] / MiB:.1f} | {peaks[p.name] / peaks[ref.name]:.2f}x | "
            f"{p.median:.3f} | {p.median / ref.median:.2f}x | "
            f"{p.losses[0]:.5f}, {p.losses[-2]:.5f} |"
        )
    pairs = [(rows[2], rows[0]), (rows[3], rows[1]), (rows[4], rows[1])]
    lines += [""] + [
        f"- {ours.name} vs {theirs.name}: largest |Δloss| over all {len(ours.losses)} steps "
        f"{max(abs(a - b) for a, b in zip(ours.losses, theirs.losses, strict=True)):.2g}"
        for ours, theirs in pairs
    ]
    lines += [
        "",
        "Every row trains from the same A and B = 0; LoRA-FA rows train B only, like PEFT's "
        "A-frozen row.",
    ]
    write("moe.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

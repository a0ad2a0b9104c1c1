"""Chat fine-tuning side by side: lorakit (padded, packed) and TRL's SFTTrainer + PEFT (padded, packed).

SmolLM2-135M-Instruct, the built-in ``shakespeare-dialogue`` conversations, LoRA r=16, alpha=32
on all linear layers, AdamW at lr 1e-3, fp32, loss on the assistant turns only. Every row trains
on the same conversations (those whose rendering fits ``MAX_LEN``, so no library truncates one),
one epoch of ``STEPS`` x ``BATCH``; TRL gets SmolLM2's own ChatML template with
``{% generation %}`` markers added (it renders the same text; TRL needs the markers for
``assistant_only_loss``). TRL's packed row packs the whole set into ``MAX_LEN`` rows (best-fit
decreasing, padding-free) and takes as many rows per step as give the same number of steps.
TRL's default activation checkpointing is turned off: no row checkpoints.

Columns: target and all tokens per second (timed from the second step on), the share of computed
positions that pad, median step time, bytes saved for backward on the first batch, and the
validation loss after training (lorakit's ``example_nll`` on the same held-out conversations
for every row).

    .venv/bin/pip install -r requirements-bench.txt torch==2.13.0   # TRL, benchmark-only
    .venv/bin/python bench/sft.py      # STEPS=12 BATCH=8 MAX_LEN=256 VAL=64
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import env_flag, machine, pyplot, write  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit import data  # noqa: E402
from lorakit.constants import IGNORE_INDEX  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.profile import MiB, count_saved  # noqa: E402
from lorakit.tasks import batch_loss, example_nll  # noqa: E402

STEPS, BATCH = env_flag("STEPS", 12), env_flag("BATCH", 8)
MAX_LEN, VAL = env_flag("MAX_LEN", 256), env_flag("VAL", 64)
LR = 1e-3
MARKED = (  # SmolLM2's template, the assistant's part inside {% generation %} markers
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endgeneration %}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversations(tok) -> tuple[list[dict], list[dict], list[dict]]:
    """(train records, their encodings, validation encodings): conversations that fit."""
    records = data.load_records("shakespeare-dialogue", "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = data.encode_chats(records, tok, 10**6)
        val = data.encode_chats(data.load_records("shakespeare-dialogue", "validation"), tok, 10**6)
    keep = [i for i, e in enumerate(encoded) if len(e["input_ids"]) <= MAX_LEN][: STEPS * BATCH]
    val = [e for e in val if len(e["input_ids"]) <= MAX_LEN][:VAL]
    return [records[i] for i in keep], [encoded[i] for i in keep], val


def n_targets(e: dict) -> int:
    return sum(y != IGNORE_INDEX for y in e["labels"][1:])


def lorakit_row(name: str, packing: bool, base, tok, train_ex, val_ex) -> dict:
    from lorakit.config import TrainConfig
    from lorakit.tasks import check_packing, make_batch

    torch.manual_seed(0)
    model = lk.inject(_copy(base), lk.LoRAConfig(rank=16, alpha=32, targets="all-linear"))
    if packing:
        check_packing(model)
    model.train()
    cfg = TrainConfig.from_flat({"max_len": MAX_LEN, "packing": packing})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    times, slots, saved = [], [], 0
    for s in range(STEPS):  # the loop of lorakit.train.train_step, one micro-batch a step
        part = train_ex[s * BATCH : (s + 1) * BATCH]
        t0 = time.perf_counter()
        batch = make_batch(part, cfg, tok.pad_token_id)
        if s == 0:
            loss, saved = count_saved(model, lambda b=batch: batch_loss(model, b))
        else:
            loss = batch_loss(model, batch)
        (loss / sum(n_targets(e) for e in part)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        slots.append(batch["input_ids"].numel())
    return _result(name, model, tok, train_ex, val_ex, times, sum(slots), saved)


def trl_row(name: str, packing: bool, base, tok, records, train_ex, val_ex) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times: list[float] = []
    slots: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    tok_trl = _copy(tok)
    tok_trl.chat_template = MARKED

    def build(rows: int):
        args = SFTConfig(
            output_dir=str(Path("/tmp") / f"lorakit-bench-trl-{packing}"),
            max_length=MAX_LEN,
            packing=packing,
            assistant_only_loss=True,
            per_device_train_batch_size=rows,
            num_train_epochs=1,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            gradient_checkpointing=False,  # TRL's default is on; every row here runs without it
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            seed=0,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            disable_tqdm=True,
        )
        return SFTTrainer(
            model=_copy(base),
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=tok_trl,
            peft_config=LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"
            ),
            callbacks=[Clock()],
        )

    trainer = build(BATCH)
    rows = BATCH
    if packing:  # as many packed rows per step as give the same STEPS steps
        rows = -(-len(trainer.train_dataset) // STEPS)
        trainer = build(rows)
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        slots.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    first = collate(
        [trainer.train_dataset[i] for i in range(min(rows, len(trainer.train_dataset)))]
    )
    first = {
        k: v
        for k, v in first.items()
        if k in ("input_ids", "attention_mask", "position_ids", "labels")
    }
    print(
        f"{name}: {sum(len(r['input_ids']) for r in trainer.train_dataset):,} tokens in TRL's dataset",
        flush=True,
    )
    model = trainer.model
    model.train()
    _, saved = count_saved(model, lambda: model(**first).loss)
    model.zero_grad(set_to_none=True)
    trainer.train()
    return _result(name, model, tok, train_ex, val_ex, times, sum(slots), saved)


def _copy(obj):
    import copy

    return copy.deepcopy(obj)


def _result(name, model, tok, train_ex, val_ex, times, slots, saved) -> dict:
    total = sum(len(e["input_ids"]) for e in train_ex)
    targets = sum(n_targets(e) for e in train_ex)
    steady = times[1:] or times  # the first step warms up
    share = sum(steady) / sum(times)
    loss, count = example_nll(model, val_ex, len(val_ex), tok.pad_token_id)
    row = {
        "name": name,
        "steps": len(times),
        "target_tps": targets * share / sum(steady),
        "all_tps": total * share / sum(steady),
        "padding": 1 - total / slots,
        "step_s": statistics.median(steady),
        "saved": saved,
        "val_loss": loss / count,
    }
    print(row, flush=True)
    return row


def plot(rows: list[dict], file: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.barh([r["name"] for r in rows], [r["target_tps"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"assistant (target) tokens / s, SmolLM2-135M, LoRA r=16, batch {BATCH}")
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def main() -> None:
    base, tok = load_model("smollm2-135m")
    records, train_ex, val_ex = conversations(tok)
    rows = [
        lorakit_row("lorakit, padded", False, base, tok, train_ex, val_ex),
        lorakit_row("lorakit, packed", True, base, tok, train_ex, val_ex),
    ]
    gc.collect()
    rows.append(
        trl_row("TRL SFTTrainer + PEFT, padded", False, base, tok, records, train_ex, val_ex)
    )
    gc.collect()
    rows.append(
        trl_row(
            "TRL SFTTrainer + PEFT, packed (bfd, padding-free)",
            True,
            base,
            tok,
            records,
            train_ex,
            val_ex,
        )
    )
    ref = rows[2]
    best = max(rows[2:], key=lambda r: r["target_tps"])
    lines = [
        "# Chat fine-tuning: lorakit and TRL + PEFT side by side",
        "",
        " ".join(line.strip() for line in __doc__.split("\n\n")[1].splitlines()),
        "",
        f"`.venv/bin/python bench/sft.py` on {machine()}.",
        "",
        f"{len(train_ex)} training conversations ({sum(len(e['input_ids']) for e in train_ex):,} "
        f"tokens, {sum(n_targets(e) for e in train_ex):,} assistant targets), {STEPS} steps of "
        f"{BATCH}, max_len {MAX_LEN}; {len(val_ex)} validation conversations.",
        "",
        "| row | steps | target tok/s | all tok/s | vs TRL padded | vs TRL best | padding | "
        "step s | saved MiB | val loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['target_tps']:.0f} | {r['all_tps']:.0f} | "
            f"{r['target_tps'] / ref['target_tps']:.2f}x | {r['target_tps'] / best['target_tps']:.2f}x | "
            f"{r['padding']:.1%} | {r['step_s']:.2f} | {r['saved'] / MiB:.0f} | {r['val_loss']:.4f} |"
        )
    write("sft.md", "\n".join(lines) + "\n")
    plot(rows, Path(__file__).parent / "results" / "sft.png")


if __name__ == "__main__":
    main()

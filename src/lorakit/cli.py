"""The ``lorakit`` command: a thin shell over the library (train, eval, merge, demo)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _targets(value: str) -> str | list[str]:
    """``all-linear``, a comma-separated list of module-name suffixes, or a regex (``re:...``)."""
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="embedded model (smollm2-135m, minilm), local HF folder or hub id",
    )
    p.add_argument(
        "--data",
        default="rotten-tomatoes",
        help="built-in dataset (rotten-tomatoes, shakespeare), .jsonl/.txt/.csv file, or a datasets name",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--max-len",
        type=int,
        default=256,
        help="tokens per example; longer prompts are cut from the left with a warning",
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--method",
        default="lora",
        choices=["lora", "lora_fa", "lors", "full"],
        help="adapter method, or full fine-tuning",
    )
    p.add_argument("--rank", type=int, default=16, help="adapter rank r")
    p.add_argument("--alpha", type=float, default=32.0, help="scaling numerator: s = alpha / r")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input")
    p.add_argument(
        "--init",
        default="kaiming",
        choices=["kaiming", "gaussian", "gradient_svd"],
        help="adapter A init; gradient_svd: top-r right singular vectors of the mean dense "
        "gradient over 128 training examples (LoRS / LoRA-GA)",
    )
    p.add_argument(
        "--val-data",
        default=None,
        help="validation data (default: the dataset's validation split; none for a local file)",
    )
    p.add_argument(
        "--grad-correction",
        action="store_true",
        help="LoRA-FA v2: precondition B's gradient with (A Aᵀ)⁻¹ / s²",
    )
    p.add_argument(
        "--reduce-memory",
        action="store_true",
        help="reduce_activation_memory: chunked loss, norm/MLP recompute, sdpa (causal LMs)",
    )
    p.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing per transformer block (recompute each block in backward)",
    )
    p.add_argument(
        "--targets",
        type=_targets,
        default="all-linear",
        help="all-linear | comma-separated suffixes (q_proj,v_proj) | re:<regex>",
    )
    p.add_argument(
        "--task",
        default="auto",
        choices=["auto", "lm", "classify", "sft", "seq-cls"],
        help="auto: labelled data -> classify (causal LM, label words) or seq-cls (encoder + head); "
        "prompt/completion -> sft; text -> lm",
    )
    p.add_argument(
        "--prompt",
        default="auto",
        choices=["auto", "chat", "plain"],
        help="classification prompt: the chat template, a short plain prompt, or chat when the tokenizer has one",
    )
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    p.add_argument(
        "--batch-size", type=int, default=16, help="global batch size (examples per optimizer step)"
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=0,
        help="examples per forward pass (gradient accumulation); 0: the whole batch",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=float, default=0.06, help="warmup as a fraction of max steps")
    p.add_argument(
        "--schedule",
        default="cosine",
        choices=["cosine", "linear", "constant"],
        help="learning-rate schedule after warmup",
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end)"
    )
    p.add_argument(
        "--eval-examples", type=int, default=0, help="validation examples per evaluation (0: all)"
    )
    p.add_argument(
        "--save-every", type=int, default=50, help="checkpoint every N steps (0: at the end)"
    )
    p.add_argument(
        "--output", default="runs/lorakit", help="output folder: adapter, checkpoint, metrics, plot"
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh even if --output holds a checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda if available; under torchrun cuda:LOCAL_RANK), cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--strategy",
        default="ddp",
        choices=["ddp", "fsdp"],
        help="under torchrun: ddp (replicated base, adapter gradients all-reduced) or fsdp "
        "(FSDP2, every transformer block sharded over the ranks)",
    )


def _train_config(a: argparse.Namespace):
    from .train import TrainConfig

    fields = {
        "model": a.model, "data": a.data, "val_data": a.val_data, "method": a.method,
        "rank": a.rank, "alpha": a.alpha, "dropout": a.dropout, "targets": a.targets,
        "init": a.init, "grad_correction": a.grad_correction, "reduce_memory": a.reduce_memory, "checkpointing": a.checkpointing,
        "task": a.task, "prompt": a.prompt, "max_steps": a.max_steps, "batch_size": a.batch_size,
        "micro_batch_size": a.micro_batch_size, "lr": a.lr, "warmup": a.warmup,
        "schedule": a.schedule, "weight_decay": a.weight_decay, "max_grad_norm": a.max_grad_norm,
        "dtype": a.dtype, "seed": a.seed, "max_len": a.max_len, "eval_every": a.eval_every,
        "eval_examples": a.eval_examples, "save_every": a.save_every, "output": a.output,
        "progress": not a.no_progress, "strategy": a.strategy, "device": a.device,
    }  # fmt: skip
    return TrainConfig(**fields)


def table(rows: list[tuple[str, str]], title: str = "") -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def cmd_train(a: argparse.Namespace) -> int:
    from . import distributed
    from .train import train

    try:
        result = train(_train_config(a), resume=a.resume, overwrite=a.overwrite)
    finally:
        distributed.teardown(distributed.setup())
    if os.environ.get("RANK", "0") == "0":
        print(_summary_table(result["summary"]))
    return 0


def _summary_table(s: dict) -> str:
    rows = [
        ("method", s["method"]),
        ("steps", str(s["steps"])),
        (
            "trainable params",
            f"{s['trainable_params']:,} of {s['total_params']:,} ({100 * s['trainable_params'] / s['total_params']:.2f} %)",
        ),
        ("time", f"{s['time_s']:.1f} s"),
        ("tokens/s", f"{s['tokens_per_s']:.0f}"),
        ("peak memory", f"{s['peak_memory_mib']:.0f} MiB"),
        ("final train loss", f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-"),
    ]
    rows += [(k, f"{v:.4f}") for k, v in s.items() if k.startswith("val_")]
    rows.append(("output", s["output"]))
    return table(rows, "Training summary")


def cmd_eval(a: argparse.Namespace) -> int:
    from . import data
    from .adapters import load_adapter
    from .config import DTYPES
    from .evaluate import accuracy, classify, perplexity
    from .models import load_model
    from .train import classification_prompt, is_causal_lm, predict_classes

    records = data.load_records(a.data, a.split)
    if a.limit:
        records = records[: a.limit]
    labelled = not a.perplexity and "label" in records[0]
    names = (
        (data.label_names(a.data) or [str(v) for v in sorted({r["label"] for r in records})])
        if labelled
        else None
    )
    causal = is_causal_lm(a.model)
    result: dict[str, float | str | int] = {
        "model": a.model,
        "adapter": a.adapter or "-",
        "data": a.data,
        "split": a.split,
    }
    if labelled and not causal:  # encoder + classification head (trained with the adapter)
        model, tok = load_model(
            a.model, task="sequence-classification", dtype=DTYPES[a.dtype], num_labels=len(names)
        )
    else:
        model, tok = load_model(a.model, dtype=DTYPES[a.dtype])
    if a.adapter:
        load_adapter(model, a.adapter)
    labels = [r["label"] for r in records] if labelled else None
    if labelled and not causal:
        result["accuracy"] = accuracy(predict_classes(model, tok, records, a.max_len), labels)
    elif labelled:
        template, words = classification_prompt(tok, names, a.prompt)
        preds = classify(
            model, tok, [template.replace("{text}", r["text"]) for r in records], words
        )
        result["accuracy"] = accuracy(preds, labels)
    else:
        result["perplexity"] = perplexity(model, data.lm_blocks(records, tok, a.max_len))
    result["examples"] = len(records)
    print(json.dumps(result, indent=2))
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from .adapters import load_adapter
    from .config import DTYPES
    from .inject import merge
    from .models import load_model

    model, tok = load_model(a.model, dtype=DTYPES[a.dtype])
    merge(load_adapter(model, a.adapter))
    out = Path(a.output)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"merged model written to {out}")
    return 0


def cmd_prune(a: argparse.Namespace) -> int:
    from .config import DTYPES
    from .models import load_model
    from .prune import prune

    model, tok = load_model(a.model, dtype=DTYPES[a.dtype])
    sparsity = a.sparsity if ":" in a.sparsity else float(a.sparsity)
    calibration = None if a.data == "shakespeare" else _calibration_texts(a.data)
    report = prune(
        model,
        a.method,
        sparsity,
        calibration,
        tokenizer=tok,
        n_samples=a.samples,
        seq_len=a.seq_len,
    )
    rows = [(path, f"{frac:.1%}") for path, frac in report.items()]
    print(table(rows, f"Achieved sparsity ({a.method}, {a.sparsity})"))
    out = Path(a.output)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"pruned model written to {out}")
    return 0


def _calibration_texts(source: str) -> list[str]:
    from . import data

    return [
        r.get("text") or r.get("prompt", "") + r.get("completion", "")
        for r in data.load_records(source, "train")
    ]


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo, run_sparse_demo

    if a.sparse:
        output = a.output if a.output != "runs/demo" else "runs/demo-sparse"
        return run_sparse_demo(output=output, max_steps=a.max_steps, seed=a.seed)
    return run_demo(output=a.output, max_steps=a.max_steps, seed=a.seed, method=a.method)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Memory-efficient low-rank fine-tuning (LoRA, LoRA-FA, LoRS)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune a model with an adapter (or fully)",
        description="Fine-tune a model on a dataset; writes adapter, checkpoint, metrics.jsonl/csv, loss.png and summary.json to --output.",
    )
    _train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="accuracy (labelled data) or perplexity (text)",
        description="Evaluate a model, optionally with an adapter: label-word accuracy on labelled data, else perplexity.",
    )
    _common(p)
    p.add_argument("--adapter", default=None, help="adapter folder to load first")
    p.add_argument(
        "--split", default="test", choices=["train", "validation", "test"], help="data split"
    )
    p.add_argument(
        "--perplexity", action="store_true", help="perplexity even if the data has labels"
    )
    p.add_argument(
        "--limit", type=int, default=0, help="evaluate the first N examples only (0: all)"
    )
    p.add_argument(
        "--prompt",
        default="auto",
        choices=["auto", "chat", "plain"],
        help="classification prompt style (use the one the adapter was trained with)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "merge",
        help="merge an adapter into its base and save a plain HF model",
        description="Load a base model and an adapter, merge, and save a plain Hugging Face folder.",
    )
    p.add_argument("--model", default="smollm2-135m", help="base model")
    p.add_argument("--adapter", required=True, help="adapter folder (lorakit or PEFT)")
    p.add_argument("--output", required=True, help="output folder for the merged model")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype"
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "prune",
        help="prune a model to unstructured or N:M sparsity (magnitude, Wanda, SparseGPT)",
        description="Prune the linear layers of a model (embeddings and head untouched) with "
        "sequential block-by-block calibration, report the sparsity per layer and save an HF folder.",
    )
    p.add_argument("--model", default="smollm2-135m", help="model to prune")
    p.add_argument(
        "--method",
        default="wanda",
        choices=["magnitude", "wanda", "sparsegpt"],
        help="pruning method",
    )
    p.add_argument("--sparsity", default="0.5", help="a fraction in (0, 1) or N:M such as 2:4")
    p.add_argument("--data", default="shakespeare", help="calibration text (built-in name or file)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype"
    )
    p.add_argument("--output", required=True, help="output folder for the pruned model")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "demo",
        help="the main job: zero-shot -> LoRA fine-tune -> merge, on the embedded model and data",
        description="On SmolLM2-135M and rotten-tomatoes: zero-shot accuracy, LoRA fine-tune, accuracy again, save the adapter, merge, check the merged model agrees.",
    )
    p.add_argument("--output", default="runs/demo", help="output folder")
    p.add_argument("--max-steps", type=int, default=None, help="override the demo's training steps")
    p.add_argument(
        "--method",
        default="lora",
        choices=["lora", "lora_fa"],
        help="adapter method to fine-tune with",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--sparse",
        action="store_true",
        help="the sparse story instead: Wanda 2:4 pruning -> perplexity drop -> LoRS fine-tune "
        "-> recovery -> merge -> verify every pruned weight is still zero (output: "
        "runs/demo-sparse)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        code = args.func(args)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        NotImplementedError,
        FloatingPointError,
    ) as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command != "demo" and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 talks
        print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

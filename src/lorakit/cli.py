"""The ``lorakit`` command: a thin shell over the library (train, eval, merge, prune, demo,
generate, plan)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .config import parse_list  # noqa: E402
from .fileio import save_pretrained  # noqa: E402
from .flags import add_config_flags, load_options, read_config_file  # noqa: E402
from .generate_cli import add_command as generate_command  # noqa: E402
from .interrupt import report as report_interrupt  # noqa: E402
from .progress import add_flags as progress_flags  # noqa: E402


def _common(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig

    only = ("model", "data", "dtype", "quantize", "double_quant", "seed", "max_len")
    add_config_flags(p, TrainConfig, only=(*only, "attn_implementation"), suppress=False)


def _train_args(p: argparse.ArgumentParser) -> None:
    from .config import FULL, TRAIN_ADAPTER, LoRAConfig, TrainConfig

    p.add_argument(
        "--config",
        default=None,
        help="run file (YAML, JSON or TOML) with flat keys named like the flags below; "
        "flags given override it",
    )
    add_config_flags(p, TrainConfig, skip=("adapter",))
    # use_rslora's default depends on the method: shown as None (derived), not lora's False.
    add_config_flags(p, LoRAConfig, defaults=TRAIN_ADAPTER.replace(use_rslora=None))
    for action in p._actions:  # --method: an adapter method, or full fine-tuning
        if action.dest == "method":
            action.choices = [*action.choices, FULL]
            action.help = "adapter method, or full: full fine-tuning without an adapter"
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh even if --output holds a checkpoint"
    )


RUN_ONLY_FLAGS = ("config", "resume", "overwrite", "command", "func")


def _train_config(a: argparse.Namespace):
    from .config import TrainConfig

    flags = {k: v for k, v in vars(a).items() if k not in RUN_ONLY_FLAGS}
    values = read_config_file(a.config) if a.config else {}
    return TrainConfig.from_flat({**values, **flags})


def table(rows: list[tuple[str, str]], title: str = "") -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def cmd_train(a: argparse.Namespace) -> int:
    from . import distributed
    from .api import train  # --fit's planning step lives there

    try:
        summary = train(_train_config(a), resume=a.resume, overwrite=a.overwrite)
    finally:
        distributed.teardown(distributed.setup())
    if os.environ.get("RANK", "0") == "0":
        print(_summary_table(summary))
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
    rows += [("note", n) for n in s.get("notes", [])]  # early stopping, the best adapter
    rows.append(("output", s["output"]))
    return table(rows, "Training summary")


def cmd_eval(a: argparse.Namespace) -> int:
    from . import data
    from .adapters import load_adapter
    from .models import load_model
    from .scoring import eval_classes, saved_spec, score
    from .tasks import is_causal_lm

    records = data.load_records(a.data, a.split)
    spec = saved_spec(a.adapter)
    labelled = not a.perplexity and "label" in records[0]
    names = {"data_names": data.label_names(a.data), "label_names": a.label_names}
    causal = is_causal_lm(a.model)
    classes = None
    if labelled and not causal:  # encoder + classification head (trained with the adapter)
        classes = eval_classes(spec, records, **names)
        model, tok = load_model(
            a.model,
            task="sequence-classification",
            num_labels=len(classes.values),
            **load_options(a),
        )
    else:
        model, tok = load_model(a.model, **load_options(a))
        if labelled:
            classes = eval_classes(spec, records, tokenizer=tok, prompt=a.prompt, **names)
    if a.adapter:
        load_adapter(model, a.adapter)
    result: dict[str, Any] = {"model": a.model, "adapter": a.adapter or "-", "data": a.data}
    result["split"] = a.split
    result |= score(
        model,
        tok,
        records,
        classes=classes,
        chat_template=a.chat_template or spec.get("chat_template"),
        max_len=a.max_len,
        batch_size=a.batch_size,
        limit=a.limit,
        perplexity=a.perplexity,
    )
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
    save_pretrained(out, model, tok)  # files 0644 under a 022 umask, as adapters are
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
    out = Path(a.output)
    save_pretrained(out, model, tok)  # files 0644 under a 022 umask, as adapters are
    (out / "sparsity.json").write_text(json.dumps(report, indent=2))  # per layer
    mean, where = sum(report.values()) / len(report), out / "sparsity.json"
    print(f"sparsity {mean:.1%} ({a.method} {a.sparsity}, mean of {len(report)} layers: {where})")
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
        if a.quantize != "none":
            raise ValueError(
                "demo --sparse runs in full precision; --quantize applies to the LoRA demo "
                "(for LoRS on 4 bits: lorakit train --method lors --quantize nf4 on a pruned model)"
            )
        output = a.output if a.output != "runs/demo" else "runs/demo-sparse"
        return run_sparse_demo(output=output, max_steps=a.max_steps, seed=a.seed)
    return run_demo(
        output=a.output, max_steps=a.max_steps, seed=a.seed, method=a.method, quantize=a.quantize
    )


def _train_command(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model with an adapter (or fully)",
        description="Fine-tune a model on a dataset; writes adapter, checkpoint, metrics.jsonl/csv, loss.png and summary.json to --output.",
    )
    _train_args(p)
    p.set_defaults(func=cmd_train)


def _eval_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy (labelled data), assistant-token loss (conversations) or perplexity (text)",
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
        "--limit",
        type=int,
        default=0,
        help="score the first N examples (labelled, prompt/completion, chat data) or, on plain "
        "text, the first N windows of --max-len tokens (not N documents); 0: all",
    )
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    p.add_argument(
        "--prompt",
        default=None,
        choices=["auto", "chat", "plain"],
        help="classification prompt style (default: the one the adapter was trained with, "
        "else auto)",
    )
    p.add_argument(
        "--label-names",
        type=parse_list,
        default=(),
        help="class names for labels 0, 1, ... (default: the adapter's, else the data's)",
    )
    p.add_argument("--chat-template", default=None, help="conversations: a Jinja template file")
    p.set_defaults(func=cmd_eval)


def _merge_command(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge an adapter into its base and save a plain HF model",
        description="Load a base model and an adapter, merge, and save a plain Hugging Face folder.",
    )
    p.add_argument("--model", default="smollm2-135m", help="base model")
    p.add_argument("--adapter", required=True, help="adapter folder (lorakit or PEFT)")
    p.add_argument("--output", required=True, help="output folder for the merged model")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype"
    )
    p.set_defaults(func=cmd_merge)


def _prune_command(sub) -> None:
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


def _demo_command(sub) -> None:
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
        "--quantize",
        default="none",
        choices=["none", "nf4", "fp4"],
        help="fine-tune on a 4-bit base (QLoRA, bitsandbytes) (default: 'none')",
    )
    p.add_argument(
        "--sparse",
        action="store_true",
        help="the sparse story instead: Wanda 2:4 pruning -> perplexity drop -> LoRS fine-tune "
        "-> recovery -> merge -> verify every pruned weight is still zero (output: "
        "runs/demo-sparse)",
    )
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Memory-efficient low-rank fine-tuning (LoRA, LoRA-FA, LoRS)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_command(sub)
    _eval_command(sub)
    _merge_command(sub)
    _prune_command(sub)
    _demo_command(sub)
    generate_command(sub)
    from .planner.cli import add_command as plan_command

    plan_command(sub)
    progress_flags(sub)  # --progress / --no-progress on every command
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
        ImportError,
    ) as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: no traceback; train prints its --resume command
        given = sys.argv[1:] if argv is None else argv
        return report_interrupt(args.command, e, given, lambda: _train_config(args).output)
    if args.command != "demo" and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 talks
        print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

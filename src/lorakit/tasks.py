"""What a run trains on and how it is scored: tasks, prompts, batches, losses, metrics.

A task turns records (see :mod:`lorakit.data`) into token examples and a loss:

- ``lm``: windows of ``max_len`` tokens, loss on every token, perplexity on validation windows;
- ``sft``: prompt + completion, loss on the completion only;
- ``chat``: conversations rendered with the chat template, loss on the assistant turns only;
- ``classify``: a causal LM answers a prompt with a label word (loss on that word), accuracy;
- ``seq-cls``: an encoder with a classification head (trained fully next to the adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import progress
from .classify import Classes, classes_for, classify, prompt_prefix_length
from .config import TrainConfig
from .constants import IGNORE_INDEX as IGNORE
from .distributed import SINGLE, Context
from .evaluate import accuracy, left_pad, nll, to_device, token_losses

# Classification heads that a sequence-classification model trains fully next to the adapter.
HEADS = ("classifier", "score")


@dataclass
class Prepared:
    """Tokenised training data and what evaluation needs."""

    task: str
    train: list[dict[str, list[int]]]
    val_records: list[dict[str, Any]]
    val_blocks: torch.Tensor | None = None
    val_examples: list[dict[str, list[int]]] | None = None  # sft / chat: validation loss
    classes: Classes | None = None  # classify / seq-cls: decided once, saved with the adapter
    chat_template: str | None = None  # chat: the Jinja template the examples were rendered with

    def spec(self) -> dict[str, Any]:
        """How this run's inputs are encoded, for ``lorakit eval`` / ``generate`` to reuse (saved
        with the adapter)."""
        spec: dict[str, Any] = {"task": self.task}
        if self.classes is not None:
            spec["classes"] = self.classes.to_dict()
        if self.chat_template is not None:
            spec["chat_template"] = self.chat_template
        return spec


def is_causal_lm(model_name: str) -> bool:
    """Whether a model folder / embedded name is a causal LM (from its config, without weights)."""
    from transformers import AutoConfig

    from .models import resolve

    archs = AutoConfig.from_pretrained(resolve(model_name)).architectures or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def resolve_task(cfg: TrainConfig, first: dict[str, Any]) -> str:
    if cfg.task != "auto":
        return cfg.task
    if "label" in first:
        return "classify" if is_causal_lm(cfg.model) else "seq-cls"
    if "messages" in first:
        return "chat"
    return "sft" if "prompt" in first else "lm"


def load_splits(cfg: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train records, and validation records: ``val_data`` if given, else the data's own
    validation split for built-in / hub datasets. A local file has no split of its own (every
    split is the whole file), so it gets no validation unless ``val_data`` names one."""
    from . import data

    train = data.load_records(cfg.data, "train")
    if cfg.val_data is not None:
        return train, data.load_records(cfg.val_data, "validation")
    if Path(cfg.data).expanduser().exists():
        return train, []
    try:
        val = data.load_records(cfg.data, "validation")
    except (ValueError, KeyError):
        val = []
    return train, val


def run_classes(cfg: TrainConfig, records: list[dict[str, Any]], tokenizer=None) -> Classes:
    """The run's classes (:func:`lorakit.classify.classes_for`): ``cfg.label_names``, else the
    data's own names, else the training records' label values; with a tokenizer, the prompt and
    answers of ``cfg.prompt``'s style."""
    from . import data

    return classes_for(
        records,
        names=cfg.label_names,
        data_names=data.label_names(cfg.data),
        tokenizer=tokenizer,
        style=cfg.prompt,
    )


def prepare_data(cfg: TrainConfig, tokenizer, task: str, train, val) -> Prepared:
    from . import data

    if task == "seq-cls":
        classes = run_classes(cfg, train)
        enc = tokenizer([r["text"] for r in train], truncation=True, max_length=cfg.max_len)
        examples = [
            {"input_ids": ids, "label": classes.index(r["label"], f"training record {i}")}
            for i, (ids, r) in enumerate(zip(enc["input_ids"], train, strict=True))
        ]
        return Prepared(task, examples, val, classes=classes)
    if task == "classify":
        classes = run_classes(cfg, train, tokenizer)
        examples = data.encode_examples(
            train,
            tokenizer,
            cfg.max_len,
            template=classes.template,
            label_words=list(classes.words),
            label_index=classes.index,
        )
        return Prepared(task, examples, val, classes=classes)
    if task in ("sft", "chat"):
        jinja = data.chat_template(tokenizer, cfg.chat_template) if task == "chat" else None

        def encode(rs):
            if task == "sft":
                return data.encode_examples(rs, tokenizer, cfg.max_len)
            return data.encode_chats(rs, tokenizer, cfg.max_len, jinja)

        return Prepared(
            task,
            encode(train),
            val,
            val_examples=encode(val) if val else None,
            chat_template=jinja if cfg.chat_template else None,
        )
    blocks = data.lm_blocks(train, tokenizer, cfg.max_len)
    examples = [{"input_ids": b.tolist(), "labels": b.tolist()} for b in blocks]
    val_blocks = data.lm_blocks(val, tokenizer, cfg.max_len) if val else None
    return Prepared(task, examples, val, val_blocks=val_blocks)


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad, so completions end in the last column and only their logits are computed.

    Sequence-classification examples (a ``label`` int) are right-padded, as encoders expect.
    ``labels`` are -100 on padding and on each row's first token (nothing predicts it).
    """
    _check_examples(examples, pad_id)
    if "label" in examples[0]:
        ids, mask = left_pad([e["input_ids"][::-1] for e in examples], pad_id)
        labels = torch.tensor([e["label"] for e in examples])
        return {"input_ids": ids.flip(1), "attention_mask": mask.flip(1), "labels": labels}
    ids, mask = left_pad([e["input_ids"] for e in examples], pad_id)
    # A row's first token is predicted by nothing (a pad position, after left padding).
    labels, _ = left_pad([[IGNORE, *e["labels"][1:]] for e in examples], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batch(examples: list[dict[str, Any]], cfg: TrainConfig, pad_id: int):
    """A micro-batch: packed rows with ``cfg.packing`` (token examples), else padded rows."""
    if cfg.packing and "labels" in examples[0]:
        from .data.packing import collate_packed

        _check_examples(examples, pad_id)
        return collate_packed(examples, cfg.max_len, pad_id)
    return collate(examples, pad_id)


@torch.no_grad()
def check_packing(model: nn.Module) -> None:
    """Refuse packing for a model whose attention crosses packed example boundaries: two short
    random examples packed in one row must give the second the logits it has alone."""
    from .evaluate import forward_logits

    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    name = f"{type(model).__name__} (attention {attention})"
    if not hasattr(model, "get_input_embeddings"):
        raise ValueError(
            f"--packing needs a model that takes position_ids (a transformers causal LM); "
            f"{name} is not one"
        )
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    a, b = (
        torch.randint(0, vocab, (1, 5), generator=g),
        torch.randint(0, vocab, (1, 4), generator=g),
    )
    device = next(model.parameters()).device
    row, b = torch.cat([a, b], 1).to(device), b.to(device)
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        packed = forward_logits(model, row, None, 9, positions)[:, 5:].float()
        alone = forward_logits(model, b, None, 4).float()
    except TypeError as e:
        raise ValueError(
            f"--packing needs a model that takes position_ids; {name} does not ({e})"
        ) from e
    finally:
        model.train(was_training)
    if (packed - alone).abs().max() > 0.05 * alone.std() + 1e-3:
        raise ValueError(
            f"--packing: {name} attends across packed examples (its logits change when another "
            "example precedes it in the row); pack a transformers causal LM with sdpa, eager or "
            "flash attention, or train without --packing"
        )


def _check_examples(examples: list[dict[str, Any]], pad_id: int) -> None:
    if not examples:
        raise ValueError("collate got an empty batch")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an int token id, got {pad_id!r}")
    for i, example in enumerate(examples):
        ids, labels = example.get("input_ids"), example.get("labels", example.get("label"))
        if ids is None or labels is None:
            raise ValueError(
                f"example {i} needs 'input_ids' and 'labels' (or a 'label' class), got keys "
                f"{sorted(example)}"
            )
        if not ids:
            raise ValueError(f"example {i} has no input_ids")
        if "labels" in example and len(ids) != len(labels):
            raise ValueError(
                f"example {i} has {len(ids)} input_ids and {len(labels)} labels; they must be "
                "equal and non-zero"
            )


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed loss of a micro-batch (token losses for LMs, example losses for classifiers)."""
    if batch["labels"].dim() == 1:
        batch = to_device(batch, model)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    return token_losses(model, batch)[0]


def n_targets(examples: list[dict[str, Any]]) -> int:
    """How many loss terms a global batch has: examples, or label tokens after the shift."""
    if "label" in examples[0]:
        return len(examples)
    return sum(sum(1 for y in e["labels"][1:] if y != IGNORE) for e in examples)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def eval_batch_size(cfg: TrainConfig, ctx: Context = SINGLE) -> int:
    """Validation runs at the training micro-batch (per rank), so that it never holds more than
    a training forward does at the same shape (what ``lorakit plan`` plans)."""
    return cfg.micro_batch_size or max(cfg.batch_size // ctx.world, 1)


def evaluate(
    model, tokenizer, prep: Prepared, cfg: TrainConfig, split_records=None, ctx: Context = SINGLE
) -> dict[str, float]:
    """Validation metrics, at the training micro-batch. Distributed: each rank evaluates a
    strided share (padded so every rank runs the same forward passes) and the results are
    combined; every rank gets the metrics."""
    from .distributed import all_gather, all_sum, interleave, split_evenly

    records = split_records if split_records is not None else prep.val_records
    if cfg.eval_examples:
        records = records[: cfg.eval_examples]
    batch = eval_batch_size(cfg, ctx)

    def predictions(fn) -> list[int]:
        mine, real = split_evenly(records, ctx)
        preds = fn(mine)[:real] if mine else []
        return interleave(all_gather(preds, ctx), len(records))

    classes = prep.classes
    if prep.task in ("seq-cls", "classify") and records:
        labels = [
            classes.index(r["label"], f"validation record {i}") for i, r in enumerate(records)
        ]
    if prep.task == "seq-cls" and records:
        preds = predictions(lambda rs: predict_classes(model, tokenizer, rs, cfg.max_len, batch))
        return {"accuracy": accuracy(preds, labels)}
    if prep.task == "classify" and records:
        words = classes.words
        # Every rank caches the whole set's shared prefix: the same forward passes everywhere.
        shared = (
            prompt_prefix_length(tokenizer, classes.prompts(records), words)
            if ctx.enabled
            else None
        )
        preds = predictions(
            lambda rs: classify(
                model,
                tokenizer,
                classes.prompts(rs),
                words,
                batch_size=batch,
                shared_prefix=shared,
            )
        )
        return {"accuracy": accuracy(preds, labels)}
    if prep.val_examples and split_records is None:  # sft / chat: loss on the targets
        examples = prep.val_examples[: cfg.eval_examples or None]
        mine, real = split_evenly(examples, ctx)
        pad = pad_token_id(tokenizer)
        total, count = example_nll(model, mine, real, pad, batch) if mine else (0, 0)
        total, count = all_sum([total, count], ctx)
        return {"loss": total / max(count, 1)}
    if prep.task == "lm" and prep.val_blocks is not None and split_records is None:
        blocks = list(prep.val_blocks[: cfg.eval_examples or None])
        mine, real = split_evenly(blocks, ctx)
        total, count = nll(model, torch.stack(mine), batch, real=real) if mine else (0.0, 0)
        total, count = all_sum([total, count], ctx)
        return {"perplexity": math.exp(total / max(count, 1))}
    return {}


@torch.no_grad()
def predict_classes(model, tokenizer, records, max_len: int, batch_size: int = 64) -> list[int]:
    """Argmax class of a sequence-classification model for each record's text."""
    was_training = model.training
    model.eval()
    preds: list[int] = []
    for i in progress.batch_starts(len(records), batch_size, desc="classify", unit="example"):
        texts = [r["text"] for r in records[i : i + batch_size]]
        enc = tokenizer(
            texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt"
        )
        preds.extend(model(**to_device(dict(enc), model)).logits.argmax(-1).tolist())
    model.train(was_training)
    return preds


@torch.no_grad()
def example_nll(
    model: nn.Module, examples: list[dict[str, Any]], real: int, pad_id: int, batch_size: int = 8
) -> tuple[float, int]:
    """Summed loss over the targets of ``examples`` and their count; examples from index ``real``
    on (distributed padding) run with no targets."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in progress.batch_starts(len(examples), batch_size, desc="loss", unit="example"):
        part = [
            e if i + j < real else {**e, "labels": [IGNORE] * len(e["labels"])}
            for j, e in enumerate(examples[i : i + batch_size])
        ]
        loss, n = token_losses(model, collate(part, pad_id))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total, count

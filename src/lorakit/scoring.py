"""``lorakit eval``: score a model (and its adapter) on a data split, encoding the inputs exactly as
the adapter's training run did (its task, classes, prompt and chat template, saved with the
adapter as ``lorakit_task``), and report what that run's validation reports.

- labelled records: accuracy over the run's classes (label-word answers for a causal LM, the
  head's outputs for an encoder);
- conversations: the loss on the assistant tokens;
- prompt / completion records: the loss on the completion tokens (the eos token included), which
  is the training run's ``val_loss``;
- plain text: perplexity over windows of ``max_len`` tokens.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from torch import nn

from .classify import Classes, classes_for, classify
from .evaluate import accuracy, nll


def saved_spec(adapter: str | os.PathLike | None) -> dict[str, Any]:
    """The input encoding an adapter was trained with (``{}`` when it records none: an adapter
    saved by PEFT or by ``lk.save_adapter``)."""
    if not adapter:
        return {}
    from .peft_format import read_adapter

    text = read_adapter(adapter).metadata.get("lorakit_task")
    if not text:
        return {}
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{adapter}: its lorakit_task metadata is not valid JSON ({e})") from e
    if not isinstance(spec, dict) or "task" not in spec:
        raise ValueError(f"{adapter}: its lorakit_task metadata has no task: {text[:200]!r}")
    return spec


def eval_classes(
    spec: dict[str, Any],
    records: list[dict[str, Any]],
    *,
    data_names: list[str] | None,
    label_names: tuple[str, ...] = (),
    tokenizer: Any = None,
    prompt: str | None = None,
) -> Classes:
    """The adapter's classes when it saved them (a ``prompt`` style given explicitly rebuilds the
    prompt and answers for the same classes), else those of ``records`` (the whole split, never a
    ``--limit``-ed part), named by ``label_names`` or the data's own names."""
    if "classes" in spec:
        saved = Classes.from_dict(spec["classes"])
        if label_names and tuple(label_names) != saved.names:
            raise ValueError(
                f"--label-names {list(label_names)} differ from the adapter's classes "
                f"{list(saved.names)}; leave --label-names out to use the adapter's"
            )
        if prompt is None or tokenizer is None or not saved.template:
            return saved
        rebuilt = classes_for([], names=saved.names, tokenizer=tokenizer, style=prompt)
        return Classes(saved.values, saved.names, rebuilt.template, rebuilt.words)
    return classes_for(
        records,
        names=label_names,
        data_names=data_names,
        tokenizer=tokenizer,
        style=prompt or "auto",
    )


def score(
    model: nn.Module,
    tokenizer: Any,
    records: list[dict[str, Any]],
    *,
    classes: Classes | None = None,
    chat_template: str | None = None,
    max_len: int = 256,
    batch_size: int = 16,
    limit: int = 0,
    perplexity: bool = False,
) -> dict[str, float | int]:
    """What ``lorakit eval`` reports for ``records`` (see the module docstring). ``limit``
    counts what is scored: examples, or windows of ``max_len`` tokens for plain text."""
    from . import data
    from .tasks import example_nll, pad_token_id, predict_classes

    if perplexity or ("text" in records[0] and "label" not in records[0]):
        blocks = data.lm_blocks(records, tokenizer, max_len)
        blocks = blocks[:limit] if limit else blocks
        total, count = nll(model, blocks, batch_size)
        return {"perplexity": math.exp(total / max(count, 1)), "windows": len(blocks)}
    part = records[:limit] if limit else records
    if "label" in part[0]:
        if classes is None:
            raise ValueError("labelled records need classes (lorakit.classify.classes_for)")
        labels = [classes.index(r["label"], f"record {i}") for i, r in enumerate(part)]
        if classes.words:
            preds = classify(
                model, tokenizer, classes.prompts(part), classes.words, batch_size=batch_size
            )
        else:
            preds = predict_classes(model, tokenizer, part, max_len, batch_size)
        return {"accuracy": accuracy(preds, labels), "examples": len(part)}
    if "messages" in part[0]:
        examples = data.encode_chats(part, tokenizer, max_len, chat_template)
        what = "assistant_tokens"
    else:
        examples = data.encode_examples(part, tokenizer, max_len)
        what = "completion_tokens"
    total, count = example_nll(model, examples, len(examples), pad_token_id(tokenizer), batch_size)
    return {"loss": total / max(count, 1), what: count, "examples": len(examples)}

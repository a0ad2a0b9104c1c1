"""Tokenisation: language-modelling windows and prompt / label / completion examples."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..constants import IGNORE_INDEX
from .schema import Record, validate_record


def lm_blocks(records: list[Record], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Cut the records' token stream into language-modelling windows.

    Every record's text (prompt + completion for that form) is tokenized without special tokens,
    the documents are joined with the tokenizer's eos token id between them, and the stream is cut
    into non-overlapping windows of ``seq_len`` tokens; the ragged tail is dropped.

    Args:
        records: records with ``text``, or ``prompt`` and ``completion``.
        tokenizer: a Hugging Face tokenizer with an eos token.
        seq_len: tokens per window.

    Returns:
        LongTensor of shape ``(n_blocks, seq_len)``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not records:
        raise ValueError("lm_blocks got no records")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "lm_blocks joins documents with the eos token, but the tokenizer has no eos_token_id"
        )
    texts = []
    for i, record in enumerate(records):
        _, form = validate_record(record, f"record {i}")
        texts.append(record["prompt"] + record["completion"] if form == "sft" else record["text"])
    stream: list[int] = []
    for i, ids in enumerate(_tokenize(tokenizer, texts)):
        if i:
            stream.append(eos)
        stream.extend(ids)
    n_blocks = len(stream) // seq_len
    if n_blocks < 1:
        raise ValueError(
            f"the records give {len(stream)} tokens, fewer than one block of seq_len={seq_len}; "
            "use more text or a smaller seq_len"
        )
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def encode_examples(
    records: list[Record],
    tokenizer: Any,
    max_len: int,
    *,
    template: str | None = None,
    label_words: list[str] | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize supervised examples with the loss on completion tokens only.

    Each example is ``{"input_ids": [...], "labels": [...]}``, labels ``-100`` on prompt tokens:

    - ``prompt``/``completion`` records: prompt tokens + completion tokens;
    - ``text``/``label`` records (need ``template`` and ``label_words``): the prompt is ``template``
      with ``{text}`` replaced by the text (plain replacement, so other braces are kept as they
      are, exactly as the CLI's evaluation builds prompts), the completion is
      ``label_words[label]`` (e.g. ``" positive"``);
    - ``text`` records: labels equal input_ids (loss on every token).

    Prompt and completion are tokenized separately (no special tokens) and concatenated, so the
    boundary is exact; the bos token is put first only when the tokenizer's own encoding adds it.
    An example longer than ``max_len`` loses prompt tokens from the left so the completion stays;
    a completion (or plain text) longer than that is cut on the right. One warning reports how
    many examples were truncated. No eos token is appended.

    Args:
        records: records in one of the three forms.
        tokenizer: a Hugging Face tokenizer.
        max_len: the most tokens per example, bos included.
        template: the classification prompt, containing ``{text}``.
        label_words: the completion for each label id.

    Returns:
        One dict per record, in order.
    """
    _check_encode_args(max_len, template, label_words)
    bos = _bos_prefix(tokenizer)
    if max_len <= len(bos):
        raise ValueError(f"max_len={max_len} leaves no room after the bos token")
    prompts, completions, plain = [], [], []  # plain: loss on every token (prompt "")
    for i, record in enumerate(records):
        prompt, completion, is_plain = _split_record(record, f"record {i}", template, label_words)
        prompts.append(prompt)
        completions.append(completion)
        plain.append(is_plain)

    # Batch calls are much faster than one call per record with fast tokenizers.
    prompt_ids = _tokenize(tokenizer, prompts)
    completion_ids = _tokenize(tokenizer, completions)
    room = max_len - len(bos)
    examples: list[dict[str, list[int]]] = []
    truncated = 0
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if not c:
            raise ValueError(
                f"record {i}: the completion {completions[i]!r} gives no tokens, so the example "
                "would have nothing to learn"
            )
        if len(p) + len(c) > room:
            truncated += 1
            c = c[:room]
            p = p[len(p) - (room - len(c)) :] if room > len(c) else []
        ids = bos + p + c
        labels = ids.copy() if plain[i] else [IGNORE_INDEX] * (len(bos) + len(p)) + c
        examples.append({"input_ids": ids, "labels": labels})
    if truncated:
        warnings.warn(
            f"{truncated} of {len(examples)} examples were longer than max_len={max_len} and were "
            "truncated (prompts cut from the left to keep the completion; completions and plain "
            "texts longer than max_len cut on the right)",
            stacklevel=2,
        )
    return examples


def _check_encode_args(max_len: int, template: str | None, label_words: list[str] | None) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if (template is None) != (label_words is None):
        raise ValueError(
            "template and label_words go together: pass both for text/label records or neither; "
            f"got template={template!r}, label_words={label_words!r}"
        )
    if template is not None and "{text}" not in template:
        raise ValueError(f"template must contain '{{text}}', got {template!r}")
    if label_words is not None and (
        not label_words or not all(isinstance(w, str) and w for w in label_words)
    ):
        raise ValueError(
            f"label_words must be a non-empty list of non-empty str, got {label_words!r}"
        )


def _split_record(
    record: Record, where: str, template: str | None, label_words: list[str] | None
) -> tuple[str, str, bool]:
    """(prompt, completion, loss on every token) of one record."""
    _, form = validate_record(record, where)
    if form == "sft":
        return record["prompt"], record["completion"], False
    if form != "labelled":
        return "", record["text"], True
    if template is None or label_words is None:
        raise ValueError(
            f"{where} has a label; pass template= and label_words= to train it as "
            "classification, or drop the 'label' key to train on the text"
        )
    label = record["label"]
    if not 0 <= label < len(label_words):
        raise ValueError(
            f"{where} has label {label}, but label_words has {len(label_words)} entries "
            f"(allowed labels 0..{len(label_words) - 1})"
        )
    return template.replace("{text}", record["text"]), label_words[label], False


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: long documents are meant to exceed model_max_length here (they are cut later).
    return list(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer's default encoding starts with it, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []

"""Tokenisation: language-modelling windows and prompt / label / completion examples."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..constants import IGNORE_INDEX
from .schema import Record, validate_record
from .tokens import common_prefix, encode_texts, leading_bos


def lm_blocks(records: list[Record], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Cut the records' token stream into language-modelling windows.

    Every record's text (prompt + completion for that form) is encoded as :func:`encode_text`
    encodes it (the bos token first when the tokenizer's own encoding starts with one), the
    documents are joined with the tokenizer's eos token id between them, and the stream is cut
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
    for i, ids in enumerate(encode_texts(tokenizer, texts)):
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
    label_index: Callable[[int, str], int] | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize supervised examples with the loss on completion tokens only.

    Each example is ``{"input_ids": [...], "labels": [...]}``, labels ``-100`` on prompt tokens:

    - ``prompt``/``completion`` records: prompt + completion + the eos token (unless the
      completion already ends with it), so that the model learns to stop;
    - ``text``/``label`` records (need ``template`` and ``label_words``): the prompt is ``template``
      with ``{text}`` replaced by the text (plain replacement, so other braces are kept as they
      are), the completion is the label's word (e.g. ``" positive"``); no eos (classification
      scores the label word alone, :func:`lorakit.evaluate.classify`, on exactly these tokens);
    - ``text`` records: labels equal input_ids (loss on every token).

    Prompt and completion are split by :func:`encode_pairs`: the whole text is tokenized once and
    a token that straddles the boundary belongs to the completion. The bos token is decided by
    :func:`encode_text`'s rule (never twice). An example longer than ``max_len`` loses prompt
    tokens from the left (after bos) so the completion stays; a completion (or plain text) longer
    than that is cut on the right. One warning reports how many examples were truncated.

    Args:
        records: records in one of the three forms.
        tokenizer: a Hugging Face tokenizer.
        max_len: the most tokens per example, bos included.
        template: the classification prompt, containing ``{text}``.
        label_words: the completion for each class index.
        label_index: maps a record's label (and where it is, for errors) to its class index;
            default: the label itself, which must be in ``0..len(label_words) - 1``.

    Returns:
        One dict per record, in order.
    """
    _check_encode_args(max_len, template, label_words)
    prompts, completions, plain = [], [], []  # plain: loss on every token (prompt "")
    eos_after = []
    for i, record in enumerate(records):
        prompt, completion, form = _split_record(
            record, f"record {i}", template, label_words, label_index
        )
        prompts.append(prompt)
        completions.append(completion)
        plain.append(form == "text")
        eos_after.append(form == "sft")
    pairs = encode_pairs(tokenizer, prompts, completions)
    eos = tokenizer.eos_token_id
    if any(eos_after) and eos is None:
        warnings.warn(
            "the tokenizer has no eos token, so completions get none: the model will not learn "
            "to stop",
            stacklevel=2,
        )
    examples = [
        _example(tokenizer, p, c, max_len, plain[i], eos_after[i] and eos is not None)
        for i, (p, c) in enumerate(pairs)
    ]
    truncated = sum(cut for _, cut in examples)
    examples = [e for e, _ in examples]
    if truncated:
        warnings.warn(
            f"{truncated} of {len(examples)} examples were longer than max_len={max_len} and were "
            "truncated (prompts cut from the left to keep the completion; completions and plain "
            "texts longer than max_len cut on the right)",
            stacklevel=2,
        )
    return examples


def _example(
    tokenizer: Any, p: list[int], c: list[int], max_len: int, plain: bool, eos: bool
) -> tuple[dict[str, list[int]], bool]:
    """One example from its prompt and completion ids, and whether it was truncated."""
    if eos and c[-1:] != [tokenizer.eos_token_id]:
        c = [*c, tokenizer.eos_token_id]
    bos = leading_bos(tokenizer, p)
    p = p[len(bos) :]
    room = max_len - len(bos)
    if room < 1:
        raise ValueError(f"max_len={max_len} leaves no room after the bos token")
    cut = len(p) + len(c) > room
    if cut:
        c = c[:room]
        p = p[len(p) - (room - len(c)) :] if room > len(c) else []
    ids = bos + p + c
    labels = ids.copy() if plain else [IGNORE_INDEX] * (len(bos) + len(p)) + c
    return {"input_ids": ids, "labels": labels}, cut


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
    record: Record,
    where: str,
    template: str | None,
    label_words: list[str] | None,
    label_index: Callable[[int, str], int] | None,
) -> tuple[str, str, str]:
    """(prompt, completion, form) of one record."""
    _, form = validate_record(record, where)
    if form == "sft":
        return record["prompt"], record["completion"], form
    if form != "labelled":
        return "", record["text"], form
    if template is None or label_words is None:
        raise ValueError(
            f"{where} has a label; pass template= and label_words= to train it as "
            "classification, or drop the 'label' key to train on the text"
        )
    label = record["label"]
    index = label_index(label, where) if label_index else label
    if not 0 <= index < len(label_words):
        raise ValueError(
            f"{where} has label {label}, but label_words has {len(label_words)} entries "
            f"(allowed labels 0..{len(label_words) - 1})"
        )
    return template.replace("{text}", record["text"]), label_words[index], form


def encode_pairs(
    tokenizer: Any, prompts: list[str], completions: list[str]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each ``prompt + completion``, tokenized as one text.

    The split is where the tokens of the prompt alone stop agreeing with those of the whole text:
    a token that straddles the boundary (``" Hello"`` after a prompt ending in ``"Answer:"`` +
    ``" "``, or a SentencePiece ``"▁positive"``) belongs to the completion. So the completion is
    tokenized as it appears after its prompt, never with a spurious leading token of its own,
    and the two parts concatenate to exactly the whole text's tokens (bos by :func:`with_bos`).
    """
    whole = encode_texts(tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)])
    distinct = list(dict.fromkeys(prompts))  # a prompt asked with K answers is encoded once
    alone = dict(zip(distinct, encode_texts(tokenizer, distinct), strict=True))
    pairs = []
    for i, (ids, prompt) in enumerate(zip(whole, prompts, strict=True)):
        n = common_prefix(ids, alone[prompt])
        if n == len(ids):
            raise ValueError(
                f"record {i}: the completion {completions[i]!r} gives no tokens, so the example "
                "would have nothing to learn"
            )
        pairs.append((ids[:n], ids[n:]))
    return pairs

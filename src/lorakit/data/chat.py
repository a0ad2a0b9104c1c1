"""Conversations: ``messages`` records rendered with a chat template, loss on assistant turns only.

Which tokens an assistant wrote is decided on the rendered text, not guessed from token ids:
for each assistant turn ``i`` the template renders the conversation up to it with the generation
prompt (``P_i``) and up to and including it (``F_i``); the turn's characters are
``F_i[len(P_i):]`` (its content and the template's end-of-turn marker, which is what teaches the
model to stop). Every ``F_i`` must be a prefix of the whole rendering and ``P_i`` of ``F_i``, which
is checked per conversation (a template that re-renders earlier turns differently is refused by
name). The whole conversation is then encoded once, and each turn's tokens are found by
comparing it with the encodings of ``P_i`` and ``F_i`` (:func:`encode_conversation`): exact for
any tokenizer, a token that straddles the start of an answer belongs to the answer. Templates
with ``{% generation %}`` markers get their spans from transformers'
``return_assistant_tokens_mask`` instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..constants import IGNORE_INDEX
from .tokens import common_prefix, encode_texts, with_bos

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A list of ``{"role", "content"}`` dicts with known roles and non-empty string content."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects, got "
            f"{type(messages).__name__}"
        )
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ValueError(
                f"{where}: message {j} must be an object with 'role' and 'content', got {got}"
            )
        if m["role"] not in ROLES:
            raise ValueError(
                f"{where}: message {j} has role {m['role']!r}; allowed roles: {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"{where}: message {j} ({m['role']}) has empty or non-string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def chat_template(tokenizer: Any, template: str | None = None) -> str:
    """The Jinja chat template to render with: ``template`` (a file path or the text itself) or
    the tokenizer's own; an error when there is neither."""
    if template:
        if "{" in template or "\n" in template:  # the template's text itself
            return template
        path = Path(template).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"chat template {template!r} is neither a file nor a Jinja template's text"
            )
        return path.read_text()
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise ValueError(
            f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; "
            "pass one with --chat-template FILE (a Jinja template)"
        )
    return own


def _render(tokenizer, template: str, messages, generation: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )


def assistant_spans(
    tokenizer: Any, template: str, messages: list[dict[str, str]], first: int = 0
) -> tuple[str, list[tuple[str, str]]]:
    """The rendered conversation and, for every assistant turn from message ``first`` on
    (earlier ones, e.g. a prompt's few-shot answers, carry no loss), the rendered text before
    it (with the generation prompt) and up to its end (its end-of-turn marker included)."""
    text = _render(tokenizer, template, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        before = _render(tokenizer, template, messages[:i], generation=True)
        upto = _render(tokenizer, template, messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(
                "the chat template does not render a conversation incrementally (turn "
                f"{i} changes what comes before it), so assistant tokens cannot be found exactly; "
                "use a template that appends each turn, or one with {% generation %} markers"
            )
        spans.append((before, upto))
    return text, spans


def encode_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, str]], first: int = 0
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one conversation; labels -100 outside assistant turns.

    The conversation is encoded once (:func:`lorakit.data.tokens.encode_texts`: the bos token
    once, whether or not the template renders it). An assistant turn's tokens run from the first
    token where the encoding of the text before it stops agreeing with the whole (so a token
    straddling the start, such as ``" Hello"`` after a generation prompt ending in a space,
    belongs to the answer) to the last token of the encoding up to its end that agrees.
    """
    if "{% generation %}" in template or "{%- generation %}" in template:
        return _encode_with_markers(tokenizer, template, messages, first)
    text, spans = assistant_spans(tokenizer, template, messages, first)
    parts = encode_texts(tokenizer, [text] + [t for span in spans for t in span])
    ids = parts[0]
    labels = [IGNORE_INDEX] * len(ids)
    for k in range(len(spans)):
        start = common_prefix(ids, parts[1 + 2 * k])
        end = common_prefix(ids, parts[2 + 2 * k])
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def _encode_with_markers(
    tokenizer: Any, template: str, messages: list[dict[str, str]], first: int
) -> dict[str, list[int]]:
    """Assistant tokens from transformers' ``return_assistant_tokens_mask`` ({% generation %})."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if first:  # the prompt's assistant turns carry no loss
        prompt = tokenizer.apply_chat_template(
            messages[:first], chat_template=template, return_dict=True
        )
        mask[: len(prompt["input_ids"])] = [0] * len(prompt["input_ids"])
    full = with_bos(tokenizer, ids)
    mask = [0] * (len(full) - len(ids)) + mask
    return {
        "input_ids": full,
        "labels": [t if k else IGNORE_INDEX for t, k in zip(full, mask, strict=True)],
    }


def _fit(example: dict[str, list[int]], max_len: int) -> dict[str, list[int]] | None:
    """Whole turns only: cut after the last assistant token that fits in ``max_len``; None when
    not even the first assistant turn fits."""
    ids, labels = example["input_ids"], example["labels"]
    if len(ids) <= max_len:
        return example
    ends = [  # where an assistant turn ends: a target followed by a non-target (or the end)
        j + 1
        for j in range(min(len(ids), max_len))
        if labels[j] != IGNORE_INDEX and (j + 1 == len(ids) or labels[j + 1] == IGNORE_INDEX)
    ]
    if not ends:
        return None
    return {"input_ids": ids[: ends[-1]], "labels": labels[: ends[-1]]}


def encode_chats(
    records: list[dict[str, Any]], tokenizer: Any, max_len: int, template: str | None = None
) -> list[dict[str, list[int]]]:
    """Tokenize conversation records (``messages``, and ``prompt_turns``: how many leading
    messages carry no loss) with assistant-only labels.

    Policy, counted in one warning each: a conversation without an assistant turn to learn is
    skipped; one longer than ``max_len`` keeps its whole turns up to the last assistant turn that
    fits, and is skipped when not even its first one does.
    """
    jinja = chat_template(tokenizer, template)
    examples, no_answer, cut, too_long = [], 0, 0, 0
    for r in records:
        first = r.get("prompt_turns", 0)
        if not any(m["role"] == "assistant" for m in r["messages"][first:]):
            no_answer += 1
            continue
        full = encode_conversation(tokenizer, jinja, r["messages"], first)
        example = _fit(full, max_len)
        if example is None:
            too_long += 1
            continue
        cut += example is not full
        examples.append(example)
    if no_answer:
        warnings.warn(
            f"{no_answer} of {len(records)} conversations have no assistant turn to learn and "
            "were skipped",
            stacklevel=2,
        )
    if cut or too_long:
        warnings.warn(
            f"{cut + too_long} of {len(records)} conversations were longer than max_len={max_len}: "
            f"{cut} kept their whole turns up to the last assistant turn that fits, {too_long} "
            "were skipped (not even the first assistant turn fits)",
            stacklevel=2,
        )
    if not examples:
        raise ValueError("no conversation gave a training example (see the warnings above)")
    return examples

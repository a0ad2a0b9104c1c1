"""Conversations: ``messages`` records rendered with a chat template, loss on assistant turns only.

Which tokens an assistant wrote is decided on the rendered text, not guessed from token ids:
for each assistant turn ``i`` the template renders the conversation up to it with the generation
prompt (``P_i``) and up to and including it (``F_i``); the turn's characters are
``F_i[len(P_i):]`` (its content and the template's end-of-turn marker, which is what teaches the
model to stop). Every ``F_i`` must be a prefix of the whole rendering and ``P_i`` of ``F_i``, which
is checked per conversation (a template that re-renders earlier turns differently is refused by
name). The whole conversation is then tokenized once, with offsets, and a token is a target when
it starts inside an assistant span. Templates with ``{% generation %}`` markers get the same spans
from transformers' ``return_assistant_tokens_mask`` instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..constants import IGNORE_INDEX

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
        path = Path(template).expanduser()
        return path.read_text() if path.is_file() else template
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
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn from message
    ``first`` on (earlier ones, e.g. a prompt's few-shot answers, carry no loss)."""
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
        spans.append((len(before), len(upto)))
    return text, spans


def encode_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, str]], first: int = 0
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one conversation; labels -100 outside assistant turns."""
    if "{% generation %}" in template or "{%- generation %}" in template:
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if first:  # the prompt's assistant turns carry no loss
            prompt = tokenizer.apply_chat_template(
                messages[:first], chat_template=template, return_dict=True
            )
            mask[: len(prompt["input_ids"])] = [0] * len(prompt["input_ids"])
        return {
            "input_ids": ids,
            "labels": [t if k else IGNORE_INDEX for t, k in zip(ids, mask, strict=True)],
        }
    text, spans = assistant_spans(tokenizer, template, messages, first)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for j, (start, _) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= start < spans[k][1]:
            labels[j] = ids[j]
    return {"input_ids": ids, "labels": labels}


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

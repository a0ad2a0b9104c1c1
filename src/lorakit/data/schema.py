"""Records: the four forms a data set's rows take, validated one by one.

A chat record is ``messages`` (``{"role", "content"}`` turns), TRL's conversational ``prompt`` /
``completion`` lists of them, or ShareGPT's ``conversations`` (``{"from": "human" | "gpt" |
"system", "value"}`` turns, the most common chat format on the hub; ``{"role", "content"}`` turns
inside ``conversations`` are read too), all read as ``messages``.
"""

from __future__ import annotations

from typing import Any

from .chat import check_messages

Record = dict[str, Any]
SPLITS = ("train", "validation", "test")
# Every record form, as each data-format error lists them.
FORMATS = (
    "'text' (optionally with an int 'label'), 'prompt' and 'completion', 'messages' (a list of "
    "{'role', 'content'}), or 'conversations' (ShareGPT: a list of {'from': human|gpt|system, "
    "'value'})"
)
# ShareGPT's speakers as chat roles (some exports already write user / assistant).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
SHAREGPT_ROLES |= {"user": "user", "assistant": "assistant"}


def sharegpt_messages(turns: Any, where: str) -> list[dict[str, str]]:
    """ShareGPT's ``conversations`` as ``messages``: ``{"from", "value"}`` turns with human ->
    user, gpt -> assistant, system -> system; ``{"role", "content"}`` turns as they are."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(
            f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} objects, "
            f"got {type(turns).__name__}"
        )
    messages = []
    for j, turn in enumerate(turns):
        if isinstance(turn, dict) and {"from", "value"} <= set(turn):
            if turn["from"] not in SHAREGPT_ROLES:
                raise ValueError(
                    f"{where}: conversations turn {j} is from {turn['from']!r}; allowed: "
                    f"{', '.join(SHAREGPT_ROLES)}"
                )
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        elif isinstance(turn, dict) and {"role", "content"} <= set(turn):
            messages.append(turn)
        else:
            got = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise ValueError(
                f"{where}: conversations turn {j} must be an object with 'from' and 'value' (or "
                f"'role' and 'content'), got {got}"
            )
    return check_messages(messages, f"{where} (conversations)")


def _chat_record(obj: dict[str, Any], where: str) -> Record | None:
    """A conversation's record (``messages``, and ``prompt_turns`` for TRL's form), or None
    when ``obj`` is no chat record."""
    if "messages" in obj and "conversations" in obj:
        raise ValueError(f"{where}: has both 'messages' and 'conversations'; use one per record")
    if "messages" in obj:
        return {"messages": check_messages(obj["messages"], where)}
    if "conversations" in obj:
        return {"messages": sharegpt_messages(obj["conversations"], where)}
    if isinstance(obj.get("prompt"), list) and isinstance(obj.get("completion"), list):
        # TRL's conversational prompt / completion: loss on the completion's assistant turns.
        prompt = check_messages(obj["prompt"], f"{where} (prompt)")
        completion = check_messages(obj["completion"], f"{where} (completion)")
        return {"messages": prompt + completion, "prompt_turns": len(prompt)}
    return None


def validate_record(obj: Any, where: str) -> tuple[Record, str]:
    """Check one record; return it (only the known keys) and its form: text, labelled, sft or
    chat (``messages``, ShareGPT's ``conversations``, or TRL's conversational prompt /
    completion lists of messages)."""
    if not isinstance(obj, dict):
        raise ValueError(
            f"{where}: expected an object, got {type(obj).__name__}; accepted formats: {FORMATS}"
        )
    chat = _chat_record(obj, where)
    if chat is not None:
        return chat, "chat"
    has_sft = "prompt" in obj or "completion" in obj
    if has_sft and "text" in obj:
        raise ValueError(
            f"{where}: has both 'text' and 'prompt'/'completion'; use one form per record"
        )
    if has_sft:
        missing = [k for k in ("prompt", "completion") if k not in obj]
        if missing:
            raise ValueError(
                f"{where}: missing key {missing[0]!r}; prompt records need 'prompt' and "
                f"'completion', got keys {sorted(obj)}"
            )
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise ValueError(
                    f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}"
                )
        if not obj["completion"].strip():
            raise ValueError(f"{where}: 'completion' is empty")
        return {"prompt": obj["prompt"], "completion": obj["completion"]}, "sft"
    if "text" not in obj:
        raise ValueError(f"{where}: missing keys; need {FORMATS}; got keys {sorted(obj)}")
    if not isinstance(obj["text"], str):
        raise ValueError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
    if not obj["text"].strip():
        raise ValueError(f"{where}: 'text' is empty")
    if "label" not in obj:
        return {"text": obj["text"]}, "text"
    label = obj["label"]
    # bool is an int subclass, but true/false labels are almost surely a mistake.
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"{where}: 'label' must be a non-negative int, got {label!r}")
    return {"text": obj["text"], "label": label}, "labelled"


FORM_NAMES = {
    "text": "text",
    "labelled": "text/label",
    "sft": "prompt/completion",
    "chat": "messages/conversations",
}


class FormCheck:
    """Reject files that mix record forms, which would break the training loop later."""

    def __init__(self) -> None:
        self.first: tuple[str, str] | None = None

    def __call__(self, form: str, where: str) -> None:
        if self.first is None:
            self.first = (form, where)
        elif form != self.first[0]:
            raise ValueError(
                f"{where}: a {FORM_NAMES[form]} record, but {self.first[1]} is a "
                f"{FORM_NAMES[self.first[0]]} record; use one form for the whole dataset"
            )


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def non_empty(records: list[Record], what: str) -> list[Record]:
    if not records:
        raise ValueError(f"{what} is empty: it gave no records")
    return records

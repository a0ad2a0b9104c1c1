"""Classification with a causal LM: the classes, the prompt and the answer for each, chosen once
per run, and the answers scored as token sequences.

A :class:`Classes` is decided when a run starts (:func:`classes_for`), saved with the run and the
adapter, and reused by ``lorakit eval`` and ``lorakit generate``, so training, validation and
evaluation see the same prompts, the same answers and the same mapping from label values to
classes. Prompt and answer are encoded together by :func:`lorakit.data.encode.encode_pairs`, for
training and for scoring alike. An answer of several tokens is scored as a sequence (the sum of its
tokens' log-probabilities, as lm-eval scores choices); when every answer is one token after a
shared context, one forward pass per example scores them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data.encode import encode_pairs
from .evaluate import common_prefix_length, tail_logits

STYLES = ("auto", "chat", "plain")


@dataclass(frozen=True)
class Classes:
    """The classes of a labelled data set and how a causal LM is asked for them.

    ``values[k]`` is the label value (in the data) of class ``k``, ``names[k]`` its name (in the
    prompt), ``words[k]`` the answer appended to the prompt (``template`` with ``{text}``). For a
    sequence-classification head, ``template`` and ``words`` are empty: class ``k`` is output ``k``.
    """

    values: tuple[int, ...]
    names: tuple[str, ...]
    template: str = ""
    words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.values or len(self.values) != len(self.names):
            raise ValueError(
                f"classes need as many names as label values, got values {list(self.values)} "
                f"and names {list(self.names)}"
            )
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"label values must be distinct, got {list(self.values)}")
        if self.words and len(self.words) != len(self.values):
            raise ValueError(f"one answer per class: {len(self.values)} classes, {self.words}")

    def index(self, label: int, where: str = "a record") -> int:
        """The class of label value ``label``; an error naming the allowed values otherwise."""
        try:
            return self.values.index(label)
        except ValueError:
            raise ValueError(
                f"{where} has label {label!r}, which is not one of this run's classes: label "
                f"values {list(self.values)} ({', '.join(self.names)})"
            ) from None

    def prompts(self, records: Sequence[dict[str, Any]]) -> list[str]:
        return [self.template.replace("{text}", r["text"]) for r in records]

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Classes:
        allowed = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - allowed:
            raise ValueError(f"a classes record has keys {sorted(allowed)}, got {d!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def classification_prompt(
    tokenizer: Any, label_names: Sequence[str], style: str = "auto"
) -> tuple[str, list[str]]:
    """A prompt template with a ``{text}`` slot and the label words that answer it.

    ``style="chat"`` (``"auto"`` when the tokenizer has a chat template) wraps the question in the
    chat template (label words without a leading space: the assistant turn starts a fresh line);
    ``"plain"`` is a short ``... Answer:`` prompt with " word" labels (about 40 % fewer tokens for
    SmolLM2, whose chat template adds a system prompt).
    """
    if style not in STYLES:
        raise ValueError(f"prompt style must be one of {', '.join(STYLES)}, got {style!r}")
    question = (
        f"Is this review {' or '.join(label_names)}? Answer with one word.\n\nReview: {{text}}"
    )
    chat = bool(getattr(tokenizer, "chat_template", None)) if style == "auto" else style == "chat"
    if chat:
        template = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return template, list(label_names)
    return question + "\nAnswer:", [" " + n for n in label_names]


def classes_for(
    records: Sequence[dict[str, Any]],
    *,
    names: Sequence[str] = (),
    data_names: Sequence[str] | None = None,
    tokenizer: Any = None,
    style: str = "auto",
) -> Classes:
    """The classes of a run, decided once from its training records.

    Class names: ``names`` if given, else the data's own (``data_names``: a built-in data set's
    or a hub ``ClassLabel``'s), in both cases for label values ``0..K-1``; else the label values
    found in ``records``, sorted, named by their value. With a ``tokenizer``, the prompt and the
    answers (:func:`classification_prompt`) are set too; without, the classes are a
    sequence-classification head's outputs.
    """
    found = sorted({r["label"] for r in records})
    given = list(names) or list(data_names or [])
    if given:
        values = tuple(range(len(given)))
        outside = [v for v in found if v >= len(given)]
        if outside:
            source = "label_names" if names else "the data set's class names"
            raise ValueError(
                f"the records have label values {outside} but {source} name only "
                f"{len(given)} classes ({', '.join(given)}; labels 0..{len(given) - 1})"
            )
    else:
        values, given = tuple(found), [str(v) for v in found]
    if len(values) < 2:
        raise ValueError(
            f"classification needs at least two classes, got label values {list(values)}; "
            "pass label_names (--label-names) to name every class"
        )
    if tokenizer is None:
        return Classes(values, tuple(given))
    template, words = classification_prompt(tokenizer, given, style)
    return Classes(values, tuple(given), template, tuple(words))


def _choice_rows(
    tokenizer: Any, prompts: Sequence[str], words: Sequence[str]
) -> list[list[tuple[list[int], int]]]:
    """For each prompt, each answer's (tokens of prompt + answer, where its scored part starts).

    Leading answer tokens that every answer shares (a SentencePiece ``"▁"`` before a digit) add
    the same log-probability to each, so they are moved into the context: the scores keep their
    order and more answers become one token after a shared context (the fast path)."""
    k = len(words)
    pairs = encode_pairs(tokenizer, [p for p in prompts for _ in words], list(words) * len(prompts))
    rows = []
    for i in range(len(prompts)):
        choices = [(p + c, len(p)) for p, c in pairs[i * k : (i + 1) * k]]
        shared = common_prefix_length([ids for ids, _ in choices]) if k > 1 else 0
        rows.append([(ids, max(start, shared)) for ids, start in choices])
    return rows


def _one_token_after_one_context(choices: list[tuple[list[int], int]]) -> bool:
    ids0, start0 = choices[0]
    return all(
        start == len(ids) - 1 and start == start0 and ids[:start] == ids0[:start0]
        for ids, start in choices
    )


@torch.no_grad()
def choice_scores(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    words: Sequence[str],
    *,
    batch_size: int = 32,
    shared_prefix: int | None = None,
) -> torch.Tensor:
    """(n, K) log-probability of each answer after each prompt, summed over its tokens (up to a
    constant per prompt where answers share leading tokens)."""
    rows = _choice_rows(tokenizer, prompts, words)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        if all(_one_token_after_one_context(c) for c in rows):
            seqs = [c[0][0][: c[0][1]] for c in rows]
            answers = [[ids[-1] for ids, _ in c] for c in rows]
            scores = tail_logits(
                model,
                seqs,
                [1] * len(seqs),
                pad,
                lambda i, x: x[-1].log_softmax(-1)[answers[i]].cpu(),
                batch_size,
                shared_prefix,
            )
            return torch.stack(scores)
        flat = [choice for c in rows for choice in c]
        seqs = [ids for ids, _ in flat]
        keep = [len(ids) - start + 1 for ids, start in flat]  # the logit before each answer token

        def answer_logprob(j: int, x: torch.Tensor) -> torch.Tensor:
            targets = torch.tensor(seqs[j][len(seqs[j]) - keep[j] + 1 :], device=x.device)
            return x[:-1].log_softmax(-1).gather(-1, targets[:, None]).sum().cpu()

        scores = tail_logits(model, seqs, keep, pad, answer_logprob, batch_size, shared_prefix)
        return torch.stack(scores).view(len(rows), len(words))
    finally:
        model.train(was_training)


def classify(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    label_words: Sequence[str],
    *,
    batch_size: int = 32,
    shared_prefix: int | None = None,
) -> list[int]:
    """Predict, for each prompt, the index of the label word with the highest log-probability as
    its continuation (a word of several tokens scored as the sum of its tokens'); see
    :func:`choice_scores` and :func:`lorakit.evaluate.tail_logits` for how it is batched."""
    if not prompts:
        return []
    scores = choice_scores(
        model, tokenizer, prompts, label_words, batch_size=batch_size, shared_prefix=shared_prefix
    )
    return scores.argmax(-1).tolist()


def prompt_prefix_length(tokenizer: Any, prompts: Sequence[str], words: Sequence[str]) -> int:
    """How many leading tokens the scored rows of all ``prompts`` share (distributed evaluation
    gives every rank the whole set's, so that all ranks run the same forward passes)."""
    rows = _choice_rows(tokenizer, prompts, words)
    return common_prefix_length([ids[:start] for c in rows for ids, start in c])

"""Evaluation: causal-LM loss on selected positions, perplexity, label-word classification.

The LM head of a small model is a large share of its compute (SmolLM2: 49,152 x 576). When the loss
only needs the last K positions (left-padded prompt/completion batches), logits are computed for
those K positions alone (``logits_to_keep``); the loss is the same, the (tokens x vocab) tensor is not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .constants import IGNORE_INDEX as IGNORE
from .fake import is_fake


def _position_kwargs(attention_mask, position_ids) -> dict[str, Any]:
    if position_ids is not None:  # packed rows: positions restart at every example, no cache
        return {"position_ids": position_ids, "use_cache": False}
    if attention_mask is not None:  # left padding: positions count real tokens only (GPT-2)
        return {"position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
    return {}


def forward_logits(
    model: nn.Module, input_ids, attention_mask, keep: int, position_ids=None
) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all positions if the model lacks logits_to_keep)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    kwargs |= _position_kwargs(attention_mask, position_ids)
    if keep < input_ids.shape[1]:
        try:
            return model(**kwargs, logits_to_keep=keep).logits
        except TypeError:  # not a transformers causal LM with logits_to_keep
            pass
    return model(**kwargs).logits[:, -keep:]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (its inputs go there)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = model_device(model)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions, and how many there are.

    ``batch`` has input_ids, attention_mask and labels (-100 where no loss); labels are the
    input ids themselves (the shift happens here). A packed batch
    (:func:`lorakit.data.packing.collate_packed`) has position_ids instead of attention_mask.
    """
    batch = to_device(batch, model)
    ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    positions = batch.get("position_ids")
    if mask is not None and (is_fake(mask) or bool(mask.all())):
        # No padding: no mask. The model then attends causally without a (b, s, s) mask
        # tensor (kept for backward), and sdpa may take its flash kernel.
        mask = None
    inner = getattr(model, "module", model)  # under a DDP wrapper
    if hasattr(inner, "_lorakit_dense_forward"):  # reduce_activation_memory's chunked loss
        kwargs = _position_kwargs(mask, positions)
        out = model(
            input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=1, **kwargs
        )
        return out.loss, _count(labels[:, 1:])
    seq = ids.shape[1]
    first = _first_prediction(labels)
    keep = seq - first
    logits = forward_logits(model, ids, mask, keep, positions)[:, :-1]  # (b, keep - 1, vocab)
    targets = labels[:, first + 1 :]  # (b, keep - 1)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, _count(targets)


def _count(targets: torch.Tensor) -> int:
    if is_fake(targets):  # planning: every position is a target (see lorakit.fake)
        return targets.numel()
    return int((targets != IGNORE).sum())


def _first_prediction(labels: torch.Tensor) -> int:
    """The first position whose logit is needed: the one before the first label.

    The logit at p predicts token p + 1. Without any label the forward still runs (one
    position): distributed evaluation pads ranks with such rows and FSDP needs equal passes.
    """
    if is_fake(labels):  # planning: labels from position 1 on (see lorakit.fake)
        return 0
    has = (labels != IGNORE).any(0).nonzero()
    return max(int(has.min()) - 1, 0) if has.numel() else labels.shape[1] - 1


@torch.no_grad()
def nll(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, real: int | None = None
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of token windows ``blocks`` (n, seq), and the
    number of predicted tokens; windows from index ``real`` on are run but not counted."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    labels = blocks.clone()
    labels[len(blocks) if real is None else real :] = IGNORE
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size]
        loss, n = token_losses(
            model,
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": labels[i : i + batch_size],
            },
        )
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total, count


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on token windows ``blocks`` (n, seq)."""
    total, count = nll(model, blocks, batch_size)
    return math.exp(total / max(count, 1))


def shared_prefix(tokenizer, prompts: Sequence[str]) -> int:
    """Length in tokens of the prefix all ``prompts`` share (what :func:`classify` caches)."""
    seqs = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return _common_prefix(seqs) if len(seqs) > 1 else 0


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs) - 1  # every sequence keeps at least one token of its own
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


@torch.no_grad()
def _prefix_cache(model: nn.Module, prefix: list[int]):
    """KV cache of a prompt prefix shared by every example (None if the model has no cache)."""
    try:
        out = model(input_ids=torch.tensor([prefix], device=model_device(model)), use_cache=True)
    except TypeError:
        return None
    return getattr(out, "past_key_values", None)


@torch.no_grad()
def last_token_logits(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int = 32,
    shared: int | None = None,
) -> torch.Tensor:
    """Logits at the last token of each sequence, (n, vocab), computed as cheaply as possible.

    Sequences are batched by length (little padding), left-padded so only the last position's
    logits are computed, and a token prefix shared by all of them (a prompt template) is run
    once and reused from the KV cache. ``shared`` fixes that prefix's length (distributed
    evaluation passes the whole set's, so every rank runs the same forward passes).
    """
    import copy

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    if shared is None:
        shared = _common_prefix(seqs) if len(seqs) > 1 else 0
    cache = _prefix_cache(model, seqs[0][:shared]) if shared >= 4 else None
    if cache is None:
        shared = 0
    out = [None] * len(seqs)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        ids, mask = left_pad([seqs[j][shared:] for j in idx], pad_id)
        ids, mask = ids.to(model_device(model)), mask.to(model_device(model))
        kwargs = {}
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(idx))
            kwargs["past_key_values"] = batch_cache
            kwargs["position_ids"] = shared + (mask.cumsum(-1) - 1).clamp(min=0)
            mask = torch.cat([torch.ones(len(idx), shared, dtype=mask.dtype), mask], dim=1)
        else:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, **kwargs).logits[:, -1]
        for row, j in enumerate(idx):
            out[j] = logits[row].float()
    return torch.stack(out)


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[int]:
    """The token id of each label word; each must be exactly one token."""
    word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in label_words]
    if any(len(w) != 1 for w in word_ids):
        raise ValueError(
            "label words must be single tokens for this tokenizer, got "
            f"{dict(zip(label_words, word_ids, strict=True))}"
        )
    return [w[0] for w in word_ids]


@torch.no_grad()
def classify(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    label_words: Sequence[str],
    *,
    batch_size: int = 32,
    shared_prefix: int | None = None,
) -> list[int]:
    """Predict, for each prompt, the label word with the highest log-probability as its continuation.

    Label words must be one token each; see :func:`last_token_logits` for how it is batched.
    """
    candidates = torch.tensor(label_token_ids(tokenizer, label_words))
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    logits = last_token_logits(model, seqs, pad, batch_size, shared=shared_prefix)
    model.train(was_training)
    return logits[:, candidates.to(logits.device)].argmax(-1).tolist()


def left_pad(seqs: Iterable[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, attention_mask), so every sequence ends at the last column."""
    seqs = [list(s) for s in seqs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
    return ids, mask


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    return sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / max(len(labels), 1)

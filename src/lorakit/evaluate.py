"""Evaluation: causal-LM loss on selected positions, perplexity, label-word classification.

The LM head of a small model is a large share of its compute (SmolLM2: 49,152 x 576). When the loss
only needs the last K positions (left-padded prompt/completion batches), logits are computed for
those K positions alone (``logits_to_keep``); the loss is the same, the (tokens x vocab) tensor is not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import progress
from .constants import IGNORE_INDEX as IGNORE
from .data.tokens import common_prefix
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
    # Counted before the forward: its (b, s) temporary is then not live at the forward's peak.
    if hasattr(inner, "_lorakit_dense_forward"):  # reduce_activation_memory's chunked loss
        n = _count(labels[:, 1:])
        kwargs = _position_kwargs(mask, positions)
        out = model(
            input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=1, **kwargs
        )
        return out.loss, n
    seq = ids.shape[1]
    first = _first_prediction(labels)
    keep = seq - first
    targets = labels[:, first + 1 :]  # (b, keep - 1)
    n = _count(targets)
    head = _plain_head(inner)
    if head is not None and not torch.is_grad_enabled():
        with _head_computes_loss(head, targets) as result:
            forward_logits(model, ids, mask, keep, positions)
        return result["loss"], n
    logits = forward_logits(model, ids, mask, keep, positions)[:, :-1]  # (b, keep - 1, vocab)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, n


LOSS_CHUNK = 1024  # tokens per chunk of the no-grad loss (as reduce_activation_memory's)


def _plain_head(model: nn.Module) -> nn.Module | None:
    """The LM head of a transformers causal LM whose logits are the head's output, nothing
    applied after it (found by structure: :func:`lorakit.memory.plain_lm_head`; not Gemma's
    soft-capped or Cohere's scaled logits); else None."""
    from .memory import plain_lm_head

    return plain_lm_head(model)


@contextlib.contextmanager
def _head_computes_loss(head: nn.Module, targets: torch.Tensor) -> Iterator[dict[str, Any]]:
    """While the model runs forward, ``head`` returns no logits: it sums the cross-entropy of
    its input's positions against ``targets`` in chunks of ``LOSS_CHUNK`` tokens, into
    ``["loss"]``, so no (b, s, vocab) tensor exists (evaluation under no_grad). The loss is
    computed inside the forward, where FSDP has the head's weight gathered. The head's own
    forward runs on each chunk (adapters, 4-bit weights included); each chunk's logits are
    upcast to float32 as the unchunked loss does."""
    forward, own, result = head.forward, head.__dict__.get("forward"), {}
    keep = targets.shape[1] + 1

    def loss_forward(hidden: torch.Tensor) -> torch.Tensor:
        h = hidden[:, -keep:][:, :-1]  # (b, keep - 1, d): the positions that predict targets
        step = max(1, LOSS_CHUNK // max(h.shape[0], 1))
        total, vocab = torch.zeros((), dtype=torch.float32, device=h.device), 0
        for i in range(0, h.shape[1], step):
            z = forward(h[:, i : i + step]).float()  # (b, step, vocab)
            vocab = z.shape[-1]
            y = targets[:, i : i + step].reshape(-1)
            total = total + F.cross_entropy(
                z.reshape(-1, vocab), y, ignore_index=IGNORE, reduction="sum"
            )
        result["loss"] = total
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], vocab)  # logits nobody reads

    head.forward = loss_forward
    try:
        yield result
    finally:
        if own is None:
            del head.forward  # the class's forward again
        else:
            head.forward = own


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
    real = len(blocks) if real is None else real
    for i in progress.batch_starts(len(blocks), batch_size, desc="perplexity", unit="window"):
        ids = blocks[i : i + batch_size]
        labels = ids.clone()  # one batch's, as training's batches: never the whole set's
        labels[max(real - i, 0) :] = IGNORE
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        loss, n = token_losses(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total, count


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on token windows ``blocks`` (n, seq)."""
    total, count = nll(model, blocks, batch_size)
    return math.exp(total / max(count, 1))


def common_prefix_length(seqs: list[list[int]]) -> int:
    """How many leading tokens all ``seqs`` share, leaving every sequence at least one token of
    its own (what :func:`tail_logits` runs once and caches)."""
    if len(seqs) < 2:
        return 0
    own = min(len(s) for s in seqs) - 1
    return max(min(own, *(common_prefix(seqs[0], s) for s in seqs[1:])), 0)


@torch.no_grad()
def _prefix_cache(model: nn.Module, prefix: list[int]):
    """KV cache of a prompt prefix shared by every example (None if the model has no cache)."""
    try:
        out = model(input_ids=torch.tensor([prefix], device=model_device(model)), use_cache=True)
    except TypeError:
        return None
    return getattr(out, "past_key_values", None)


@torch.no_grad()
def tail_logits(
    model: nn.Module,
    seqs: list[list[int]],
    keep: Sequence[int],
    pad_id: int,
    reduce: Callable[[int, torch.Tensor], Any],
    batch_size: int = 32,
    shared: int | None = None,
) -> list[Any]:
    """``reduce(i, logits)`` of the logits at the last ``keep[i]`` positions of each sequence
    ``i`` (a ``(keep[i], vocab)`` float32 tensor), computed as cheaply as possible.

    Sequences are batched by length (little padding) and left-padded, so only the last positions'
    logits are computed (``logits_to_keep``); a token prefix shared by all of them (a prompt
    template) is run once and reused from the KV cache. ``shared`` fixes that prefix's length
    (distributed evaluation passes the whole set's, so every rank runs the same forward passes).
    ``reduce`` keeps what is needed of each row, so no (n, vocab) tensor is ever held.
    """
    import copy

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    if shared is None:
        shared = common_prefix_length(seqs)
    # The cached prefix yields no logits: every sequence keeps its last keep[i] positions after it.
    shared = min(shared, *(len(s) - k for s, k in zip(seqs, keep, strict=True)))
    cache = _prefix_cache(model, seqs[0][:shared]) if shared >= 4 else None
    if cache is None:
        shared = 0
    device = model_device(model)
    out: list[Any] = [None] * len(seqs)
    for i in progress.batch_starts(len(order), batch_size, desc="score", unit="seq"):
        idx = order[i : i + batch_size]
        ids, mask = left_pad([seqs[j][shared:] for j in idx], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        kwargs: dict[str, Any] = {"position_ids": shared + (mask.cumsum(-1) - 1).clamp(min=0)}
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(idx))
            kwargs["past_key_values"] = batch_cache
            ones = torch.ones(len(idx), shared, dtype=mask.dtype, device=device)
            mask = torch.cat([ones, mask], dim=1)
        width = max(keep[j] for j in idx)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width, **kwargs).logits
        for row, j in enumerate(idx):
            out[j] = reduce(j, logits[row, width - keep[j] :].float())
    return out


def last_token_logits(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int = 32,
    shared: int | None = None,
) -> torch.Tensor:
    """Logits at the last token of each sequence, (n, vocab) (see :func:`tail_logits`)."""
    rows = tail_logits(model, seqs, [1] * len(seqs), pad_id, lambda _, x: x[-1], batch_size, shared)
    return torch.stack(rows)


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

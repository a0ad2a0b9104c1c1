"""Padding-free batches: examples packed into rows, positions restarting at every example.

A packed batch has ``input_ids``, ``labels`` and ``position_ids`` and no ``attention_mask``:
transformers' causal-mask builder then reads the example boundaries from where ``position_ids``
restart and lets no token attend across one (block-diagonal causal attention for sdpa / eager;
variable-length kernels for flash attention). Each example's first label is -100: in a packed
row it would otherwise be predicted from the previous example's last token.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from ..constants import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin-pack example indices into rows of ``capacity`` tokens: longest first, each into the
    row with the least room left that still holds it (a new row when none does)."""
    if any(n > capacity for n in lengths):
        raise ValueError(
            f"an example of {max(lengths)} tokens does not fit a packed row of {capacity}"
        )
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            rows.append([i])
            left, row = capacity - lengths[i], len(rows) - 1
        else:
            left, row = room.pop(k)
            rows[row].append(i)
            left -= lengths[i]
        bisect.insort(room, (left, row))
    return rows


def collate_packed(
    examples: list[dict[str, Any]], capacity: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Pack ``examples`` (``input_ids`` / ``labels`` lists) into rows of at most ``capacity``
    tokens, right-padded to the longest row (padding: label -100, positions of their own)."""
    rows = best_fit_decreasing([len(e["input_ids"]) for e in examples], capacity)
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            n = len(e["input_ids"])
            ids[r, at : at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(e["labels"][1:], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}

"""A weight's zero pattern as a bitmask: 1 bit per weight (1/16 of a bf16 weight).

LoRS keeps the pruned base's pattern this way, and :func:`lorakit.quantize` records it before
rounding to 4 bits (which can turn small kept weights into zeros).
"""

from __future__ import annotations

import torch


def pack_mask(w: torch.Tensor) -> torch.Tensor:
    """M = [w ≠ 0] packed 8 per byte: uint8 (ceil(numel / 8),), on w's device."""
    flat = (w != 0).reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    # Bit values made here, not at import: under fake tensors (lorakit plan) they must be fake.
    bit = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=w.device)
    return flat.view(-1, 8).to(torch.uint8).mul_(bit).sum(1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 mask of :func:`pack_mask` in ``dtype`` and ``shape``.

    Shift-and-mask, then one cast: about the cost of re-deriving it with ``torch.ne(w, 0)``. A 0/1
    mask in the weight's dtype is multiplied in branch-free; ``masked_fill_`` branches per element,
    which a random 2:4 pattern mispredicts half the time (figures: bench/results/sparse.md).
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    m = torch.bitwise_right_shift(bits[:, None], shifts).bitwise_and_(1)  # (numel / 8, 8)
    shape = torch.Size(shape)
    return m.reshape(-1)[: shape.numel()].to(dtype).view(shape)

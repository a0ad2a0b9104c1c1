"""Whether a tensor is a fake tensor (shapes and dtypes, no data), for the few data-dependent steps.

``lorakit plan`` runs the real training step on ``FakeTensorMode`` tensors. Three places in the loss
read label values to size a tensor (which tokens carry a loss); on fake tensors those values do not
exist, and the planner's batches are built so that every position after a row's first carries a
loss (what :func:`lorakit.tasks.collate` makes of unpadded rows). Those places call
:func:`is_fake` and take that shape. No lorakit imports.
"""

from __future__ import annotations

import torch


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)

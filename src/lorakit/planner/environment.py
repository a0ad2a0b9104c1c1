"""Where the planner's fake run runs: a fake process group for FSDP2, the target's 16-bit compute
policy and attention kernel, and transformers' packed-sequence check kept to real tensors. Each is
a context manager that :func:`lorakit.planner.core.plan` enters around the run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..config import TrainConfig


@contextlib.contextmanager
def fake_world(world: int, strategy: str) -> Iterator[Any]:
    """A fake process group of ``world`` ranks (this process is rank 0) for FSDP2."""
    from ..distributed import Context

    if strategy != "fsdp":
        yield Context(world=world)
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan --strategy fsdp needs a process without a process group")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield Context(world=world)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def compute_policy(target: str) -> Iterator[None]:
    from .. import hardware

    if target == "cpu":
        yield
        return
    before = hardware._override
    hardware.set_cpu_compute("native")
    try:
        yield
    finally:
        hardware.set_cpu_compute(before)


@contextlib.contextmanager
def attention_kernel(target: str, cfg: TrainConfig, config) -> Iterator[None]:
    """The attention kernel a GPU would run, where the CPU's choice keeps different tensors.

    On fake CPU tensors sdpa runs the CPU flash kernel (saves out + logsumexp), which is what
    CUDA's flash kernel (16-bit) and memory-efficient kernel (float32) save too. But CUDA's
    memory-efficient kernel refuses grouped-query heads (transformers passes ``enable_gqa``
    when there is no mask), so a float32 GQA model falls back to the math kernel there, which
    keeps the (b, h, s, s) probabilities: measured on an H200, planned otherwise 1.63x short
    (bench/results/gpu_plan.md)."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if target != "gpu" or cfg.dtype != "float32" or heads is None or kv == heads:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def one_sequence_per_row() -> Iterator[None]:
    """transformers looks for packed sequences in the position ids when there is neither an
    attention mask nor a cache (training with checkpointing), and takes a fake tensor for a
    packed one (its values are unknown): a (b, s, s) mask, and no causal-kernel shortcut. The
    planner's rows hold one sequence each, which the check finds on real ids: no packing."""
    from transformers import masking_utils

    from ..fake import is_fake

    find = masking_utils.find_packed_sequence_indices

    def unpacked(position_ids: torch.Tensor) -> torch.Tensor | None:
        return None if is_fake(position_ids) else find(position_ids)

    masking_utils.find_packed_sequence_indices = unpacked
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find

"""Training on several processes with PyTorch's own engine: DDP or FSDP2, launched by torchrun.

``lorakit train`` notices torchrun's environment (``WORLD_SIZE`` > 1) and joins the process group:
NCCL when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU; the code
path is the same. Two strategies:

- ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`. Only parameters that require
  grad are registered for all-reduce, so with adapters only the adapter (and any
  ``modules_to_save``) is synchronised; LoRA-FA's A is a buffer and never travels. Every trainable
  parameter receives a gradient on every step with every method, so ``find_unused_parameters``
  stays off. Micro-batches before the last one run under ``no_sync``.
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on each transformer block (the classes
  in the model's ``_no_split_modules``) and on the root. Parameters are sharded one by one, so a
  frozen base weight and its trainable adapter live in one block without FSDP1's mixed
  ``requires_grad`` error; only the adapter's gradients are reduce-scattered.

The math is that of one process: every rank draws the same global batch for step k (see
``train.batch_indices``) and keeps the contiguous slice ``[rank·b/W, (rank+1)·b/W)`` of it, the
loss is normalised by the global batch's target count, and the gradient average over ranks is
undone by scaling each rank's loss by W. All ranks build the model with the same seed; after
set-up rank r's RNG is reseeded with ``seed + r`` (it only draws dropout masks).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the world size, its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


def setup() -> Context:
    """Join torchrun's process group if this process was launched by it (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Context(rank=rank, world=world, local_rank=local, device=device)


def check_batch(batch_size: int, micro_batch_size: int, world: int) -> None:
    """The global batch must split evenly over ranks, and each rank's share over micro-batches."""
    if batch_size % world:
        valid = [w for w in range(1, batch_size + 1) if batch_size % w == 0]
        raise ValueError(
            f"batch_size {batch_size} is the global batch and must be divisible by the world "
            f"size {world}; world sizes that divide it: {valid} (or pick a batch size that is a "
            f"multiple of {world})"
        )
    per_rank = batch_size // world
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        valid = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
        raise ValueError(
            f"micro_batch_size {micro} must divide the per-rank batch {per_rank} "
            f"(batch_size {batch_size} / world size {world}); valid choices: {valid}"
        )


def shard(items: list[Any], ctx: Context) -> list[Any]:
    """This rank's contiguous slice of a global batch (its length is divisible by the world)."""
    n = len(items) // ctx.world
    return items[ctx.rank * n : (ctx.rank + 1) * n]


def _blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap(model: nn.Module, strategy: str, ctx: Context) -> nn.Module:
    """Wrap ``model`` for ``strategy``; returns what the training loop calls forward on."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if any(p.device != ctx.device for p in model.parameters()):  # (a fake model cannot move)
        model.to(ctx.device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (LoRA-FA's A, LoRS's mask, rotary tables) are identical on every rank by
        # construction: synced once at construction, never per forward. torch 2.13 renamed the
        # keyword (broadcast_buffers is deprecated there); older releases only know the old one.
        params = inspect.signature(DistributedDataParallel).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        return DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            **{sync: False},
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = _blocks(model)
    if not blocks:
        raise ValueError(
            f"--strategy fsdp shards a model per transformer block, found from its "
            f"_no_split_modules; {type(model).__name__} declares none "
            f"({getattr(model, '_no_split_modules', None)!r}). Use --strategy ddp."
        )
    from .inject import adapted_layers

    configs = [a.config for _, layer in adapted_layers(model) for a in layer.adapters.values()]
    if any(c.grad_correction for c in configs):
        raise ValueError(
            "--grad-correction (LoRA-FA v2) hooks B's gradient, which FSDP2 replaces with a "
            "sharded tensor; use --strategy ddp with it"
        )
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # the mesh's rank table is real even when planning
        mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place: the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally when ``skip`` (all but the last)."""
    from torch.nn.parallel import DistributedDataParallel

    if not skip:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole; a plain tensor as is. Collective for DTensors:
    every rank must call it, in the same order."""
    if type(t).__name__ != "DTensor":  # no torch.distributed import on the common path
        return t
    return t.full_tensor()


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out like ``param``: sharded the same way if it is one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        # Every rank holds the whole tensor: each keeps its own shard, nothing is sent.
        return distribute_tensor(
            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        )
    return value


def all_sum(values: list[float], ctx: Context) -> list[float]:
    """Sum a few floats over ranks (float64)."""
    if not ctx.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects; for small results only)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def split_evenly(items: list[Any], ctx: Context) -> tuple[list[Any], int]:
    """This rank's strided share of ``items``, padded with repeats of its last item so every rank
    runs the same number of forward passes (FSDP's collectives need it); and how many are real."""
    mine = items[ctx.rank :: ctx.world]
    need = -(-len(items) // ctx.world)
    real = len(mine)
    if items and len(mine) < need:
        mine = mine + [mine[-1] if mine else items[-1]] * (need - len(mine))
    return mine, real


def interleave(parts: list[list[Any]], total: int) -> list[Any]:
    """Undo :func:`split_evenly`: rank r's i-th item was item i·W + r."""
    world = len(parts)
    out: list[Any] = [None] * total
    for r, part in enumerate(parts):
        for i, v in enumerate(part):
            j = i * world + r
            if j < total:
                out[j] = v
    return out


def teardown(ctx: Context) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

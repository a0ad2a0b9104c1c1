"""The phases of a training run on the real code path on fake tensors, and what each holds at its
peak; the run's peak is the largest.

The model is the model's own transformers class built from its config under ``FakeTensorMode``
(shapes and dtypes, no data); the run is configured by :func:`lorakit.train`'s own ``_adapt``
(adapter injection, ``reduce_activation_memory``, checkpointing) and the distributed wrap
(FSDP2 ``fully_shard`` per block over a fake process group of N ranks). Phases, in run order:

- ``gradient_svd_init`` (adapter ``init="gradient_svd"`` only): :func:`lorakit.gradient_svd_init`
  itself, as ``train.setup`` calls it: before the optimizer exists and before the distributed
  wrap (every rank holds the whole model then), on micro-batches of ``micro_batch_size or
  batch_size`` rows (the first two: later ones hold what the second holds). It keeps a dense
  gradient of every adapted weight at once.
- ``train_step``: ``batch_loss`` → backward → ``clip_grad_norm_`` → ``AdamW.step`` →
  ``zero_grad``, as ``train_step`` runs it. Two steps run; the second is measured (optimizer
  states exist by then, as in every step of a run but the first). With gradient accumulation the
  second micro-batch is included (gradients are live during its forward, as in every later one).
- ``validation``: :func:`lorakit.evaluate.token_losses` on a micro-batch of rows, in eval mode
  under ``no_grad``, as ``tasks.evaluate`` runs it between steps: weights, trainable parameters
  and optimizer states live, gradients freed (``zero_grad(set_to_none=True)`` ran).

Each phase's batches (token ids, mask, labels: ``collate``'s tensors, rows of ``max_len`` tokens
without padding) are counted from its start.

``target="gpu"`` (the default) plans a GPU run: 16-bit layers compute in their own dtype, and
AdamW and the norm clip use their multi-tensor (foreach) kernels, as they do on CUDA.
``target="cpu"`` plans this machine: its 16-bit compute policy (``lorakit.hardware``), the
for-loop optimizer.

Modelled rather than run, because neither runs on fake tensors:
- DDP: the per-rank step of a single process at the per-rank micro-batch, plus the reducer's
  gradient buckets (one flat copy of the trainable gradients, allocated at wrap time: in the
  step and validation, not in gradient-SVD init, which runs before the wrap).
- A 4-bit base (``quantize``): bitsandbytes' ``Params4bit`` cannot wrap a fake tensor, so the
  step runs on the dense base; each quantized weight's bytes are then replaced by its 4-bit
  storage (:func:`nf4_bytes`, checked against bitsandbytes in the tests) and the largest
  dequantized weight (compute dtype) is added to the transient peak, as the adapted Functions
  dequantize one layer at a time. Saved activations are those of the dense base (tested equal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import offload
from ..config import DTYPES, TrainConfig
from .environment import attention_kernel, compute_policy, fake_world, one_sequence_per_row
from .report import MemoryPlan
from .shapes import load_config
from .tracker import (
    HOST,
    StorageLog,
    TrackAllocations,
    fsdp_storage_events,
    host_peak,
    local,
    replay,
    storage_key,
)

STRATEGIES = ("single", "ddp", "fsdp")
TARGETS = ("gpu", "cpu")


def nf4_bytes(numel: int, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes of one 4-bit weight as bitsandbytes stores it: packed pairs, block scales (8-bit
    with their own fp32 scales and a 256-entry code under double quant, else fp32)."""
    blocks = math.ceil(numel / blocksize)
    scales = blocks * 4
    if double_quant:
        scales = blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4
    return math.ceil(numel / 2) + scales + 16 * 4  # + the 16-value nf4 / fp4 code


def _check(cfg: TrainConfig, strategy: str, world: int, target: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if world < 1 or (strategy == "single" and world != 1):
        raise ValueError(f"world size {world}: single needs 1, ddp and fsdp any N >= 1")
    if cfg.batch_size % world:
        raise ValueError(
            f"world size {world} does not divide batch size {cfg.batch_size}: every rank takes "
            f"batch_size / world examples"
        )
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if (cfg.batch_size // world) % micro:
        raise ValueError(
            f"micro batch {micro} must divide the per-rank batch {cfg.batch_size // world}"
        )
    if cfg.quantize != "none" and strategy == "fsdp":
        raise ValueError("FSDP2 cannot shard a 4-bit base; plan --strategy ddp with --quantize")


def _gradient_svd(cfg: TrainConfig) -> bool:
    return cfg.adapter is not None and cfg.adapter.init == "gradient_svd"


def _build(cfg: TrainConfig, config, adapt: Callable[[nn.Module], nn.Module] | None):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"--model {cfg.model}: {type(config).__name__} ({config.model_type}) has no causal "
            f"LM class in transformers; the planner runs causal language models"
        )
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype])
    model.train()
    if adapt is not None:
        return adapt(model)
    from ..train import _adapt

    _adapt(model, dataclasses.replace(cfg, quantize="none"), "lm", _single(), place=False)
    return model


def _single():
    from ..distributed import SINGLE

    return SINGLE


def _batch(micro: int, seq: int) -> dict[str, torch.Tensor]:
    """Fake rows of ``seq`` tokens, no padding: every label a target but the first; the
    tensors ``collate`` makes (its all-ones mask is dropped by the loss, as a real one is)."""
    ids = torch.zeros(micro, seq, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _step(model, optimizer, params, batch, micros: int, world: int, foreach: bool, hooks):
    from ..tasks import batch_loss

    count = batch["labels"].shape[0] * (batch["labels"].shape[1] - 1) * micros * world
    for _ in range(micros):
        with hooks.forward():
            loss = batch_loss(model, batch)
        (loss * world / count).backward()
    hooks.grads(params)
    torch.nn.utils.clip_grad_norm_(params, math.inf, foreach=foreach)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _Hooks:
    """What the measured step reports into ``log``'s ids: storages saved per forward (those of
    ``exclude``, parameters and buffers, left out as ``count_saved`` does), gradients."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.log = exclude, None
        self.saved: set[int] = set()
        self.first: int | None = None
        self.grad_ids: set[int] = set()

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        if self.log is None:
            yield
            return
        here: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.layout == torch.strided and storage_key(t) not in self.exclude:
                here[self.log.id(t)] = local(t).untyped_storage().nbytes()
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.saved |= set(here)
        if self.first is None:
            self.first = sum(here.values())

    def grads(self, params) -> None:
        if self.log is not None:
            self.grad_ids = {self.log.id(p.grad) for p in params if p.grad is not None}


def _unsharded(model: nn.Module) -> list[torch.Tensor]:
    """FSDP2's all-gathered parameters (their storages are resized, never replaced)."""
    found = []
    for m in model.modules():
        state = getattr(m, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if state else None
        for fp in getattr(group, "fsdp_params", ()):
            if hasattr(fp, "_unsharded_param"):
                found.append(fp._unsharded_param)
    return found


def _persistent(model: nn.Module, optimizer, log: StorageLog) -> dict[int, str]:
    """Register what lives across steps; its categories by lifetime id."""
    cats: dict[int, str] = {}
    for t in model.buffers():
        cats[log.id(t)] = "weights"
    for p in model.parameters():
        cats[log.id(p)] = "trainable" if p.requires_grad else "weights"
    for s in optimizer.state.values() if optimizer is not None else ():
        for t in s.values():
            if torch.is_tensor(t):
                cats.setdefault(log.id(t), "optimizer")
    return cats


def _tracked(log: StorageLog, fsdp: bool, fn: Callable[[], Any]) -> None:
    """Run ``fn`` with every new storage (and FSDP2's in-place resizes) logged, then close."""
    resizes = fsdp_storage_events(log) if fsdp else contextlib.nullcontext()
    with resizes, TrackAllocations(log):
        fn()
    log.close()


def _measure(model, optimizer, params, batch, micros, world, foreach, fsdp: bool):
    """Step 1 unmeasured, step 2 logged; returns (peak, at-peak parts, totals)."""
    hooks = _Hooks({storage_key(t) for t in [*model.parameters(), *model.buffers()]})
    _step(model, optimizer, params, batch, micros, world, foreach, hooks)
    log = StorageLog()
    cats = _persistent(model, optimizer, log)
    log.seen_all(batch.values())
    gathered = _unsharded(model) if fsdp else []
    for t in gathered:
        cats.setdefault(log.id(t), "gathered")
    hooks.exclude |= {storage_key(t) for t in gathered}
    hooks.log = log
    offloaded: list[int] = []  # lifetime ids of the host copies of offloaded checkpoints
    with offload.watch(lambda t: offloaded.append(log.id(t))):
        _tracked(
            log, fsdp, lambda: _step(model, optimizer, params, batch, micros, world, foreach, hooks)
        )
    cats.update(dict.fromkeys(offloaded, HOST))
    for uid in hooks.saved:
        cats.setdefault(uid, "activations")
    for uid in hooks.grad_ids:
        cats.setdefault(uid, "gradients")
    peak, parts = replay(log.events, cats)
    biggest: dict[int, int] = {}
    for uid, delta in log.events:  # the largest size each storage reached
        biggest[uid] = max(biggest.get(uid, 0), delta)
    totals = {
        "activations": hooks.first or 0,
        "gradients": sum(biggest.get(u, 0) for u in hooks.grad_ids),
        "host": host_peak(log.events, cats),
    }
    return peak, parts, totals


def _validation(model: nn.Module, optimizer, batch, fsdp: bool) -> tuple[int, dict[str, int]]:
    """One validation micro-batch after a step (gradients freed): eval mode, no grad."""
    from ..evaluate import token_losses

    log = StorageLog()
    cats = _persistent(model, optimizer, log)
    log.seen_all(batch.values())
    for t in _unsharded(model) if fsdp else []:
        cats.setdefault(log.id(t), "gathered")
    model.eval()
    try:
        with torch.no_grad():
            _tracked(log, fsdp, lambda: token_losses(model, batch))
    finally:
        model.train()
    return replay(log.events, cats)


def init_batches(cfg: TrainConfig) -> list[int]:
    """Rows per micro-batch of gradient-SVD init, as ``train._gradient_svd_init`` makes them
    (``micro_batch_size or batch_size``, before any distributed split)."""
    micro = cfg.micro_batch_size or cfg.batch_size
    return [min(micro, cfg.init_samples - i) for i in range(0, cfg.init_samples, micro)]


def _gradient_svd_phase(model: nn.Module, cfg: TrainConfig) -> tuple[int, dict[str, int]]:
    """:func:`lorakit.gradient_svd_init` on the adapted model, before the optimizer exists.

    Every micro-batch is made up front, as training makes them; the first two run (a third
    holds what the second does: the gradients exist and are added to)."""
    from ..gradient_init import gradient_svd_init
    from ..inject import adapted_layers
    from ..tasks import batch_loss

    batches = [_batch(n, cfg.max_len) for n in init_batches(cfg)]
    count = cfg.init_samples * (cfg.max_len - 1)
    log = StorageLog()
    cats = _persistent(model, None, log)
    log.seen_all(t for b in batches for t in b.values())
    hooks = _Hooks({storage_key(t) for t in [*model.parameters(), *model.buffers()]})
    hooks.log = log
    grads: set[int] = set()
    handles: list[Any] = []

    def note(w: torch.Tensor) -> None:
        grads.add(log.id(w.grad))

    def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not handles:  # the weights require grad from here on
            weights = {id(x.weight): x.weight for _, x in adapted_layers(m)}.values()
            handles.extend(w.register_post_accumulate_grad_hook(note) for w in weights)
        with hooks.forward():
            return batch_loss(m, batch) / count

    try:
        _tracked(log, False, lambda: gradient_svd_init(model, loss_fn, batches[:2]))
    finally:
        for h in handles:
            h.remove()
    for uid in hooks.saved:
        cats.setdefault(uid, "activations")
    for uid in grads:
        cats.setdefault(uid, "gradients")
    return replay(log.events, cats)


def _quantized_adjustment(model: nn.Module, cfg: TrainConfig) -> tuple[int, int]:
    """(bytes the 4-bit storage saves on the weights, the largest dequantized weight)."""
    from ..layers import AdaptedLayer

    head = model.get_output_embeddings()
    saved = largest = 0
    for m in model.modules():
        base = m.base_layer if isinstance(m, AdaptedLayer) else m
        if type(base) is not nn.Linear or m is head or base is head:
            continue
        w = base.weight
        saved += w.numel() * w.element_size() - nf4_bytes(w.numel(), cfg.double_quant)
        largest = max(largest, w.numel() * w.element_size())
    return saved, largest


def plan(
    cfg: TrainConfig | None = None,
    *,
    strategy: str = "single",
    world_size: int = 1,
    target: str = "gpu",
    adapt: Callable[[nn.Module], nn.Module] | None = None,
    label: str | None = None,
    **flat: Any,
) -> MemoryPlan:
    """Plan the memory of a training run per rank, on fake tensors (nothing model-sized is
    allocated): a training step, validation, and gradient-SVD init when the adapter asks for it.

    Args:
        cfg: the run (a :class:`TrainConfig`); or give its flat keys as keyword arguments
            (``model=``, ``method=``, ``rank=``, ``targets=``, ``dtype=``, ``quantize=``,
            ``batch_size=``, ``micro_batch_size=``, ``max_len=``, ``reduce_memory=``,
            ``checkpointing=``, ``init=``, ``init_samples=``). ``max_len`` is the length of
            every row (no padding).
        strategy: ``single``, ``ddp`` or ``fsdp`` (FSDP2, every transformer block sharded).
        world_size: ranks; the plan is rank 0's (every rank holds the same).
        target: ``gpu`` (16-bit computed natively, foreach AdamW) or ``cpu`` (this machine).
        adapt: instead of lorakit's adapter, call ``adapt(model)`` on the fake model and train
            what it returns (e.g. a PEFT model) with its trainable parameters.
        label: the plan's name in reports (default: the method).

    Returns:
        A :class:`MemoryPlan`: ``peak`` is the largest phase's (``peak_phase``), ``phases`` each
        phase's peak.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..distributed import check_batch

    cfg = cfg if cfg is not None else TrainConfig.from_flat(flat)
    _check(cfg, strategy, world_size, target)
    if strategy != "single":
        check_batch(cfg.batch_size, cfg.micro_batch_size, world_size)
    config = load_config(cfg.model)
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    micros = min((cfg.batch_size // world_size) // micro, 2)
    t0 = time.perf_counter()
    with (
        compute_policy(target),
        attention_kernel(target, cfg, config),
        one_sequence_per_row(),
        fake_world(world_size, strategy) as ctx,
        FakeTensorMode(),
    ):
        phases, totals = _phases(cfg, config, adapt, strategy, ctx, target, micro, micros)
    return MemoryPlan.of(
        cfg,
        label or cfg.method,
        strategy,
        world_size,
        micro,
        phases,
        totals,
        time.perf_counter() - t0,
    )


def _phases(cfg, config, adapt, strategy: str, ctx, target: str, micro: int, micros: int):
    """Each phase's (peak, parts) on the fake model, and the training step's totals."""
    from ..checkpoint import trainable_parameters
    from ..distributed import wrap

    phases: dict[str, tuple[int, dict[str, int]]] = {}
    model = _build(cfg, config, adapt)
    if adapt is None and _gradient_svd(cfg):  # before the wrap, as train.setup runs it
        phases["gradient_svd_init"] = _gradient_svd_phase(model, cfg)
    if strategy == "fsdp":
        model = wrap(model, "fsdp", ctx)
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("nothing trains: the adapted model has no trainable parameter")
    foreach = target == "gpu"
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)
    batch = _batch(micro, cfg.max_len)
    fsdp = strategy == "fsdp"
    peak, parts, totals = _measure(
        model, optimizer, params, batch, micros, ctx.world, foreach, fsdp
    )
    phases["train_step"] = peak, parts
    phases["validation"] = _validation(model, optimizer, batch, fsdp)
    if strategy == "ddp":  # the reducer's flat gradient buckets, allocated at wrap time
        bucket = sum(p.numel() * p.element_size() for p in params)
        for name in ("train_step", "validation"):
            phases[name] = _add(phases[name], "gradients", bucket)
    if cfg.quantize != "none":
        smaller, dequantized = _quantized_adjustment(model, cfg)
        for name, phase in phases.items():
            phases[name] = _add(_add(phase, "weights", -smaller), "transient", dequantized)
    return phases, totals


def _add(phase: tuple[int, dict[str, int]], part: str, n: int) -> tuple[int, dict[str, int]]:
    """``phase`` (peak, parts) with ``n`` bytes more in ``part`` (held through the phase)."""
    peak, parts = phase
    return peak + n, {**parts, part: parts.get(part, 0) + n}

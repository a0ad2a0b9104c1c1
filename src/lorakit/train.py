"""The training loop: set up a run, step it, evaluate, finish.

A run is a pure function of its :class:`~lorakit.config.TrainConfig`: the data order at step k
depends only on the seed and k, and a checkpoint (:mod:`lorakit.checkpoint`) holds everything
else, so ``resume`` continues a killed run to the same weights as an uninterrupted one
(bit-identical on CPU). What is trained on and how it is scored lives in :mod:`lorakit.tasks`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as dist
from . import progress
from .checkpoint import (
    check_fingerprint,
    data_fingerprint,
    find_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
    trainable_parameters,
)
from .config import DTYPES, TrainConfig
from .distributed import Context
from .hardware import peak_memory_mib
from .inject import count_parameters, inject
from .interrupt import interruptible
from .metrics import append_metric, plot_losses, read_metrics, write_metrics_csv
from .models import quantize
from .precision import loss_scaler, no_scaler
from .quant import is_quantized
from .results import save_result
from .schedule import batch_indices, lr_lambda, resolve_steps, resume_schedule
from .sparsity import warn_if_unpruned
from .stopping import Stopping
from .tasks import (
    HEADS,
    Prepared,
    batch_loss,
    check_packing,
    collate,
    evaluate,
    load_splits,
    make_batch,
    n_targets,
    pad_token_id,
    prepare_data,
    resolve_task,
    run_classes,
)
from .tracking import Trackers

__all__ = ["TrainConfig", "batch_indices", "find_checkpoint", "lr_lambda", "train"]


@dataclass
class Run:
    """What the loop works on, built by :func:`setup`."""

    cfg: TrainConfig
    ctx: Context
    out: Path
    model: nn.Module  # what forward runs on (DDP / FSDP-wrapped under torchrun)
    base_model: nn.Module  # the unwrapped model
    tokenizer: Any
    prep: Prepared
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    tokens_seen: int = 0
    stopping: Stopping = field(default_factory=Stopping)  # early stopping, best adapter
    tracker: Trackers = field(default_factory=Trackers)  # TensorBoard / W&B (rank 0)
    scaler: torch.amp.GradScaler = field(default_factory=no_scaler)  # float16: loss scaling


def _claim_output(cfg: TrainConfig, ctx: Context, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run, whose older outputs are removed)."""
    out = Path(cfg.output)
    checkpoint = find_checkpoint(out)
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out}")
    if not resume and checkpoint is not None and not overwrite:
        raise FileExistsError(
            f"{out} already holds a checkpoint; pass --resume to continue or --overwrite to start over"
        )
    if resume:
        return checkpoint
    dist.barrier(ctx)  # every rank has looked for a checkpoint before rank 0 removes it
    if ctx.is_main:  # an older run's checkpoint must not be resumed by mistake
        for name in ("checkpoint", "checkpoint.old", "best", "best.old"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    return None


def _load(cfg: TrainConfig, task: str, train_records: list[dict[str, Any]]):
    from .models import load_model

    kw = {"dtype": DTYPES[cfg.dtype], "attn_implementation": cfg.attn_implementation}
    if cfg.quantize != "none":  # LoRS: quantized by lorakit, which keeps the pruned pattern
        kw |= {"quantize": cfg.quantize, "double_quant": cfg.double_quant}
        kw["keep_pattern"] = cfg.adapter is not None and cfg.adapter.capabilities.sparse_base
    if task != "seq-cls":
        return load_model(cfg.model, **kw)
    classes = run_classes(cfg, train_records)
    return load_model(
        cfg.model, task="sequence-classification", num_labels=len(classes.values), **kw
    )


def _adapt(model: nn.Module, cfg: TrainConfig, task: str, ctx: Context, place=True) -> None:
    """4-bit base, memory reductions, the adapter (or every weight trainable), the device."""
    if cfg.quantize != "none" and not any(is_quantized(p) for p in model.parameters()):
        quantize(model, cfg.quantize, double_quant=cfg.double_quant)  # a model passed in
    if cfg.reduce_memory:
        from .memory import reduce_activation_memory

        reduce_activation_memory(
            model,
            checkpointing=cfg.checkpointing,
            mlp_tile=cfg.mlp_tile,
            offload=cfg.offload,
            attention="sdpa" if cfg.attn_implementation == "auto" else None,  # else as asked
        )
    elif cfg.checkpointing:
        from .memory import enable_checkpointing

        enable_checkpointing(model, offload=cfg.offload)
    if cfg.adapter is None:
        model.requires_grad_(True)
    else:
        from .experts import group_routing

        group_routing(model)  # MoE experts: one code path for training and the planner
        heads = tuple(h for h in HEADS if task == "seq-cls" and hasattr(model, h))
        extra = tuple(h for h in heads if h not in cfg.adapter.modules_to_save)
        inject(model, cfg.adapter.replace(modules_to_save=cfg.adapter.modules_to_save + extra))
    if not place:  # the planner's fake model stays where it was built
        return
    if cfg.device != "auto":
        model.to(cfg.device)
    elif ctx.enabled or torch.cuda.is_available():
        model.to(ctx.device if ctx.enabled else "cuda")


def _gradient_svd_init(model: nn.Module, cfg: TrainConfig, prep: Prepared, tokenizer) -> None:
    from .gradient_init import gradient_svd_init

    micro = cfg.micro_batch_size or cfg.batch_size
    first = prep.train[: cfg.init_samples]
    pad = pad_token_id(tokenizer)
    batches = [collate(first[i : i + micro], pad) for i in range(0, len(first), micro)]
    gradient_svd_init(model, lambda m, b: batch_loss(m, b) / n_targets(first), batches)


def setup(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: nn.Module | None = None,
    tokenizer=None,
) -> Run:
    """Data, model, adapter, optimizer and schedule of a run, resumed from its checkpoint."""
    ctx = dist.setup()
    if ctx.enabled:
        dist.check_batch(cfg.batch_size, cfg.micro_batch_size, ctx.world)
    checkpoint = _claim_output(cfg, ctx, resume, overwrite)
    torch.manual_seed(cfg.seed)
    train_records, val_records = load_splits(cfg)
    task = resolve_task(cfg, train_records[0])
    if model is None:
        model, tokenizer = _load(cfg, task, train_records)
    prep = prepare_data(cfg, tokenizer, task, train_records, val_records)
    cfg = resolve_steps(cfg, len(prep.train))  # --epochs: steps from the examples
    _adapt(model, cfg, task, ctx)
    if cfg.compile:  # in place: the module, its names and its state dict stay as they are
        model.compile()
    warn_if_unpruned(model, cfg)  # lors on a base that was never pruned
    if cfg.packing:
        if task == "seq-cls":
            raise ValueError("--packing packs causal-LM token examples; seq-cls rows are not")
        check_packing(model)
    if cfg.adapter is not None and cfg.adapter.init == "gradient_svd" and checkpoint is None:
        _gradient_svd_init(model, cfg, prep, tokenizer)
    fingerprint = data_fingerprint(
        cfg, tokenizer, prep.spec(), train_records, val_records, prep.train
    )
    meta = load_weights(checkpoint, model, cfg) if checkpoint else None
    if meta is not None:
        check_fingerprint(meta.get("fingerprint"), fingerprint)
    base_model = model
    if ctx.enabled:
        model = dist.wrap(model, cfg.strategy, ctx)  # after loading: FSDP shards in place
        torch.manual_seed(cfg.seed + ctx.rank)  # per-rank dropout masks
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    run = Run(
        cfg,
        ctx,
        Path(cfg.output),
        model,
        base_model,
        tokenizer,
        prep,
        optimizer,
        scheduler,
        params,
        fingerprint,
        scaler=loss_scaler(cfg, params, meta),  # float16; a pass-through otherwise
    )
    if checkpoint:
        run.step = load_trainer_state(checkpoint, meta, optimizer, scheduler, cfg, ctx)
        resume_schedule(meta["config"], run.step, cfg, optimizer, scheduler)  # extended run
    if ctx.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, run.out)
        run.rows = read_metrics(run.out / "metrics.jsonl", up_to=run.step)
    run.stopping = Stopping.resume(run)
    return run


def _write_config(cfg: TrainConfig, out: Path) -> None:
    """The fully resolved config of the run, reusable with ``lorakit train --config``."""
    import yaml

    from .fileio import atomic_write

    text = yaml.safe_dump(cfg.to_flat(), sort_keys=False)
    atomic_write(out / "config.yaml", lambda f: Path(f).write_text(text))


def _stop_on_nonfinite(run: Run, loss: float, norm: torch.Tensor) -> None:
    if math.isfinite(loss) and (torch.isfinite(norm) or run.scaler.is_enabled()):
        return  # float16: an overflowed step is the scaler's to skip
    run.optimizer.zero_grad(set_to_none=True)
    last = find_checkpoint(run.out)
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {float(norm)}"
    where = f"The last good checkpoint is {last}." if last else "No checkpoint was written yet."
    raise FloatingPointError(
        f"{what} at step {run.step + 1}; stopping before the optimizer step. {where}"
    )


def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step over the global batch ``run.step``; returns its metrics row."""
    cfg, ctx, t0 = run.cfg, run.ctx, time.perf_counter()
    batch = [
        run.prep.train[i]
        for i in batch_indices(run.step, cfg.batch_size, len(run.prep.train), cfg.seed)
    ]
    count = n_targets(batch)  # of the global batch: every rank divides by the same number
    mine = dist.shard(batch, ctx)
    micro = cfg.micro_batch_size or cfg.batch_size // ctx.world
    pad = pad_token_id(run.tokenizer)
    loss_sum, tokens, slots = 0.0, 0, 0
    for j in range(0, len(mine), micro):
        mb = make_batch(mine[j : j + micro], cfg, pad)
        with dist.no_sync(run.model, skip=j + micro < len(mine)):
            loss = batch_loss(run.model, mb)
            # x world: DDP / FSDP average the ranks' gradients, the global loss is their sum.
            run.scaler.scale(loss * ctx.world / max(count, 1)).backward()
        loss_sum += loss.detach().item()
        tokens += sum(len(e["input_ids"]) for e in mine[j : j + micro])
        slots += mb["input_ids"].numel()
    loss_sum, tokens, slots = dist.all_sum([loss_sum, tokens, slots], ctx)
    run.tokens_seen += int(tokens)
    loss_value = loss_sum / max(count, 1)
    run.scaler.unscale_(run.optimizer)  # float16: the true gradients, before clipping
    norm = dist.full(torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm or math.inf))
    _stop_on_nonfinite(run, loss_value, norm)
    run.scaler.step(run.optimizer)  # float16: skipped when a gradient overflowed
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    dt = time.perf_counter() - t0
    return {
        "step": run.step,
        "loss": loss_value,
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(norm),  # before clipping
        "step_s": dt,
        "tok_per_s": sum(len(e["input_ids"]) for e in batch) / dt,
        "padding": 1 - tokens / max(slots, 1),  # share of the computed positions that pad
    }


def _checkpoint(run: Run) -> None:
    save_checkpoint(
        run.out / "checkpoint",
        run.base_model,
        run.optimizer,
        run.scheduler,
        run.cfg,
        run.step,
        run.ctx,
        run.fingerprint,
        run.scaler.state_dict(),  # float16: the loss scale (empty otherwise)
    )


def _evaluate(run: Run) -> dict[str, float]:
    return evaluate(dist.unwrap(run.model), run.tokenizer, run.prep, run.cfg, ctx=run.ctx)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: nn.Module | None = None,
    tokenizer=None,
) -> dict[str, Any]:
    """Run training.

    Args:
        cfg: the run.
        resume: continue from the checkpoint in ``cfg.output`` (its config must match).
        overwrite: start afresh even if ``cfg.output`` holds a checkpoint.
        model, tokenizer: use these instead of loading ``cfg.model``.

    Returns:
        ``{"summary": ..., "model": ..., "tokenizer": ..., "prepared": ...}``; the summary is also
        written to ``<output>/summary.json``.
    """
    tracker = Trackers(cfg.report_to)  # a missing tracker library fails before the model loads
    run = setup(cfg, resume=resume, overwrite=overwrite, model=model, tokenizer=tokenizer)
    with progress.enabled(cfg.progress), tracker.start(run) as run.tracker:  # closes on failure too
        return _loop(run)


def _loop(run: Run) -> dict[str, Any]:
    cfg, t_start, desc = run.cfg, time.perf_counter(), f"{run.cfg.method} train"
    run.model.train()
    bar = progress.bar(total=cfg.max_steps, initial=run.step, desc=desc, on=run.ctx.is_main)
    for _ in interruptible(run, _checkpoint):  # Ctrl-C: the step ends, a checkpoint is saved
        if run.stopping.stopped:  # early stopping (or a resumed run that had stopped)
            break
        row = train_step(run)
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.max_steps:
            row.update({f"val_{k}": v for k, v in _evaluate(run).items()})
            run.stopping.after_step(run, row)  # best adapter; stop after patience evaluations
        run.rows.append(row)
        if run.ctx.is_main:
            append_metric(run.out / "metrics.jsonl", row)
            run.tracker.log(row)
        bar.set_postfix(
            loss=f"{row['loss']:.4f}",
            tok_s=f"{row['tok_per_s']:.0f}",
            mem=f"{peak_memory_mib():.0f}MiB",
        )
        bar.update(1)
        if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.max_steps:
            _checkpoint(run)
    bar.close()
    return finish(run, time.perf_counter() - t_start)


def finish(run: Run, elapsed: float) -> dict[str, Any]:
    """Last checkpoint, final evaluation, the trained adapter (or model), summary, metrics, plot."""
    cfg, ctx, out = run.cfg, run.ctx, run.out
    _checkpoint(run)
    final = _evaluate(run)
    if run.rows:
        run.rows[-1].update({f"val_{k}": v for k, v in final.items()})
    save_result(run.base_model, run.tokenizer, cfg, out, ctx, run.prep.spec())
    trainable, total = count_parameters(run.base_model)
    summary = {
        "method": cfg.method,
        "steps": run.step,
        "trainable_params": trainable,
        "total_params": total,
        "time_s": elapsed,
        "tokens_per_s": run.tokens_seen / elapsed if elapsed else 0.0,
        "peak_memory_mib": peak_memory_mib(),
        "final_loss": run.rows[-1]["loss"] if run.rows else None,
        **{f"val_{k}": v for k, v in final.items()},
        "output": str(out),
    } | run.stopping.finish(run, final)  # stopped early?, the best adapter
    if ctx.enabled:
        summary["world_size"], summary["strategy"] = ctx.world, cfg.strategy
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        write_metrics_csv(out / "metrics.csv", run.rows)
        plot_losses(run.rows, out / "loss.png", title=f"{cfg.method} on {cfg.data}")
        run.tracker.summary(summary)
    dist.barrier(ctx)  # no rank returns (and reads outputs) before rank 0 has written them
    return {
        "summary": summary,
        "model": run.base_model,
        "tokenizer": run.tokenizer,
        "prepared": run.prep,
    }

"""Experiment tracking: a training run's metrics sent to TensorBoard and / or Weights & Biases
through their own libraries (``TrainConfig.report_to``, ``--report-to tensorboard,wandb``; none
by default).

- ``tensorboard``: event files under ``<output>/tensorboard`` (``tensorboard --logdir
  <output>``), written by ``torch.utils.tensorboard``. A fresh run clears that folder; a resumed
  one hides the events logged after its checkpoint (``purge_step``), as it drops those rows from
  ``metrics.jsonl``.
- ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "lorakit", dir=<output>, name=$WANDB_NAME or
  the output folder's name, config=<the run's flat config>)``. ``WANDB_MODE`` is read by wandb
  itself: ``offline`` writes the run under ``<output>/wandb`` without network (``wandb sync``
  uploads it later), ``disabled`` turns it off.

Every step's metrics row (loss, lr, grad_norm, tok_per_s, padding, step_s) is logged as
``train/<key>`` with the process's peak memory (``train/peak_memory_mib``), validation metrics as
``eval/<metric>`` at their step, and the run's summary as W&B's summary. Only rank 0 reports under
torchrun. The writers close when the run ends, also when it fails (W&B then marks it failed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["TRACKERS", "Trackers", "checked_trackers"]

TRACKERS = ("tensorboard", "wandb")


def checked_trackers(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``report_to`` as a tuple of tracker names: a list, or one comma-separated string;
    ``"none"`` (or nothing) for no tracking. Unknown names are refused, listing the allowed ones."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not all(isinstance(t, str) for t in items):
        raise ValueError(
            f"report_to must be tracker names from {list(TRACKERS)} (or none), got {value!r}"
        )
    names = [t.strip().lower() for t in items if t.strip()]
    names = [] if names == ["none"] else names
    unknown = [t for t in names if t not in TRACKERS]
    if unknown:
        raise ValueError(
            f"report_to: unknown tracker {unknown[0]!r}; allowed: {', '.join(TRACKERS)} "
            f"(comma-separated), or none"
        )
    return tuple(dict.fromkeys(names))


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as tracker tags: ``val_<m>`` -> ``eval/<m>``, anything else -> ``train/``."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[4:]}" if key.startswith("val_") else f"train/{key}"] = float(value)
    if "loss" in row and "peak_memory_mib" not in row:
        from .hardware import peak_memory_mib

        out["train/peak_memory_mib"] = peak_memory_mib()
    return out


class Trackers:
    """The trackers of one run. Made before the model loads (a missing library is an error
    then), opened by :meth:`start` once the run knows its output and first step; with no names,
    or off rank 0, every method does nothing. A context manager: leaving it closes the writers."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names = checked_trackers(names)
        for name in self.names:
            if importlib.util.find_spec(name) is None:
                raise ImportError(
                    f"--report-to {name} needs the {name} package: pip install {name}"
                )
        self._tensorboard: Any = None
        self._wandb: Any = None

    def start(self, run: Any) -> Trackers:
        """Open the writers of ``run`` (a :class:`lorakit.train.Run`: its config, output folder
        and first step), on rank 0 only; a writer that fails to open closes the others."""
        if not run.ctx.is_main:
            return self
        try:
            if "tensorboard" in self.names:
                self._tensorboard = _tensorboard(run.cfg, Path(run.out) / "tensorboard", run.step)
            if "wandb" in self.names:
                self._wandb = _wandb(run.cfg, Path(run.out))
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row (``step`` and numbers) to every open tracker."""
        if self._tensorboard is None and self._wandb is None:
            return
        scalars, step = _scalars(row), int(row["step"])
        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def summary(self, summary: dict[str, Any]) -> None:
        """The run's final validation metrics at its last step, and its summary (W&B)."""
        self.log(
            {"step": summary["steps"], **{k: v for k, v in summary.items() if k[:4] == "val_"}}
        )
        if self._wandb is not None:
            numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
            self._wandb.summary.update(numbers)

    def close(self, failed: bool = False) -> None:
        """Flush and close the writers (W&B: the run marked failed with ``failed``)."""
        writer, run = self._tensorboard, self._wandb
        self._tensorboard = self._wandb = None
        if writer is not None:
            writer.close()
        if run is not None:
            run.finish(exit_code=1 if failed else 0)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


def _tensorboard(cfg: Any, folder: Path, step: int):
    from torch.utils.tensorboard import SummaryWriter

    if step == 0:  # a fresh run: an older run's curves must not mix with this one's
        shutil.rmtree(folder, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(folder), purge_step=step or None)
    if step == 0:
        writer.add_text("config", "```\n" + json.dumps(cfg.to_flat(), indent=2) + "\n```")
    return writer


def _wandb(cfg: Any, out: Path):
    import wandb

    out.mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "lorakit",
            name=os.environ.get("WANDB_NAME") or out.resolve().name,
            dir=str(out),
            config=cfg.to_flat(),
        )
    except wandb.errors.Error as e:
        raise ValueError(
            f"--report-to wandb: {e} (or set WANDB_MODE=offline to write the run under "
            f"{out / 'wandb'} without network; `wandb sync` uploads it later)"
        ) from e

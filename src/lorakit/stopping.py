"""Early stopping on the validation metric, and the best adapter kept in ``<output>/best/``.

The monitored metric is the one validation reports for the task: ``accuracy`` for
classification (higher is better), ``loss`` for prompt/completion and chat data, ``perplexity``
for plain text (lower is better). With ``eval_every`` > 0, every evaluation that beats the best so
far (strictly) writes ``best/adapter`` (the adapter at that step, as ``adapter/`` is written) and
``best/metric.json`` (step, metric, value) as one folder swapped in atomically; the final
evaluation competes too. ``early_stopping_patience = P`` ends training after P evaluations in a
row without a better value (the checkpoint, final evaluation, ``adapter/`` and summary are then
written as at the end of any run). Full fine-tuning keeps no best copy (a whole model per
improvement).

Nothing of this is in the checkpoint: a resumed run rebuilds it from ``metrics.jsonl`` (its
evaluations up to the checkpoint's step) and ``best/metric.json``, so it stops where the
uninterrupted run stops. Decisions are taken on rank 0 and sent to every rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schedule import note

__all__ = ["DIRECTIONS", "Stopping"]

DIRECTIONS = {"accuracy": 1, "loss": -1, "perplexity": -1}  # +1: higher is better


def _evaluations(n: int) -> str:
    return f"{n} evaluation" + ("s" if n != 1 else "")


def monitored(metrics: dict[str, Any], prefix: str = "") -> tuple[str, float] | None:
    """(name, value) of the metric early stopping follows, among ``metrics``' keys."""
    for key, value in metrics.items():
        name = key.removeprefix(prefix)
        if key.startswith(prefix) and name in DIRECTIONS:
            return name, float(value)
    return None


@dataclass
class Stopping:
    """Best validation value so far and the evaluations since (the same on every rank)."""

    patience: int = 0
    metric: str | None = None
    value: float | None = None
    step: int = 0  # where ``value`` was measured
    stale: int = 0  # evaluations since then without a better value
    stopped: bool = False

    def better(self, value: float) -> bool:
        return self.value is None or (value - self.value) * DIRECTIONS[self.metric] > 0

    @classmethod
    def resume(cls, run) -> Stopping:
        """The state of ``run`` (fresh or resumed at ``run.step``), the same on every rank."""
        from .distributed import all_gather

        cfg = run.cfg
        if cfg.early_stopping_patience and not cfg.eval_every:
            raise ValueError(
                f"early_stopping_patience {cfg.early_stopping_patience} counts evaluations, but "
                "eval_every is 0 (validation at the end only); give eval_every > 0"
            )
        if cfg.early_stopping_patience and not run.prep.val_records:
            raise ValueError(
                f"early_stopping_patience {cfg.early_stopping_patience} watches the validation "
                f"metric, but {cfg.data} has no validation split; give val_data"
            )
        state = cls(cfg.early_stopping_patience)
        if run.ctx.is_main:
            state._rebuild(run.rows, run.out / "best" / "metric.json", run.step)
        return all_gather(state, run.ctx)[0]

    def _rebuild(self, rows: list[dict[str, Any]], saved: Path, step: int) -> None:
        evals = [(r["step"], m) for r in rows if (m := monitored(r, "val_")) is not None]
        best = json.loads(saved.read_text()) if saved.exists() else None
        if best is not None and best["step"] <= step:
            self.metric, self.value, self.step = best["metric"], best["value"], best["step"]
        for s, (name, value) in evals:
            self.metric = self.metric or name
            if self.better(value):
                self.value, self.step = value, s
        self.stale = sum(1 for s, _ in evals if s > self.step)
        self.stopped = bool(self.patience) and self.stale >= self.patience

    def after_step(self, run, row: dict[str, Any]) -> bool:
        """Follow an evaluation in ``row`` (if any): keep the best adapter, count the
        evaluations without one; True when training should stop here."""
        found = monitored(row, "val_")
        if found is None:
            return False
        self._observe(run, *found)
        if self.stopped:
            note(
                f"early stopping at step {run.step}: val_{self.metric} has not beaten "
                f"{self.value:.6g} (step {self.step}) in {_evaluations(self.stale)} "
                f"(early_stopping_patience {self.patience})"
            )
        return self.stopped

    def _observe(self, run, metric: str, value: float) -> None:
        from .distributed import all_gather

        self.metric = self.metric or metric
        improved = self.better(value)
        if improved:
            self.value, self.step, self.stale = value, run.step, 0
        else:
            self.stale += 1
        self.stopped = bool(self.patience) and self.stale >= self.patience
        if all_gather(improved, run.ctx)[0]:
            self._keep_best(run)

    def _keep_best(self, run) -> None:
        """Write ``<output>/best`` (every rank gathers the adapter; rank 0 writes)."""
        if run.cfg.method == "full" or not run.cfg.eval_every:
            return
        from .adapters import adapter_payload, write_adapter
        from .fileio import atomic_folder

        tensors, config, metadata = adapter_payload(run.base_model)
        metadata = {**metadata, "lorakit_task": json.dumps(run.prep.spec())}
        if not run.ctx.is_main:
            return
        record = {"step": self.step, "metric": self.metric, "value": self.value}
        with atomic_folder(run.out / "best") as tmp:
            write_adapter(tmp / "adapter", (tensors, config, metadata))
            (tmp / "metric.json").write_text(json.dumps(record, indent=2) + "\n")

    def finish(self, run, final: dict[str, float]) -> dict[str, Any]:
        """The final evaluation's turn; the summary's entries on stopping and the best adapter."""
        found = monitored(final)
        if found is not None and not self.stopped:
            self._observe(run, *found)
            self.stopped = False  # the run ended at max_steps: the last evaluation stops nothing
        out: dict[str, Any] = {}
        if self.patience:
            out["stopped_early"] = self.stopped
            out["early_stopping"] = {
                "patience": self.patience,
                "metric": f"val_{self.metric}",
                "evaluations_without_improvement": self.stale,
            }
        if self.value is not None and (run.out / "best" / "metric.json").exists():
            out["best"] = {
                "step": self.step,
                f"val_{self.metric}": self.value,
                "adapter": str(run.out / "best" / "adapter"),
            }
        notes = []
        if self.stopped:
            notes.append(
                f"stopped early at step {run.step} of {run.cfg.max_steps}: no better "
                f"val_{self.metric} in {_evaluations(self.stale)}"
            )
        if "best" in out:
            notes.append(
                f"best val_{self.metric} {self.value:.6g} at step {self.step}: {out['best']['adapter']}"
            )
        return out | ({"notes": notes} if notes else {})

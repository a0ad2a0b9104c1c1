"""A run's metrics rows: appended as JSON lines while it trains, then CSV and a loss plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(file: Path, up_to: int) -> list[dict[str, Any]]:
    """The rows of a resumed run up to its checkpoint's step (later ones are dropped)."""
    if not file.exists():
        return []
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] <= up_to]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))  # drop steps after the checkpoint
    return rows


def append_metric(file: Path, row: dict[str, Any]) -> None:
    with file.open("a") as f:
        f.write(json.dumps(row) + "\n")


def write_metrics_csv(file: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    with file.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_losses(rows: list[dict[str, Any]], file: Path, title: str = "") -> Path | None:
    """Training loss per step (and any validation metric) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    evals = [(r["step"], k, v) for r in rows for k, v in r.items() if k.startswith("val_")]
    if evals:
        ax2 = ax.twinx()
        for key in sorted({k for _, k, _ in evals}):
            pts = [(s, v) for s, k, v in evals if k == key]
            ax2.plot(*zip(*pts, strict=True), "o-", color="tab:orange", label=key)
        ax2.set_ylabel("validation")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return file

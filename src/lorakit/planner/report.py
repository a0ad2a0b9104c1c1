"""A memory plan: what one rank holds at the peak of a training step, as text, JSON or a PNG."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024**3
# What is live at the peak, in the order a reader adds them up.
PARTS = ("weights", "trainable", "gradients", "optimizer", "activations", "gathered", "transient")
LABELS = {
    "weights": "weights (frozen) + buffers",
    "trainable": "trainable parameters",
    "gradients": "gradients",
    "optimizer": "optimizer states (AdamW)",
    "activations": "saved for backward",
    "gathered": "FSDP all-gathered parameters",
    "transient": "transient (logits, temporaries)",
}
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": GiB, "t": 1024**4}


@dataclass
class MemoryPlan:
    """One rank's memory at the peak of a steady-state training step, in bytes.

    ``at_peak`` adds up to ``peak``; ``activations`` is everything one forward saves for backward
    (unique storages, parameters excluded: what :func:`lorakit.count_saved` counts) and
    ``gradients`` every trainable gradient, whether or not all were live at the peak.
    """

    model: str
    label: str
    method: str
    strategy: str
    world_size: int
    micro_batch_size: int
    max_len: int
    dtype: str
    quantize: str
    reduce_memory: bool
    checkpointing: bool
    peak: int
    at_peak: dict[str, int] = field(default_factory=dict)
    activations: int = 0
    gradients: int = 0
    seconds: float = 0.0

    @classmethod
    def of(cls, cfg, label, strategy, world, micro, peak, parts, totals, seconds) -> MemoryPlan:
        return cls(
            model=cfg.model,
            label=label,
            method=cfg.method,
            strategy=strategy,
            world_size=world,
            micro_batch_size=micro,
            max_len=cfg.max_len,
            dtype=cfg.dtype,
            quantize=cfg.quantize,
            reduce_memory=cfg.reduce_memory,
            checkpointing=cfg.checkpointing,
            peak=peak,
            at_peak={k: parts[k] for k in PARTS if parts.get(k)},
            activations=totals["activations"],
            gradients=totals["gradients"],
            seconds=seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fits(self, budget: int, margin: float) -> bool:
        return self.peak <= budget * (1 - margin)

    def table(self) -> str:
        how = f"{self.strategy} x{self.world_size}" if self.world_size > 1 else self.strategy
        quant = f", {self.quantize} base" if self.quantize != "none" else ""
        extra = [
            n for n, on in (("reduce", self.reduce_memory), ("ckpt", self.checkpointing)) if on
        ]
        lines = [
            f"{self.model} · {self.label}{quant} · {self.dtype} · {how} · micro-batch "
            f"{self.micro_batch_size} x {self.max_len} tokens"
            + (f" · {'+'.join(extra)}" if extra else ""),
            f"per rank, at the peak of a training step (planned in {self.seconds:.1f} s):",
        ]
        width = max(len(v) for v in LABELS.values())
        for k in PARTS:
            if k not in self.at_peak:
                continue
            note = ""
            if k == "activations" and self.activations != self.at_peak[k]:
                note = f"   (one forward saves {gib(self.activations)})"
            if k == "gradients" and self.gradients != self.at_peak[k]:
                note = f"   (all of them: {gib(self.gradients)})"
            lines.append(f"  {LABELS[k]:<{width}}  {gib(self.at_peak[k]):>12}{note}")
        lines.append(f"  {'peak':<{width}}  {gib(self.peak):>12}")
        return "\n".join(lines)


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_size(text: str) -> int:
    """``24GiB``, ``80GB``, ``512MiB``, ``1.5T`` -> bytes (binary units: a GB is a GiB here,
    as GPU memory is quoted)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--fit {text!r}: expected a positive size such as 24GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def plot(plans: list[MemoryPlan], file: str | Path, budgets: tuple[int, ...] = ()) -> Path:
    """A stacked bar per plan (what is live at its peak), with budget lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(plans) + 2), 4.5))
    x = range(len(plans))
    bottom = [0.0] * len(plans)
    for k in PARTS:
        vals = [p.at_peak.get(k, 0) / GiB for p in plans]
        if any(vals):
            ax.bar(x, vals, bottom=bottom, label=LABELS[k])
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for b in budgets:
        ax.axhline(b / GiB, color="grey", ls="--", lw=0.8)
        ax.text(
            len(plans) - 0.5, b / GiB, f"{b / GiB:.0f} GiB", va="bottom", ha="right", fontsize=7
        )
    ax.set_xticks(list(x), [p.label for p in plans], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB per rank at the peak")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

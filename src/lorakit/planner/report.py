"""A memory plan: what one rank holds at the peak of a training run, as text, JSON or a PNG."""

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
# The phases of a run the planner runs, in run order.
PHASES = {
    "gradient_svd_init": "gradient-SVD init",
    "train_step": "training step",
    "validation": "validation (no grad)",
}
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": GiB, "t": 1024**4}


@dataclass
class MemoryPlan:
    """One rank's memory at the peak of a training run, in bytes.

    ``phases`` holds each phase's peak (``train_step``: a steady-state step; ``validation``;
    ``gradient_svd_init`` when the adapter's init is ``gradient_svd``) and ``phase_at_peak`` what
    each held at its peak. ``peak`` is the largest of them, set by ``peak_phase``, and
    ``at_peak`` is that phase's parts (they add up to ``peak``). ``activations`` and
    ``gradients`` are the training step's: everything one forward saves for backward (unique
    storages, parameters excluded: what :func:`lorakit.count_saved` counts) and every trainable
    gradient, whether or not all were live at the peak.
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
    host: int = 0  # pinned host memory of offloaded checkpoints (training step), apart from peak
    seconds: float = 0.0
    peak_phase: str = "train_step"
    phases: dict[str, int] = field(default_factory=dict)
    phase_at_peak: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg, label, strategy, world, micro, phases, totals, seconds) -> MemoryPlan:
        """From each phase's (peak, parts at its peak); ties go to the earlier phase in run order."""
        order = [k for k in PHASES if k in phases]
        top = max(order, key=lambda k: phases[k][0])
        peak, parts = phases[top]
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
            at_peak=_ordered(parts),
            activations=totals["activations"],
            gradients=totals["gradients"],
            host=totals.get("host", 0),
            seconds=seconds,
            peak_phase=top,
            phases={k: phases[k][0] for k in order},
            phase_at_peak={k: _ordered(phases[k][1]) for k in order},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fits(self, budget: int, margin: float) -> bool:
        return self.peak <= budget * (1 - margin)

    def table(self) -> str:
        how = f"{self.strategy} x{self.world_size}" if self.world_size > 1 else self.strategy
        quant = f", {self.quantize} base" if self.quantize != "none" else ""
        extra = [
            n
            for n, on in (
                ("reduce", self.reduce_memory),
                ("ckpt", self.checkpointing),
                ("offload", self.host > 0),
            )
            if on
        ]
        lines = [
            f"{self.model} · {self.label}{quant} · {self.dtype} · {how} · micro-batch "
            f"{self.micro_batch_size} x {self.max_len} tokens"
            + (f" · {'+'.join(extra)}" if extra else ""),
            f"per rank, at the peak of the run, in its {PHASES[self.peak_phase]} "
            f"(planned in {self.seconds:.1f} s):",
        ]
        width = max(len(v) for v in LABELS.values())
        for k, v in self.at_peak.items():
            lines.append(f"  {LABELS[k]:<{width}}  {gib(v):>12}{self._note(k)}")
        lines.append(f"  {'peak':<{width}}  {gib(self.peak):>12}")
        if self.host:
            lines.append(
                f"  {'host memory (offloaded, pinned)':<{width}}  {gib(self.host):>12}"
                "   (apart from the peak)"
            )
        if len(self.phases) > 1:
            lines.append("peak of each phase:")
            for k, v in self.phases.items():
                mark = "   <- the run's peak" if k == self.peak_phase else ""
                lines.append(f"  {PHASES[k]:<{width}}  {gib(v):>12}{mark}")
        return "\n".join(lines)

    def _note(self, part: str) -> str:
        """The training step's totals, where its peak holds only some of them."""
        if self.peak_phase != "train_step":
            return ""
        if part == "activations" and self.activations != self.at_peak[part]:
            return f"   (one forward saves {gib(self.activations)})"
        if part == "gradients" and self.gradients != self.at_peak[part]:
            return f"   (all of them: {gib(self.gradients)})"
        return ""


def _ordered(parts: dict[str, int]) -> dict[str, int]:
    return {k: parts[k] for k in PARTS if parts.get(k)}


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_size(text: str) -> int:
    """``24GiB``, ``80GB``, ``512MiB``, ``1.5T`` -> bytes (binary units: a GB is a GiB here,
    as GPU memory is quoted)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--fit {text!r}: expected a positive size such as 24GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# What may tell plans apart besides their label, as a bar's name shows it.
_DIFFERS = {
    "model": lambda p: p.model,
    "shape": lambda p: f"micro-batch {p.micro_batch_size} x {p.max_len} tokens",
    "dtype": lambda p: p.dtype,
    "quantize": lambda p: f"{p.quantize} base",
    "ranks": lambda p: f"{p.strategy} x{p.world_size}",
    "reduce": lambda p: "reduce" if p.reduce_memory else "no reduce",
    "ckpt": lambda p: "ckpt" if p.checkpointing else "no ckpt",
}


def bar_names(plans: list[MemoryPlan]) -> list[str]:
    """Each plan's name under its bar: its label, then what differs between the plans (e.g. the
    micro-batch and row length of a ``--fit`` answer), then the phase of its peak when that is
    not the training step."""
    differ = [f for f, show in _DIFFERS.items() if len({show(p) for p in plans}) > 1]
    return [
        "\n".join([p.label, *(_DIFFERS[f](p) for f in differ)])
        + (f"\n({PHASES[p.peak_phase]})" if p.peak_phase != "train_step" else "")
        for p in plans
    ]


def plot(plans: list[MemoryPlan], file: str | Path, budgets: tuple[int, ...] = ()) -> Path:
    """A stacked bar per plan (what is live at the run's peak, in the phase named under the bar
    when it is not the training step), the other phases' peaks as ticks, budget lines."""
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
    for i, p in enumerate(plans):  # the other phases' peaks, as ticks on the bar
        for k, v in p.phases.items():
            if k != p.peak_phase:
                ax.plot([i - 0.4, i + 0.4], [v / GiB] * 2, color="black", lw=0.8)
                ax.text(i + 0.42, v / GiB, PHASES[k], va="center", fontsize=6)
    ax.set_xticks(list(x), bar_names(plans), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB per rank at the peak")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

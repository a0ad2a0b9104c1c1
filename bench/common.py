"""Shared benchmark plumbing: the real model, peers side by side, interleaved timing, reports."""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import lorakit as lk
from lorakit import hardware
from lorakit.models import load_model
from lorakit.profile import MiB, count_saved

RESULTS = Path(__file__).parent / "results"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def machine() -> str:
    """One line describing where the numbers were taken: device, CPU model, the CPU's bf16 / fp16
    / AMX flags, torch's CPU capability, the dtype 16-bit adapted layers compute in on CPU, and
    the load average (other jobs on the same cores slow every peer, unevenly)."""
    dev = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return (
        f"{dev}; {hardware.cpu_model()}; {hardware.describe()}; "
        f"torch {torch.__version__}; python {platform.python_version()}"
        + (f"; load average {load[0]:.1f} / {load[2]:.1f} (1 / 15 min)" if load else "")
    )


def smollm2(dtype: torch.dtype) -> nn.Module:
    model, _ = load_model("smollm2-135m", dtype=dtype)
    return model


@dataclass
class Peer:
    """One row of a benchmark: a model and what a training step does with it."""

    name: str
    model: nn.Module
    timed: bool = True
    saved_bytes: int = 0
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every step's loss, in order
    optimizer: torch.optim.Optimizer | None = None
    static: tuple[int, ...] = ()  # bytes a bench attributes to weights, grads, optimizer states
    trainable_count: int = 0

    def __post_init__(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.model.train()
        self.trainable_count = lk.count_parameters(self.model)[0]

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: model(input_ids=ids, labels=ids).loss


def step(peer: Peer, loss_fn: Callable[[], torch.Tensor], count: bool = False) -> float:
    device = next(peer.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if count:
        loss, peer.saved_bytes = count_saved(peer.model, loss_fn)
    else:
        loss = loss_fn()
    loss.backward()
    peer.losses.append(float(loss.detach()))
    peer.optimizer.step()
    peer.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_interleaved(peers: list[Peer], ids: torch.Tensor, steps: int, warmup: int = 1) -> None:
    """Count saved bytes on each peer's first step; then time steps round-robin so drift in the
    machine's speed hits every peer alike. Only steps after ``warmup`` are timed."""
    losses = {p.name: causal_lm_loss(p.model, ids) for p in peers}
    for p in peers:
        step(p, losses[p.name], count=True)
        for _ in range(warmup - 1):
            step(p, losses[p.name])
    for _ in range(steps):
        for p in peers:
            if p.timed:
                p.times.append(step(p, losses[p.name]))
                print(f"  {p.name}: {p.times[-1]:.2f} s", flush=True)


def static_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(weights incl. buffers, grads + AdamW states of the trainable parameters)."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights, 3 * trainable


def fresh(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def write(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / name
    out.write_text(text)
    print(f"wrote {out}")
    return out


def splice(name: str, section: list[str], anchor: str) -> Path:
    """Write ``section`` (its first and last lines are its markers) into results/``name`` in
    place of the previous one, or before the first line starting with ``anchor``."""
    out = RESULTS / name
    text, block = out.read_text(), "\n".join(section) + "\n"
    start, end = section[0], section[-1]
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        head, sep, rest = text.partition("\n" + anchor)
        text = head + "\n" + block + sep + rest if sep else text + "\n" + block
    return write(name, text)


def mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f}"


def env_flag(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def table_rows(text: str) -> list[list[str]]:
    """The body rows of every markdown table in ``text``, as lists of stripped cells (header rows,
    the ones right above a ``|---|`` line, left out)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        if set(line.strip()) <= set("|-: "):
            rows.pop()  # the header
            continue
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported when a bench plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

"""Pruning to unstructured or N:M sparsity: magnitude, Wanda, SparseGPT.

- magnitude: drop the smallest |W| (per layer; N:M per group).
- Wanda (Sun et al. 2023): score S_ij = |W_ij|·‖X_j‖₂ over calibration tokens; unstructured drops
  the lowest fraction of each output row; no weight update.
- SparseGPT (Frantar & Alistarh 2023): H = (2/n) Σ xᵀx with 1 % mean-diagonal dampening; columns
  in blocks of 128; mask by w²/[H⁻¹]_jj² (per block for unstructured, per group for N:M); each
  pruned column's error is propagated to the remaining columns (the OBS update) through the
  upper Cholesky factor of H⁻¹.

"N:M" means at most N non-zeros in every M consecutive input weights of a row (2:4 = 50 %).
Calibration is sequential, as in both papers: decoder block i sees the outputs of the already
pruned blocks 0..i-1. Embeddings and the output head are never pruned.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .inject import match_targets
from .layers import layer_kind

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Sparsity:
    """A parsed sparsity target: a fraction (unstructured) or N non-zeros per M."""

    fraction: float
    n: int = 0  # N:M: non-zeros kept per group
    m: int = 0  # N:M: group size (0: unstructured)

    @classmethod
    def parse(cls, value: float | str) -> Sparsity:
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
            if match is None:
                try:
                    return cls.parse(float(value))
                except ValueError:
                    raise ValueError(
                        f"sparsity must be a fraction in (0, 1) or 'N:M' like '2:4', got {value!r}"
                    ) from None
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise ValueError(f"N:M sparsity needs 0 < N < M, got {value!r}")
            return cls(1 - n / m, n, m)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(
                f"sparsity must be a fraction in (0, 1) or 'N:M' like '2:4', got {value!r}"
            )
        return cls(float(value))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.fraction:.0%}"


def _weight_oi(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), a view (Conv1D stores (in, out))."""
    return module.weight.t() if layer_kind(module) == "conv1d" else module.weight


def mask_from_scores(scores: torch.Tensor, sp: Sparsity, per_row: bool = True) -> torch.Tensor:
    """Boolean mask of weights to prune (True = set to zero) from scores (out, in)."""
    out_f, in_f = scores.shape
    if sp.m:
        groups = scores.reshape(out_f, in_f // sp.m, sp.m)
        drop = groups.topk(sp.m - sp.n, dim=-1, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
        return mask.reshape(out_f, in_f)
    if per_row:
        k = int(in_f * sp.fraction)
        drop = scores.topk(k, dim=1, largest=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, drop, True)
    k = int(scores.numel() * sp.fraction)
    drop = scores.flatten().topk(k, largest=False).indices
    return (
        torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        .scatter_(0, drop, True)
        .view_as(scores)
    )


@torch.no_grad()
def sparsegpt_prune(
    w: torch.Tensor, H: torch.Tensor, sp: Sparsity, block: int = 128, damp: float = 0.01
) -> torch.Tensor:
    """SparseGPT on one weight (out, in) given H = (2/n) Σ xᵀx (in, in); returns the new weight."""
    W = w.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(H.shape[0], dtype=H.dtype) * damp * torch.diag(H).mean()
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    cols = W.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if sp.m:  # decided group by group, on the weights as updated so far
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = mask_from_scores(W1**2 / d[None] ** 2, sp, per_row=False)
        for i in range(i2 - i1):
            if sp.m and i % sp.m == 0:
                scores = W1[:, i : i + sp.m] ** 2 / d[i : i + sp.m][None] ** 2
                mask1[:, i : i + sp.m] = mask_from_scores(scores, sp)
            w_col = W1[:, i]
            q = w_col.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)


def _blocks(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(
        f"calibrated pruning needs a decoder with a list of blocks (model.layers or transformer.h); "
        f"{type(model).__name__} has none. Use method='magnitude' for other models"
    )


class _Stop(Exception):
    pass


class _InputStats:
    """Accumulates a layer's calibration inputs from a forward hook: Σ x_j² per column (Wanda),
    or H = (2/n) Σ xᵀx as a running mean over tokens (SparseGPT)."""

    def __init__(self, gram: bool) -> None:
        self.gram, self.n, self.value = gram, 0, None

    def update(self, module: nn.Module, args: tuple, out: object) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
        if self.gram:
            n = self.n + x.shape[0]
            acc = 2 * x.t() @ x / n
            self.value = acc if self.value is None else self.value * (self.n / n) + acc
            self.n = n
        else:
            acc = (x**2).sum(0)
            self.value = acc if self.value is None else self.value + acc


def calibration_batches(
    calibration: Sequence[str] | torch.Tensor | None,
    tokenizer,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
) -> torch.Tensor:
    """(n_samples, seq_len) token windows: random windows of the given texts (default: the
    built-in shakespeare train split), or the given token ids."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise ValueError(
                f"calibration token ids must be (batch, seq), got shape {tuple(calibration.shape)}"
            )
        return calibration.long()
    from . import data

    records = (
        data.load_records("shakespeare", "train")
        if calibration is None
        else [{"text": t} for t in calibration]
    )
    if tokenizer is None:
        raise ValueError("calibration from text needs a tokenizer (pass tokenizer=...)")
    ids = torch.cat(
        [torch.tensor(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in records]
    )
    if len(ids) < seq_len * n_samples // 4 or len(ids) <= seq_len:
        raise ValueError(
            f"calibration text has {len(ids)} tokens, too short for {n_samples} windows of {seq_len} tokens"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | str = 0.5,
    calibration: Sequence[str] | torch.Tensor | None = None,
    *,
    tokenizer=None,
    n_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Prune the linear layers of ``model`` in place.

    Args:
        model: an HF decoder (LLaMA family, GPT-2, ...); magnitude works on any model.
        method: "magnitude" | "wanda" | "sparsegpt".
        sparsity: a fraction in (0, 1) (unstructured; per output row for Wanda) or "N:M".
        calibration: texts or token ids (batch, seq); default: the built-in shakespeare train split.
        tokenizer: tokenizes text calibration data.
        n_samples, seq_len: calibration windows drawn from text.
        batch_size: windows per forward during calibration.
        progress: show a progress bar over blocks.

    Returns:
        Achieved sparsity (fraction of zeros) per pruned layer path.
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    sp = Sparsity.parse(sparsity)
    paths = [
        p
        for p in match_targets(model, "all-linear")
        if layer_kind(model.get_submodule(p)) != "embedding"
    ]
    if sp.m:
        bad = [(p, _weight_oi(model.get_submodule(p)).shape[1]) for p in paths]
        bad = [(p, d) for p, d in bad if d % sp.m]
        if bad:
            raise ValueError(
                f"{sp} sparsity needs input dims divisible by {sp.m}; {bad[0][0]} has {bad[0][1]}"
            )
    if method == "magnitude":
        for p in paths:
            w = _weight_oi(model.get_submodule(p))
            w[mask_from_scores(w.abs().float(), sp, per_row=False)] = 0
        return {p: float((model.get_submodule(p).weight == 0).float().mean()) for p in paths}

    blocks = _blocks(model)
    batches = calibration_batches(calibration, tokenizer, n_samples, seq_len)
    device = next(model.parameters()).device
    # Capture what the first block receives (hidden states and every keyword argument).
    inputs: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(((hidden, *args[1:]), kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(batches), batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=batches[i : i + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()

    for block in tqdm(blocks, desc=f"{method} {sp}", disable=not progress):
        layers = {
            p: m for p, m in block.named_modules() if p and layer_kind(m) in ("linear", "conv1d")
        }
        stats = {p: _InputStats(gram=method == "sparsegpt") for p in layers}
        handles = [m.register_forward_hook(stats[p].update) for p, m in layers.items()]
        for args, kwargs in inputs:
            block(*args, **kwargs)
        for h in handles:
            h.remove()
        for name, m in layers.items():
            w = _weight_oi(m)
            if method == "wanda":  # ‖X_j‖₂ over all calibration tokens
                w[mask_from_scores(w.abs().double() * stats[name].value.sqrt()[None], sp)] = 0
            else:
                w.copy_(sparsegpt_prune(w, stats[name].value, sp))
        # The next block sees this block's outputs after pruning.
        new_inputs = []
        for args, kwargs in inputs:
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            new_inputs.append(((hidden, *args[1:]), kwargs))
        inputs = new_inputs
    return {p: float((model.get_submodule(p).weight == 0).float().mean()) for p in paths}

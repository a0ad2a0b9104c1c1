"""Pruning to unstructured or N:M sparsity: magnitude, Wanda, SparseGPT.

- magnitude: drop the smallest |W| (per layer; N:M per group).
- Wanda (Sun et al. 2023, arXiv 2306.11695): score S_ij = |W_ij|·‖X_j‖₂ over calibration tokens;
  unstructured drops the lowest fraction of each output row; no weight update.
- SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): H = (2/n) Σ xᵀx with 1 % mean-diagonal
  dampening; columns in blocks of 128; mask by w²/[H⁻¹]_jj² (per block for unstructured, per
  group for N:M); each pruned column's error is propagated to the remaining columns (the OBS
  update) through the upper Cholesky factor of H⁻¹.

"N:M" means at most N non-zeros in every M consecutive input weights of a row (2:4 = 50 %).
Calibration is sequential, as in both papers: decoder block i sees the outputs of the already
pruned blocks 0..i-1; within a block, all its layers are calibrated in one forward of the unpruned
block and then pruned (the reference code's order). Embeddings and the output head are never pruned.

How this differs from the reference code (locuslab/wanda ``lib/prune.py``, ``lib/sparsegpt.py``),
compared on SmolLM2-135M by ``bench/prune.py`` (``bench/results/prune.md``):

- Same algorithm, same masks up to ties: the reference prunes ``k + 1`` weights per SparseGPT
  block and per magnitude layer (``<=`` its k-th value), lorakit exactly ``k``.
- Speed, not results: calibration forwards run in batches (the reference: one window at a time);
  layers that read the same input tensor (q/k/v, gate/up) share one statistic, accumulated once,
  and SparseGPT solves them as one stacked matrix (rows are independent given H; each layer keeps
  its own mask threshold), so a LLaMA block needs 4 solves, not 7; H⁻¹'s Cholesky factor comes
  from one Cholesky and one triangular inverse (``cholesky_inverse`` was slow and erratic on
  CPU); the OBS column loop updates 16-column sub-blocks and folds the rest in with one matmul.
- Precision: statistics and solves in float32, as in the reference (float64 for float64 inputs).
- Block size 128 is kept for unstructured SparseGPT (it sets how adaptive the mask is); for N:M it
  is rounded down to a multiple of M so a group never straddles two blocks (1:3 on 192 columns).
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
        bad = f"sparsity must be a fraction in (0, 1) or 'N:M' like '2:4', got {value!r}"
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
            if match is None:
                try:
                    return cls.parse(float(value))
                except ValueError:
                    raise ValueError(bad) from None
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise ValueError(f"N:M sparsity needs 0 < N < M, got {value!r}")
            return cls(1 - n / m, n, m)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(bad)
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
        if in_f % sp.m:
            raise ValueError(f"{sp} sparsity needs a width divisible by {sp.m}, got {in_f} columns")
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


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper-triangular U with H⁻¹ = Uᵀ U (the upper Cholesky factor of H⁻¹).

    With J the exchange matrix (``flip``): J H J = L Lᵀ gives H = R Rᵀ with R = J L J upper, so
    H⁻¹ = (R⁻¹)ᵀ R⁻¹ and U = R⁻¹ = J L⁻¹ J: one Cholesky and one triangular inverse.
    """
    L = torch.linalg.cholesky(H.flip(0, 1))  # raises if H is not positive definite
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)


@torch.no_grad()
def sparsegpt_prune(
    w: torch.Tensor | Sequence[torch.Tensor],
    H: torch.Tensor,
    sp: Sparsity,
    block: int = 128,
    damp: float = 0.01,
) -> torch.Tensor | list[torch.Tensor]:
    """SparseGPT on one weight (out, in) given H = (2/n) Σ xᵀx (in, in); returns the new weight.

    ``w`` may also be a list of weights that read the same input (q/k/v): they are solved as one
    stacked matrix (rows are independent given H), each with its own mask threshold, which gives
    the same result as one call per weight in fewer steps; a list of new weights is returned.
    Computes in float32 (float64 if H is float64), on H's device.
    """
    weights = [w] if isinstance(w, torch.Tensor) else list(w)
    cols = H.shape[0]
    for x in weights:
        if x.dim() != 2 or x.shape[1] != cols:
            raise ValueError(f"weights must be (out, {cols}) to match H, got {tuple(x.shape)}")
    if sp.m:
        if cols % sp.m:
            raise ValueError(f"{sp} sparsity needs a width divisible by {sp.m}, got {cols} columns")
        block = max(sp.m, block // sp.m * sp.m)  # a group never straddles two blocks
    step = max(sp.m, 16 // sp.m * sp.m) if sp.m else 16  # columns per rank-1 sub-block
    dtype = torch.promote_types(H.dtype, torch.float32)
    rows = [x.shape[0] for x in weights]
    # Transposed, (in, rows): a column of W is a contiguous row here.
    Wt = torch.cat([x.to(device=H.device, dtype=dtype).t() for x in weights], dim=1)
    H = H.to(dtype, copy=True)
    diag = H.diagonal()
    dead = diag == 0  # inputs that were always zero: their weights never mattered
    diag.masked_fill_(dead, 1)
    Wt.masked_fill_(dead[:, None], 0)
    diag.add_(damp * diag.mean())
    U = _inverse_cholesky(H)  # (in, in) upper
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = Wt[i1:i2]  # (count, rows), updated in place
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()[:, None]  # (count, 1)
        if sp.m:  # decided group by group, on the weights as updated so far
            drop = torch.zeros_like(W1, dtype=torch.bool)
        else:
            scores = (W1 / d).square().t()  # (rows, count)
            drop = torch.cat(
                [mask_from_scores(s, sp, per_row=False) for s in scores.split(rows)]
            ).t()
            scale = drop / d  # err = w * scale: the pruned part over [H⁻¹]_jj
        err = torch.empty_like(W1)  # (count, rows)
        for j1 in range(0, i2 - i1, step):
            j2 = min(j1 + step, i2 - i1)
            for j in range(j1, j2):
                if sp.m and j % sp.m == 0:
                    g = slice(j, j + sp.m)
                    drop[g] = mask_from_scores((W1[g] / d[g]).square().t(), sp).t()
                    scale_g = drop[g] / d[g]
                s = scale_g[j % sp.m] if sp.m else scale[j]
                torch.mul(W1[j], s, out=err[j])
                if j + 1 < j2:
                    W1[j + 1 : j2].addr_(U1[j, j + 1 : j2], err[j], alpha=-1)
            if j2 < i2 - i1:
                W1[j2:].addmm_(U1[j1:j2, j2:].t(), err[j1:j2], alpha=-1)
        W1.masked_fill_(drop, 0)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), err, alpha=-1)
    out = [
        o.t().to(x.dtype, memory_format=torch.contiguous_format)
        for o, x in zip(Wt.split(rows, dim=1), weights, strict=True)
    ]
    return out[0] if isinstance(w, torch.Tensor) else out


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


class _Calibration:
    """Forward pre-hooks on a block's layers accumulating their calibration input statistics:
    Σ_t x_tj² per input column (Wanda) or Σ_t x_tᵀ x_t (SparseGPT), in float32 (float64 for
    float64 inputs). Layers fed the very same input tensor (q/k/v, gate/up) form one group with
    one statistic, computed once; ``groups`` lists them in call order.

    The forward is cut short once every layer has seen its input (down_proj's product and what
    follows are not needed); ``only``: record just this group's input, at its first layer.
    """

    def __init__(
        self, layers: dict[str, nn.Module], gram: bool, only: Sequence[str] | None = None
    ) -> None:
        self.gram = gram
        self.owner: dict[str, str] = {}  # layer -> first layer reading the same input
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._last: tuple[torch.Tensor, str] | None = None  # keeps the tensor alive for `is`
        self._only, self._n, self._seen = only is not None, len(layers), set()
        if only is not None:
            self.owner = dict.fromkeys(only, only[0])
            layers = {only[0]: layers[only[0]]}
        self._handles = [m.register_forward_pre_hook(self._hook(p)) for p, m in layers.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._only:
                self._add(name, x)
                raise _Stop  # nothing after this input is needed
            if self._last is not None and self._last[0] is x:
                owner = self._last[1]
            else:
                owner = name
                self._add(name, x)
                self._last = (x, name)
            if self.owner.setdefault(name, owner) != owner:
                raise RuntimeError(f"{name} shared its input with another layer in one batch only")
            self._seen.add(name)
            if len(self._seen) == self._n:
                raise _Stop

        return record

    def _add(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        # (in, in) Gram matrix, or (in,) squared column norms (one fused pass over x)
        acc = x.t() @ x if self.gram else torch.linalg.vector_norm(x, dim=0).square()
        if name in self.sums:
            self.sums[name] += acc
            self.tokens[name] += x.shape[0]
        else:
            self.sums[name], self.tokens[name] = acc, x.shape[0]

    def run(self, block: nn.Module, inputs: list[tuple[tuple, dict]]) -> _Calibration:
        """Forward every calibration batch through ``block`` (cut short where asked), then unhook."""
        try:
            for args, kwargs in inputs:
                with contextlib.suppress(_Stop):
                    block(*args, **kwargs)
                self._last, self._seen = None, set()
        finally:
            for h in self._handles:
                h.remove()
        return self

    def groups(self, layers: dict[str, nn.Module]) -> list[list[str]]:
        """Layers reading one input, in call order; every layer of ``layers`` must be in one."""
        missing = [p for p in layers if p not in self.owner]
        if missing:
            raise ValueError(f"{missing[0]} received no input in a calibration forward")
        out: dict[str, list[str]] = {}
        for name, owner in self.owner.items():
            out.setdefault(owner, []).append(name)
        return list(out.values())

    def prune(self, layers: dict[str, nn.Module], names: list[str], sp: Sparsity) -> None:
        """Prune the group ``names`` (one shared input) from its statistic."""
        weights = [_weight_oi(layers[p]) for p in names]
        stat = self.sums.pop(names[0])
        if not self.gram:  # Wanda: |W_ij|·‖X_j‖₂ over all calibration tokens
            norm = stat.sqrt()[None]  # (1, in)
            for w in weights:
                w.masked_fill_(mask_from_scores(w.abs() * norm, sp), 0)
            return
        H = stat.mul_(2 / self.tokens[names[0]])  # (2/n) Σ xᵀx
        for w, new in zip(weights, sparsegpt_prune(weights, H, sp), strict=True):
            w.copy_(new)


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


def _first_block_inputs(
    model: nn.Module, first: nn.Module, batches: torch.Tensor, batch_size: int
) -> list[tuple[tuple, dict]]:
    """What the first block receives for each calibration batch: hidden states and every
    keyword argument (position embeddings, masks), captured by running the model up to it."""
    device = next(model.parameters()).device
    inputs: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(((hidden, *args[1:]), kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(batches), batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=batches[i : i + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return inputs


def _prune_block(
    block: nn.Module,
    inputs: list[tuple[tuple, dict]],
    sp: Sparsity,
    gram: bool,
    structure: dict[tuple[str, ...], list[list[str]]] | None,
) -> None:
    """Calibrate and prune one block's layers; ``structure`` (a cache of each block kind's
    groups) selects true-sequential order, None the reference's one pass."""
    layers = {p: m for p, m in block.named_modules() if p and layer_kind(m) in ("linear", "conv1d")}
    if structure is not None:  # each group calibrated after the groups before it are pruned
        kind = tuple(layers)
        if kind not in structure:  # learned from one batch
            structure[kind] = _Calibration(layers, False).run(block, inputs[:1]).groups(layers)
        for names in structure[kind]:
            _Calibration(layers, gram, only=names).run(block, inputs).prune(layers, names, sp)
        return
    calib = _Calibration(layers, gram).run(block, inputs)  # every layer on the unpruned block
    for names in calib.groups(layers):
        calib.prune(layers, names, sp)


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
    true_sequential: bool = False,
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
        true_sequential: within a block, calibrate each group of layers that read one input
            (q/k/v, o, gate/up, down) on the outputs of the groups before it, already pruned
            (more forwards); default: calibrate all of a block's layers in one forward of the
            unpruned block, then prune them (the reference code's order).
        progress: show a progress bar over blocks.

    Returns:
        Achieved sparsity (fraction of zeros) per pruned layer path.
    """
    from .progress import bar

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    sp = Sparsity.parse(sparsity)
    paths = [
        p
        for p in match_targets(model, "all-linear")
        if layer_kind(model.get_submodule(p)) != "embedding"
    ]
    widths = [(p, _weight_oi(model.get_submodule(p)).shape[1]) for p in paths]
    if bad := [(p, d) for p, d in widths if sp.m and d % sp.m]:
        raise ValueError(
            f"{sp} sparsity needs input dims divisible by {sp.m}; {bad[0][0]} has {bad[0][1]}"
        )
    if method == "magnitude":
        for p in paths:
            w = _weight_oi(model.get_submodule(p))
            w.masked_fill_(mask_from_scores(w.abs(), sp, per_row=False), 0)
        return {p: float((model.get_submodule(p).weight == 0).float().mean()) for p in paths}

    blocks = _blocks(model)
    batches = calibration_batches(calibration, tokenizer, n_samples, seq_len)
    inputs = _first_block_inputs(model, blocks[0], batches, batch_size)
    gram = method == "sparsegpt"
    structure: dict[tuple[str, ...], list[list[str]]] = {}  # layer names -> groups, per block kind
    for i, block in enumerate(bar(blocks, desc=f"{method} {sp}", unit="block", on=progress)):
        _prune_block(block, inputs, sp, gram, structure if true_sequential else None)
        if i + 1 < len(blocks):  # the next block sees this block's outputs after pruning
            new_inputs = []
            for args, kwargs in inputs:
                out = block(*args, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
                new_inputs.append(((hidden, *args[1:]), kwargs))
            inputs = new_inputs
    return {p: float((model.get_submodule(p).weight == 0).float().mean()) for p in paths}

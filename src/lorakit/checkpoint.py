"""Checkpoints of a training run: write (atomically), find, check, load, resume.

A checkpoint folder holds the adapter (or the full weights), the optimizer state (whole, so a
run may resume with another world size), the scheduler, the RNG state of every process and
device, the step and the run's flat config. It is written into a temp folder and swapped in
(:func:`lorakit.fileio.atomic_folder`): a crash mid-save leaves the previous one readable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import copy_adapter_weights, read_adapter
from .config import TrainConfig
from .distributed import SINGLE, Context
from .fileio import atomic_folder
from .schedule import LENGTH_KEYS, extends

# Fields that may change between a run and its resumption (they do not change the math).
RESUMABLE_CHANGES = (
    "eval_every",
    "save_every",
    "eval_examples",
    "progress",
    "report_to",
    "early_stopping_patience",  # when to stop, not what a step computes
    "output",
    "device",
    "strategy",  # DDP and FSDP compute the same thing; so does any world size dividing the batch
    "offload",  # where the checkpointed inputs wait, not what they are
    "compile",  # the same function, fused
    "fit",  # a budget: what it chose is checked as any other key
)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(
    folder: Path,
    model,
    optimizer,
    scheduler,
    cfg: TrainConfig,
    step: int,
    ctx: Context = SINGLE,
    fingerprint: dict[str, Any] | None = None,
    grad_scaler: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint to ``folder`` atomically (temp folder, then renames).

    ``fingerprint`` (:func:`data_fingerprint`) is kept so that a resume on other data refuses;
    ``grad_scaler``: a float16 run's loss-scaler state (:mod:`lorakit.precision`).
    Distributed: every rank calls this (sharded tensors are gathered whole, every rank's RNG
    state is collected); rank 0 alone writes.
    """
    from safetensors.torch import save_file

    from .adapters import adapter_payload, write_adapter
    from .distributed import all_gather, full

    if cfg.method == "full":
        weights = {n: full(p.detach()).cpu().contiguous() for n, p in trainable_parameters(model)}
    else:
        adapter = adapter_payload(model)
    state = optimizer.state_dict()
    tensors = {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            v = full(v.detach()).cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = v
    rngs = all_gather(rng_states(model.parameters()), ctx)
    if not ctx.is_main:
        return
    for r, states in enumerate(rngs):
        for k, v in states.items():
            tensors[f"rng.{k}" + (f".rank{r}" if r else "")] = v
    with atomic_folder(folder) as tmp:
        if cfg.method == "full":
            save_file(weights, tmp / "weights.safetensors")
        else:
            write_adapter(tmp / "adapter", adapter)
        save_file(tensors, tmp / "trainer_state.safetensors")
        meta = {
            "step": step,
            "world_size": ctx.world,
            "config": cfg.to_flat(),
            "param_groups": state["param_groups"],
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "fingerprint": fingerprint,
        }
        if grad_scaler:
            meta["grad_scaler"] = grad_scaler
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))


def find_checkpoint(output: Path) -> Path | None:
    """The last complete checkpoint (``checkpoint``, or ``checkpoint.old`` if a swap was cut)."""
    for name in ("checkpoint", "checkpoint.old"):
        if (output / name / "trainer_state.json").exists():
            return output / name
    return None


def check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume ``saved`` (a checkpoint's flat config) with a config that changes the math.

    The saved mapping is rebuilt into a :class:`TrainConfig` first, so keys added since it was
    written take their defaults and derived values (``use_rslora``) are derived the same way.
    """
    then = TrainConfig.from_flat(saved).to_flat()
    now = cfg.to_flat()
    may_change = RESUMABLE_CHANGES + (LENGTH_KEYS if extends(then, now) else ())  # more steps
    diff = [k for k in now if k not in may_change and then.get(k) != now[k]]
    if diff:
        detail = ", ".join(f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in diff)
        raise ValueError(
            f"cannot resume: the config differs from the checkpoint's in {diff} ({detail})"
        )


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _files(source: str | None) -> dict[str, str]:
    """sha256 of a local data file (nothing for a built-in or hub name)."""
    if source is None or not Path(source).expanduser().is_file():
        return {}
    return {source: _sha256(Path(source).expanduser().read_bytes())}


def _tokenizer_digest(tokenizer) -> str:
    """A digest of what decides token ids: the vocabulary, merges and normalisation (a fast
    tokenizer's whole definition), and the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return _sha256((body + special).encode())


def data_fingerprint(
    cfg: TrainConfig, tokenizer, spec: dict[str, Any], train: list, val: list, examples: list
) -> dict[str, Any]:
    """What a run's data is, as a resume compares it: the data files' hashes, the record counts
    and a hash of the records, the tokenizer, the prompt / chat template (``spec``: how inputs
    are encoded) and a hash of the encoded training examples (their order follows their count)."""

    def digest(obj) -> str:
        return _sha256(json.dumps(obj, sort_keys=True, default=str).encode())

    return {
        "files": {**_files(cfg.data), **_files(cfg.val_data)},
        "train_records": len(train),
        "val_records": len(val),
        "records": digest([train, val]),
        "tokenizer": _tokenizer_digest(tokenizer) if tokenizer is not None else None,
        "encoding": digest(spec),
        "examples": digest(examples),
    }


_WHAT = {
    "files": "the data files' contents (sha256)",
    "train_records": "the number of training records",
    "val_records": "the number of validation records",
    "records": "the records' text or labels",
    "tokenizer": "the tokenizer (vocabulary, merges or special tokens)",
    "encoding": "the prompt, chat template or classes",
    "examples": "the encoded training examples",
}


def check_fingerprint(saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse to resume on data other than the checkpoint's, saying what changed."""
    if saved is None:  # a checkpoint written before fingerprints were kept
        import warnings

        warnings.warn(
            "the checkpoint records no data fingerprint (written by an older lorakit); resuming "
            "without checking that the data is the same",
            stacklevel=2,
        )
        return
    changed = [k for k in _WHAT if k in saved and saved[k] != now.get(k)]
    if not changed:
        return
    details = []
    for k in changed:
        if k in ("train_records", "val_records"):
            details.append(f"{_WHAT[k]}: {saved[k]} -> {now[k]}")
        elif k == "files":
            names = sorted(set(saved[k]) | set(now[k]))
            diff = [n for n in names if saved[k].get(n) != now[k].get(n)]
            details.append(f"{_WHAT[k]}: {', '.join(diff)}")
        else:
            details.append(_WHAT[k])
    raise ValueError(
        "cannot resume: the data differs from the checkpoint's ("
        + "; ".join(details)
        + "). Resume on the same data, tokenizer and template, or start over with --overwrite"
    )


def load_weights(folder: Path, model, cfg: TrainConfig) -> dict[str, Any]:
    """Check the checkpoint's config and copy its trained weights into the (unwrapped) model."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "trainer_state.json").read_text())
    check_resumable(meta["config"], cfg)
    with torch.no_grad():
        if cfg.method == "full":
            weights = load_file(folder / "weights.safetensors")
            for n, p in trainable_parameters(model):
                p.copy_(weights[n])
        else:
            saved = read_adapter(folder / "adapter")
            copy_adapter_weights(model, saved.weights, "default")
            params = dict(model.named_parameters(remove_duplicate=False))
            for key, t in saved.saved_params.items():  # modules_to_save (e.g. a classifier head)
                params[key].copy_(t)
    return meta


def load_trainer_state(
    folder: Path,
    meta: dict[str, Any],
    optimizer,
    scheduler,
    cfg: TrainConfig,
    ctx: Context = SINGLE,
) -> int:
    """Optimizer, scheduler and RNG state (after the model is wrapped); returns the step.

    Optimizer states are stored whole and re-sharded like their parameters, so a run may resume
    with another world size. Each rank restores its own RNG state when the world size is the
    one saved; otherwise rank r reseeds with (seed, r, step): only dropout masks differ.
    """
    from safetensors.torch import load_file

    from .distributed import like

    tensors = load_file(folder / "trainer_state.safetensors")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state["state"].setdefault(int(idx), {})[k] = like(v, params[int(idx)])
    optimizer.load_state_dict(state)
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None]})
    step = int(meta["step"])
    suffix = f".rank{ctx.rank}" if ctx.rank else ""
    saved = {
        k[4 : len(k) - len(suffix)]: v
        for k, v in tensors.items()
        if k.startswith("rng.") and k.endswith(suffix) and (suffix or ".rank" not in k)
    }
    if meta.get("world_size", 1) != ctx.world or not set_rng_states(saved, params):
        torch.manual_seed(cfg.seed * 1_000_003 + ctx.rank * 7_919 + step)  # also seeds CUDA
    return step


def _cuda_devices(tensors) -> list[torch.device]:
    """The CUDA devices holding ``tensors``: their generators draw this process's dropout masks."""
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=lambda d: d.index)


def rng_states(params) -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator and that of every CUDA device in use."""
    states = {"torch": torch.get_rng_state()}
    for d in _cuda_devices(params):
        states[f"cuda{d.index}"] = torch.cuda.get_rng_state(d)
    return states


def set_rng_states(states: dict[str, torch.Tensor], params) -> bool:
    """Restore :func:`rng_states`; False (nothing restored) unless every generator now in use
    has a saved state."""
    devices = _cuda_devices(params)
    if "torch" not in states or any(f"cuda{d.index}" not in states for d in devices):
        return False
    torch.set_rng_state(states["torch"])
    for d in devices:
        torch.cuda.set_rng_state(states[f"cuda{d.index}"], d)
    return True

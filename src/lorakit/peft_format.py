"""PEFT's on-disk adapter format, read and checked without touching a model.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), or
``.lora_embedding_A`` / ``.lora_embedding_B`` for embeddings. lorakit-specific facts (the method,
a LoRS adapter's zero-pattern fingerprints) go into the safetensors header metadata, which PEFT
ignores. Pickle files are refused; so is every PEFT LoRA variant lorakit does not implement.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CAPABILITIES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
# PEFT also saves whole embedding weights when an embedding is targeted (save_embedding_layers).
_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.base_layer\.weight$")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+?)\."
    r"(?:(?P<lin>lora_[AB])(?:\.[^.]+)?\.weight|(?P<emb>lora_embedding_[AB])(?:\.[^.]+)?)$"
)


# peft_type values lorakit reads: PEFT's LoRA, and the methods PEFT cannot compute (saved under
# their own type so that PEFT refuses them).
PEFT_TYPES = {"LORA"} | {m.upper() for m, c in CAPABILITIES.items() if not c.peft_exact}
# adapter_config.json keys lorakit understands, each with the values it loads exactly (_ANY: any
# value; the key selects layers or describes the run). Any other key is accepted only "off"
# (_OFF): a key PEFT adds for a new variant is refused once someone switches it on.
_ANY = None
_OFF = (None, False, [], {})
_UNDERSTOOD: dict[str, tuple | None] = {
    **dict.fromkeys(
        ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path"),
        _ANY,
    ),
    **dict.fromkeys(("revision", "inference_mode", "r", "lora_alpha", "lora_dropout"), _ANY),
    **dict.fromkeys(("target_modules", "exclude_modules", "layers_to_transform"), _ANY),
    "target_parameters": _ANY,  # MoE expert tensors (lorakit.experts)
    **dict.fromkeys(("layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save"), _ANY),
    **dict.fromkeys(("use_rslora", "fan_in_fan_out", "ensure_weight_tying"), _ANY),
    # Settings of variants that are off: PEFT writes their defaults into every config.
    **dict.fromkeys(("megatron_core", "qalora_group_size", "runtime_config"), _ANY),
    "bias": ("none",),
    # Initialisations that leave the base weights as they were (pissa, olora, loftq, corda,
    # lora_ga change them; mica is a variant with its own forward).
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal"),
    "eva_config": _ANY,  # used at initialisation only
}


def mask_fingerprint(weight: torch.Tensor) -> str:
    """A short hash of a weight's zero pattern (shape included)."""
    import hashlib

    import numpy as np

    bits = np.packbits((weight.detach() != 0).cpu().numpy().reshape(-1))
    digest = hashlib.sha256(repr(tuple(weight.shape)).encode() + bits.tobytes()).hexdigest()
    return digest[:16]


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_NAME
    if not file.exists():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME} (is it an adapter folder?)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type not in PEFT_TYPES:
        raise ValueError(
            f"{file}: only LoRA adapters are supported, got peft_type={peft_type!r} "
            f"(lorakit reads peft_type {sorted(PEFT_TYPES)})"
        )
    for key, value in config.items():
        allowed = _UNDERSTOOD.get(key, _OFF)
        if allowed is _ANY or any(value == a and type(value) is type(a) for a in allowed):
            continue
        why = (
            f"{key} must be one of {list(allowed)}"
            if key in _UNDERSTOOD
            else "it switches on a LoRA variant lorakit does not implement"
        )
        raise ValueError(
            f"{file}: {key}={value!r} is not supported ({why}; loading it as plain LoRA would "
            f"compute something else). lorakit loads plain LoRA: rank/alpha patterns, rsLoRA, "
            f"modules_to_save, embeddings, Conv1D, bias='none', init_lora_weights in "
            f"{list(_UNDERSTOOD['init_lora_weights'])}"
        )
    return config


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    file = folder / WEIGHTS_NAME
    if not file.exists():
        pickles = [p for p in _PICKLES if (folder / p).exists()]
        if pickles:
            raise ValueError(
                f"refusing to load {folder / pickles[0]}: it is a pickle file, which can run "
                f"arbitrary code. Convert it to {WEIGHTS_NAME} (safetensors) first"
            )
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{file} is truncated or corrupted (not a valid safetensors file): {e}"
        ) from e
    return tensors, metadata


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    # PEFT semantics: a pattern matches a module path if it matches a dotted suffix of it.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?(?:{pattern})$", path):
            return value
    return default


@dataclass
class AdapterFile:
    """A parsed adapter folder."""

    config: dict[str, Any]  # adapter_config.json
    weights: dict[str, dict[str, torch.Tensor]]  # module path -> {"A": (r, in), "B": (out, r)}
    kinds: dict[str, str]  # module path -> "linear" | "embedding" | "experts" (once resolved)
    base_weights: dict[str, torch.Tensor]  # module path -> whole weight PEFT saved alongside
    saved_params: dict[str, torch.Tensor]  # parameter path -> tensor, from modules_to_save
    metadata: dict[str, str]  # safetensors header metadata


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Parse and check an adapter folder without touching any model."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    config = _read_config(folder)
    tensors, metadata = _read_tensors(folder)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA" and metadata.get("lorakit_method", "").upper() != peft_type:
        raise ValueError(
            f"{folder}: adapter_config.json says peft_type={peft_type!r} but "
            f"{WEIGHTS_NAME} says method {metadata.get('lorakit_method')!r}; the folder is mixed up"
        )

    # Group A/B tensors by module path.
    found: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    base_weights: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if (b := _BASE_KEY.match(key)) is not None:
            base_weights[b["path"]] = t
            continue
        m = _KEY.match(key)
        if m is None and config.get("modules_to_save"):
            saved[key.removeprefix(PREFIX)] = t  # a parameter of a module trained fully
            continue
        if m is None:
            raise ValueError(
                f"{folder / WEIGHTS_NAME}: unexpected key {key!r}; expected "
                f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight' (or lora_embedding_A/B)"
            )
        which = (m["lin"] or m["emb"])[-1]
        found.setdefault(m["path"], {})[which] = t
        kinds[m["path"]] = "embedding" if m["emb"] else "linear"
    if not found:
        raise ValueError(f"{folder / WEIGHTS_NAME} holds no LoRA weights")
    for p, pair in found.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise ValueError(f"{folder / WEIGHTS_NAME}: module {p} lacks lora_{missing}")
    return AdapterFile(config, found, kinds, base_weights, saved, metadata)

"""Saving and loading adapters in PEFT's on-disk format, both ways.

A directory with ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), or
``.lora_embedding_A`` / ``.lora_embedding_B`` for embeddings. PEFT's ``PeftModel.from_pretrained``
loads what we write; :func:`load_adapter` loads what PEFT's ``save_pretrained`` writes.

lorakit-specific facts (the method) go into the safetensors header metadata, which PEFT ignores,
so the JSON stays exactly PEFT's schema. Pickle files (``adapter_model.bin``) are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CAPABILITIES, LoRAConfig
from .fileio import atomic_write
from .inject import (
    active_adapter,
    adapted_layers,
    add_adapter,
    freeze_base,
    modules_to_save,
    set_adapter,
)
from .layers import AdaptedLayer, layer_kind

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


def _peft_key(path: str, layer: AdaptedLayer, which: str) -> str:
    if layer.kind == "embedding":
        return f"{PREFIX}{path}.lora_embedding_{which}"
    return f"{PREFIX}{path}.lora_{which}.weight"


def _target_modules(model: nn.Module, paths: list[str]) -> list[str] | str:
    """PEFT ``target_modules`` selecting exactly ``paths``: leaf names if they do, else a regex."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {
        p
        for p, m in model.named_modules()
        if layer_kind(m) is not None and any(p == s or p.endswith("." + s) for s in leaves)
    }
    if selected == set(paths):
        return leaves
    return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Save one adapter in PEFT's format.

    Args:
        model: an injected model.
        path: output directory (created if needed; files inside are replaced atomically).
        name: which adapter (default: the active one).

    Returns:
        The directory written.
    """
    return write_adapter(path, adapter_payload(model, name))


def _whole(t: torch.Tensor) -> torch.Tensor:
    from .distributed import full

    return full(t.detach()).to("cpu").contiguous()


def adapter_payload(
    model: nn.Module, name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """(tensors, PEFT config, safetensors metadata) of one adapter, tensors whole and on CPU.

    Under FSDP every rank must call this (sharded tensors are gathered); one rank writes.
    """
    name = name or active_adapter(model)
    layers = [(p, layer) for p, layer in adapted_layers(model) if name in layer.adapters]
    if name is None or not layers:
        raise ValueError(f"the model has no adapter named {name!r} to save")
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, LoRAConfig] = {}
    for p, layer in layers:
        adapter = layer.adapters[name]
        configs[p] = adapter.config
        for which in ("A", "B"):
            tensors[_peft_key(p, layer, which)] = _whole(getattr(adapter, f"lora_{which}"))

    first = next(iter(configs.values()))
    for mpath, module in modules_to_save(model, first.modules_to_save).items():
        for pname, t in module.named_parameters():
            tensors[f"{PREFIX}{mpath}.{pname}"] = _whole(t)

    # PEFT stores one r / alpha plus per-module exceptions (rank_pattern / alpha_pattern).
    ranks = Counter(c.rank for c in configs.values())
    alphas = Counter(c.alpha for c in configs.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    config: dict[str, Any] = {
        # A method PEFT cannot compute gets its own peft_type, so PEFT (and vLLM, TGI) refuse it
        # instead of applying s·B A the plain way; lorakit reads it back exactly.
        "peft_type": "LORA" if first.capabilities.peft_exact else first.method.upper(),
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout,
        "target_modules": _target_modules(model, [p for p, _ in layers]),
        "bias": "none",
        "use_rslora": first.use_rslora,
        "fan_in_fan_out": any(layer.kind == "conv1d" for _, layer in layers),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": list(first.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {f"^{re.escape(p)}": c.rank for p, c in configs.items() if c.rank != r},
        "alpha_pattern": {
            f"^{re.escape(p)}": c.alpha for p, c in configs.items() if c.alpha != alpha
        },
        "use_dora": False,
        "revision": None,
    }
    metadata = {"format": "pt", "lorakit_method": first.method, "lorakit_init": first.init}
    if first.grad_correction:
        metadata["lorakit_grad_correction"] = "true"
    if first.adapter_dtype:
        metadata["lorakit_adapter_dtype"] = first.adapter_dtype
    if first.method == "lors":
        metadata["lorakit_sparse_grad"] = first.sparse_grad
    if first.capabilities.sparse_base:
        # The mask is the pruned base's zero pattern; a fingerprint of each layer's pattern lets
        # load_adapter refuse a differently pruned model.
        metadata["lorakit_masks"] = json.dumps(
            {p: mask_fingerprint(layer.adapters[name].pattern()) for p, layer in layers}
        )
    return tensors, config, metadata


def write_adapter(
    path: str | os.PathLike, payload: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]
) -> Path:
    """Write an :func:`adapter_payload` as a PEFT adapter folder (files replaced atomically)."""
    from safetensors.torch import save_file

    tensors, config, metadata = payload
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata=metadata))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(out / CONFIG_NAME, lambda f: Path(f).write_text(text))
    return out


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


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
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
    kinds: dict[str, str]  # module path -> "linear" | "embedding"
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


def copy_adapter_weights(
    model: nn.Module, found: dict[str, dict[str, torch.Tensor]], name: str
) -> None:
    """Copy A/B tensors into adapter ``name`` of an injected model; the layer sets must match."""
    layers = {p: layer for p, layer in adapted_layers(model) if name in layer.adapters}
    if set(layers) != set(found):
        missing, extra = sorted(set(layers) - set(found)), sorted(set(found) - set(layers))
        raise ValueError(
            f"adapter layers differ from the model's: missing {missing}, unexpected {extra}"
        )
    with torch.no_grad():
        for p, layer in layers.items():
            adapter = layer.adapters[name]
            for which in ("A", "B"):
                dst, src = getattr(adapter, f"lora_{which}"), found[p][which]
                if dst.shape != src.shape:
                    raise ValueError(
                        f"lora_{which} of {p}: saved {tuple(src.shape)}, model {tuple(dst.shape)}"
                    )
                dst.copy_(src)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    trainable: bool = False,
) -> nn.Module:
    """Load an adapter saved by lorakit or by PEFT into ``model``, in place.

    Every check runs before the model is touched: a mismatched file leaves the model as it was.

    Args:
        model: the base model (or a model that already has other adapters).
        path: adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        name: the name to give the adapter on the model.
        trainable: leave the adapter trainable (to continue training); by default everything is
            frozen, like PEFT's inference mode.

    Returns:
        ``model``, with the loaded adapter active.
    """
    folder = Path(path)
    file = read_adapter(folder)
    config, found, kinds, metadata = file.config, file.weights, file.kinds, file.metadata
    method = metadata.get("lorakit_method", "lora")
    base = LoRAConfig(
        method=method,
        rank=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        targets=sorted(found),
        use_rslora=bool(config.get("use_rslora", False)),
        init=metadata.get("lorakit_init", "kaiming"),
        # PEFT writes e.g. ["classifier", "score"] for any SEQ_CLS model: keep the ones that exist.
        modules_to_save=tuple(
            m
            for m in config.get("modules_to_save") or ()
            if any(p == m or p.endswith("." + m) for p, _ in model.named_modules())
        ),
        sparse_grad=metadata.get("lorakit_sparse_grad", "exact"),
        grad_correction=metadata.get("lorakit_grad_correction") == "true",
        adapter_dtype=metadata.get("lorakit_adapter_dtype"),
    )
    masks = json.loads(metadata.get("lorakit_masks", "{}"))
    configs: dict[str, LoRAConfig] = {}
    for p, pair in sorted(found.items()):
        try:
            module = model.get_submodule(p)
        except AttributeError:
            module = None
        kind = layer_kind(module) if module is not None else None
        if kind is None:
            what = "does not exist" if module is None else f"is a {type(module).__name__}"
            raise ValueError(
                f"adapter has weights for module {p!r}, which {what} in this model "
                f"({type(model).__name__}); is the adapter for another architecture?"
            )
        if (kind == "embedding") != (kinds[p] == "embedding"):
            raise ValueError(f"adapter weights for {p} are for a {kinds[p]} but it is a {kind}")
        if isinstance(module, AdaptedLayer) and name in module.adapters:
            raise ValueError(f"layer {p} already has an adapter named {name!r}")
        A, B = pair["A"], pair["B"]
        w = module.weight.shape
        in_f, out_f = (w[1], w[0]) if kind == "linear" else (w[0], w[1])
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape != (r, in_f) or B.shape != (out_f, r):
            raise ValueError(
                f"adapter shapes do not fit module {p}: lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)}, but the layer needs ({r}, {in_f}) and ({out_f}, {r}) "
                f"(weight {tuple(w)})"
            )
        if p in masks and mask_fingerprint(module.weight) != masks[p]:
            raise ValueError(
                f"this LoRS adapter was trained on a differently pruned model: the zero pattern of "
                f"{p} ({int((module.weight == 0).sum())} zeros) does not match the adapter's"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), p, base.alpha)
        configs[p] = base.replace(rank=r, alpha=float(alpha), targets=[p])

    for p, t in file.base_weights.items():
        if p not in found or t.shape != model.get_submodule(p).weight.shape:
            raise ValueError(
                f"{folder / WEIGHTS_NAME}: saved base weight for {p!r} of shape {tuple(t.shape)} "
                f"does not fit the model"
            )

    params = dict(model.named_parameters(remove_duplicate=False))
    saved_modules = modules_to_save(model, base.modules_to_save) if trainable else {}
    for key, t in file.saved_params.items():
        if key not in params or params[key].shape != t.shape:
            have = tuple(params[key].shape) if key in params else "no such parameter"
            raise ValueError(
                f"{folder / WEIGHTS_NAME}: saved parameter {key!r} {tuple(t.shape)} does not fit "
                f"the model ({have})"
            )

    add_adapter(model, sorted(found), configs, name)
    with torch.no_grad():
        for p, t in file.base_weights.items():
            model.get_submodule(p).weight.copy_(t)
        for key, t in file.saved_params.items():
            params[key].copy_(t)
    copy_adapter_weights(model, found, name)
    freeze_base(model)
    for module in saved_modules.values():
        module.requires_grad_(True)
    set_adapter(model, name)
    if not trainable:
        for _, layer in adapted_layers(model):
            for p in layer.adapters.parameters():
                p.requires_grad_(False)
    return model

"""Saving and loading adapters in PEFT's on-disk format, both ways.

A directory with ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), or
``.lora_embedding_A`` / ``.lora_embedding_B`` for embeddings. PEFT's ``PeftModel.from_pretrained``
loads what we write; :func:`load_adapter` loads what PEFT's ``save_pretrained`` writes.

lorakit-specific facts (the method, an explicit ``adapter_dtype``) go into the safetensors
header metadata, which PEFT ignores, so the JSON stays PEFT's schema; a method PEFT cannot
compute (LoRS) is written with its own ``peft_type`` so PEFT refuses it. Reading and checking the
files is :mod:`lorakit.peft_format`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import moe_format
from .bitmask import unpack_mask
from .config import LoRAConfig
from .experts import AdaptedExperts
from .fileio import atomic_write
from .inject import (
    active_adapter,
    adapted_layers,
    adapted_modules,
    add_adapter,
    freeze_base,
    modules_to_save,
    set_adapter,
)
from .layers import AdaptedLayer, layer_kind
from .peft_format import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    AdapterFile,
    mask_fingerprint,
    pattern_value,
    read_adapter,
)
from .quant import NO_PATTERN, dense_shape, zero_pattern
from .routers import AdaptedRouter


def _peft_key(path: str, layer: AdaptedLayer, which: str) -> str:
    if layer.kind == "embedding":
        return f"{PREFIX}{path}.lora_embedding_{which}"
    return f"{PREFIX}{path}.lora_{which}.weight"


def adapter_tensors(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """Path -> the module holding adapter ``name``'s ``lora_A`` / ``lora_B``: one per adapted
    layer, one per adapted MoE expert tensor (path ``<experts module>.<tensor>``)."""
    found: dict[str, nn.Module] = {}
    for p, module in adapted_modules(model):
        if name not in module.adapters:
            continue
        if isinstance(module, AdaptedExperts):
            found.update({f"{p}.{t}": a for t, a in module.adapters[name].items()})
        elif isinstance(module, AdaptedRouter):
            found[f"{p}.weight"] = module.adapters[name]
        else:
            found[p] = module.adapters[name]
    return found


def _target_modules(model: nn.Module, paths: list[str]) -> list[str] | str:
    """PEFT ``target_modules`` selecting exactly ``paths``: leaf names if they do, else a regex."""
    if not paths:
        return []
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
    found = adapter_tensors(model, name) if name is not None else {}
    if not found:
        raise ValueError(f"the model has no adapter named {name!r} to save")
    layers = [(p, layer) for p, layer in adapted_layers(model) if name in layer.adapters]
    tensor_paths = [p for p in found if p not in dict(layers)]
    tensors: dict[str, torch.Tensor] = {}
    configs = {p: adapter.config for p, adapter in found.items()}
    for p, layer in layers:
        for which in ("A", "B"):
            tensors[_peft_key(p, layer, which)] = _whole(
                getattr(layer.adapters[name], f"lora_{which}")
            )
    for p, (A, B) in moe_format.peft_entries(model, tensor_paths, found).items():
        tensors[f"{PREFIX}{p}.lora_A.weight"] = _whole(A)
        tensors[f"{PREFIX}{p}.lora_B.weight"] = _whole(B)

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
        "target_parameters": moe_format.target_parameters(model, tensor_paths),
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
    # Tensors are written in the adapter's dtype (fp32 on a 16-bit base by default, as PEFT
    # writes them). Only an explicit adapter_dtype is recorded: without it, loading applies the
    # default to the base it is loaded into, as PEFT's loader does.
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


def copy_adapter_weights(
    model: nn.Module, found: dict[str, dict[str, torch.Tensor]], name: str
) -> None:
    """Copy A/B tensors into adapter ``name`` of an injected model; the layer sets must match.

    Expert tensors' A / B may come in PEFT's (r·E, in) / (out, r·E) layout or lorakit's
    (E, r, in) / (E, out, r)."""
    layers = adapter_tensors(model, name)
    if set(layers) != set(found):
        missing, extra = sorted(set(layers) - set(found)), sorted(set(found) - set(layers))
        raise ValueError(
            f"adapter layers differ from the model's: missing {missing}, unexpected {extra}"
        )
    with torch.no_grad():
        for p, adapter in layers.items():
            pair = (found[p]["A"], found[p]["B"])
            if adapter.lora_A.dim() == 3 and pair[0].dim() == 2:
                pair = moe_format.from_peft(*pair, adapter.lora_A.shape[0])
            for which, src in zip("AB", pair, strict=True):
                dst = getattr(adapter, f"lora_{which}")
                if dst.shape != src.shape:
                    raise ValueError(
                        f"lora_{which} of {p}: saved {tuple(src.shape)}, model {tuple(dst.shape)}"
                    )
                dst.copy_(src)


def _base_config(model: nn.Module, file: AdapterFile) -> LoRAConfig:
    """The adapter's config (the method and flags from lorakit's metadata, if any)."""
    config, metadata = file.config, file.metadata
    return LoRAConfig(
        method=metadata.get("lorakit_method", "lora"),
        rank=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        targets=sorted(file.weights),
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


def _check_layer(model: nn.Module, file: AdapterFile, p: str, name: str) -> int:
    """Check that module ``p`` can take the file's A / B; returns the rank."""
    if file.kinds[p] == "experts":
        return moe_format.check_experts(model, file, p, name)
    if file.kinds[p] == "router":
        return moe_format.check_router(model, file, p, name)
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
    if (kind == "embedding") != (file.kinds[p] == "embedding"):
        raise ValueError(f"adapter weights for {p} are for a {file.kinds[p]} but it is a {kind}")
    if isinstance(module, AdaptedLayer) and name in module.adapters:
        raise ValueError(f"layer {p} already has an adapter named {name!r}")
    A, B = file.weights[p]["A"], file.weights[p]["B"]
    w = dense_shape(module.weight)
    in_f, out_f = (w[1], w[0]) if kind == "linear" else (w[0], w[1])
    r = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or A.shape != (r, in_f) or B.shape != (out_f, r):
        raise ValueError(
            f"adapter shapes do not fit module {p}: lora_A {tuple(A.shape)} and lora_B "
            f"{tuple(B.shape)}, but the layer needs ({r}, {in_f}) and ({out_f}, {r}) "
            f"(weight {tuple(w)})"
        )
    masks = json.loads(file.metadata.get("lorakit_masks", "{}"))
    if p in masks:
        bits = zero_pattern(module)
        if bits is None:
            raise ValueError(NO_PATTERN)
        kept = unpack_mask(bits, w, torch.bool)
        if mask_fingerprint(kept) != masks[p]:
            raise ValueError(
                f"this LoRS adapter was trained on a differently pruned model: the zero pattern "
                f"of {p} ({int((~kept).sum())} zeros) does not match the adapter's"
            )
    return r


def _check_saved_tensors(model: nn.Module, file: AdapterFile, folder: Path) -> None:
    """Whole base weights (PEFT's saved embeddings) and modules_to_save must fit the model."""
    for p, t in file.base_weights.items():
        if p not in file.weights or t.shape != model.get_submodule(p).weight.shape:
            raise ValueError(
                f"{folder / WEIGHTS_NAME}: saved base weight for {p!r} of shape {tuple(t.shape)} "
                f"does not fit the model"
            )
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, t in file.saved_params.items():
        if key not in params or params[key].shape != t.shape:
            have = tuple(params[key].shape) if key in params else "no such parameter"
            raise ValueError(
                f"{folder / WEIGHTS_NAME}: saved parameter {key!r} {tuple(t.shape)} does not fit "
                f"the model ({have})"
            )


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    trainable: bool = False,
) -> nn.Module:
    """Load an adapter saved by lorakit or by PEFT into ``model``, in place.

    Every check runs before the model is touched: a mismatched file leaves the model as it was.
    The adapter's tensors get the ``adapter_dtype`` lorakit recorded when it was chosen
    explicitly, else the default for this base (float32 on a 16-bit base), whatever dtype the
    file holds (PEFT's loader also upcasts).

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
    moe_format.resolve(model, file)
    base = _base_config(model, file)
    configs: dict[str, LoRAConfig] = {}
    for p in sorted(file.weights):
        r = _check_layer(model, file, p, name)
        alpha = pattern_value(file.config.get("alpha_pattern"), p, base.alpha)
        configs[p] = base.replace(rank=r, alpha=float(alpha), targets=[p])
    _check_saved_tensors(model, file, folder)
    saved_modules = modules_to_save(model, base.modules_to_save) if trainable else {}

    add_adapter(model, sorted(file.weights), configs, name)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for p, t in file.base_weights.items():
            model.get_submodule(p).weight.copy_(t)
        for key, t in file.saved_params.items():
            params[key].copy_(t)
    copy_adapter_weights(model, file.weights, name)
    freeze_base(model)
    for module in saved_modules.values():
        module.requires_grad_(True)
    set_adapter(model, name)
    if not trainable:
        for _, layer in adapted_modules(model):
            layer.adapters.requires_grad_(False)
    return model

"""Putting adapters into a model and taking them out: target matching, freezing, merging.

Works on any ``nn.Module``; Hugging Face models need nothing special. Every matched
``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Embedding`` is replaced in place by an
:class:`~lorakit.layers.AdaptedLayer` that keeps the original ``weight``/``bias`` Parameters.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from . import experts, progress, routers
from .config import LoRAConfig
from .experts import (
    AdaptedExperts,
    expert_tensor_paths,
    router_weight_paths,
)
from .fake import is_fake
from .layers import AdaptedLayer, layer_kind
from .methods import adapter_class
from .quant import (
    NO_PATTERN,
    check_quant_type,
    dense_dtype,
    dense_shape,
    dequantized,
    is_8bit,
    is_quantized,
    zero_pattern,
)
from .routers import AdaptedRouter
from .targets import _weight_readers, match_targets, skipped_experts


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Yield ``(module path, layer)`` for every adapted layer of ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield path, module


def adapted_modules(
    model: nn.Module,
) -> Iterator[tuple[str, AdaptedLayer | AdaptedExperts | AdaptedRouter]]:
    """Every adapted layer, MoE experts module and MoE router, with its path."""
    for path, module in model.named_modules():
        if isinstance(module, (AdaptedLayer, AdaptedExperts, AdaptedRouter)):
            yield path, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present in ``model``, in order of creation."""
    names: dict[str, None] = {}
    for _, layer in adapted_modules(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter; adapters are unfrozen by :func:`set_adapter`."""
    for p in model.parameters():
        p.requires_grad_(False)


def _check_rank(path: str, layer: nn.Module, config: LoRAConfig) -> None:
    limit = min(dense_shape(layer.weight))
    if config.rank > limit:
        raise ValueError(
            f"rank must be a positive int <= min(in, out) = {limit}, got {config.rank} for {path}"
        )


def _check_kind(path: str, layer: nn.Module, config: LoRAConfig) -> None:
    if is_8bit(layer):
        check_quant_type("int8")  # raises, saying why
    kind = layer_kind(layer)
    kinds = config.capabilities.kinds
    if kind not in kinds:
        raise ValueError(
            f"method {config.method!r} cannot adapt {path}, a {kind} layer; it adapts "
            f"{sorted(kinds)} layers (leave {path} out of targets, or use method='lora')"
        )


def _has_zero(layer: nn.Module) -> bool:
    """Whether a layer's weight has a zero: read from a full-precision weight directly, from the
    pattern :func:`lorakit.quantize` recorded for a 4-bit one (refused when there is none)."""
    if is_fake(layer.weight):  # lorakit plan: a pruned base is assumed (see lorakit.fake)
        return True
    if not is_quantized(layer.weight):
        return bool((layer.weight == 0).any())
    from .bitmask import unpack_mask

    bits = zero_pattern(layer)
    if bits is None:
        raise ValueError(NO_PATTERN)
    return not bool(unpack_mask(bits, dense_shape(layer.weight), torch.bool).all())


def add_adapter(
    model: nn.Module,
    paths: list[str],
    configs: LoRAConfig | Mapping[str, LoRAConfig],
    name: str,
) -> None:
    """Add adapter ``name`` to the layers at ``paths`` (one config, or one per path).

    Validates everything before changing the model, so a failure leaves it untouched.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    per_path = {p: configs if isinstance(configs, LoRAConfig) else configs[p] for p in paths}
    tensors, gates = set(expert_tensor_paths(model)), set(router_weight_paths(model))
    expert_paths = [p for p in paths if p in tensors]
    router_paths = [p for p in paths if p in gates]
    experts.check_targets(model, expert_paths, per_path, name)
    routers.check_targets(model, router_paths, per_path, name)
    paths = [p for p in paths if p not in tensors and p not in gates]
    modules = {p: model.get_submodule(p) for p in paths}
    readers = _weight_readers(model)
    for p, m in modules.items():
        if id(m) in readers:
            raise ValueError(
                f"{p} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                f"directly (F.multi_head_attention_forward), so an adapter there would never run; "
                f"leave it out of targets (all-linear already does)"
            )
        if isinstance(m, AdaptedLayer) and name in m.adapters:
            raise ValueError(
                f"layer {p} already has an adapter named {name!r}; "
                f"use another name or delete_adapter(model, {name!r}) first"
            )
        _check_kind(p, m, per_path[p])
        if isinstance(m, AdaptedLayer) and m.merged and per_path[p].capabilities.sparse_base:
            raise ValueError(
                f"{per_path[p].method} captures the base's zero pattern when it is added, but "
                f"{p} has {m.merged} merged into its weight; unmerge first"
            )
        adapter_class(per_path[p].method)  # unknown / unimplemented methods fail here
    sparse = [p for p in paths if per_path[p].capabilities.sparse_base]
    if sparse and not any([_has_zero(modules[p]) for p in sparse]):  # every one checked
        method = per_path[sparse[0]].method
        raise ValueError(
            f"{method} keeps a pruned model sparse, but none of the {len(sparse)} target layers "
            f"has a zero weight (e.g. {sparse[0]}); prune first (lorakit.prune / lorakit prune) "
            f"or use method='lora'"
        )
    users = Counter(id(t) for mod in model.modules() for t in mod.parameters(recurse=False))
    for p, m in modules.items():
        if not isinstance(m, AdaptedLayer):
            m = AdaptedLayer(m)
            m.shared_weight = users[id(m.weight)] > 1
            _replace(model, p, m)
        cfg = per_path[p]
        # A 4-bit weight counts as the dtype it had before quantization: a bf16 QLoRA base gets
        # fp32 adapters, as PEFT's QLoRA does.
        dtype = cfg.dtype_for(dense_dtype(m.weight))
        m.adapters[name] = adapter_class(cfg.method)(m, cfg, dtype=dtype)
    experts.add_adapters(model, expert_paths, per_path, name)
    routers.add_adapters(model, router_paths, per_path, name)


def inject(model: nn.Module, config: LoRAConfig, name: str = "default") -> nn.Module:
    """Add a low-rank adapter to the layers ``config.targets`` selects, in place.

    The new adapter becomes the active one; every other parameter of the model (base weights and
    other adapters) is frozen. Call again with another ``name`` to add more adapters. The
    adapter's tensors are float32 on a 16-bit base unless ``config.adapter_dtype`` says
    otherwise (fp32 master weights; :meth:`LoRAConfig.dtype_for`), the base's dtype on others.

    Args:
        model: any ``nn.Module`` (Hugging Face models included).
        config: what to adapt and how.
        name: the adapter's name (PEFT's default is ``"default"``).

    Returns:
        ``model`` itself.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a lorakit.LoRAConfig, got {type(config).__name__}")
    note = skipped_experts(model, config.targets)
    if note is not None:
        warnings.warn(note, stacklevel=2)
    saved = modules_to_save(model, config.modules_to_save)
    # Modules trained fully are not also adapted (PEFT does the same).
    paths = [
        p
        for p in match_targets(model, config.targets)
        if not any(p == s or p.startswith(s + ".") for s in saved)
    ]
    if not paths:
        raise ValueError(
            f"every target lies inside modules_to_save {list(saved)}; nothing to adapt"
        )
    tensors = set(expert_tensor_paths(model) + router_weight_paths(model))  # checked apart
    for p in paths:
        if p not in tensors:  # a loaded adapter may exceed min(in, out); a new one may not
            _check_rank(p, model.get_submodule(p), config)
    add_adapter(model, paths, config, name)
    freeze_base(model)
    for module in saved.values():
        module.requires_grad_(True)
    set_adapter(model, name)
    return model


def modules_to_save(
    model: nn.Module, suffixes: tuple[str, ...] | list[str]
) -> dict[str, nn.Module]:
    """Modules trained fully alongside the adapter (PEFT's ``modules_to_save``), by path.

    They are trained in place (not copied per adapter) and saved with the adapter.
    """
    found = {}
    for suffix in suffixes:
        hits = {p: m for p, m in model.named_modules() if p == suffix or p.endswith("." + suffix)}
        if not hits:
            raise ValueError(
                f"modules_to_save {suffix!r} matched no module of {type(model).__name__}"
            )
        found.update(hits)
    return found


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one (and the only trainable one).

    Layers without an adapter of that name run their base weight alone.
    """
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; the model has {names}")
    for _, layer in adapted_modules(model):
        layer.active = name if name in layer.adapters else None
        for adapter_name, adapter in layer.adapters.items():
            for p in adapter.parameters():
                p.requires_grad_(adapter_name == name)


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter, or None."""
    for _, layer in adapted_modules(model):
        if layer.active is not None:
            return layer.active
    return None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the ``with`` block (merged layers are unmerged meanwhile)."""
    layers = [layer for _, layer in adapted_modules(model)]
    remerge = [(layer, list(layer.merged)) for layer in layers if layer.merged]
    for layer, _ in remerge:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer, names in remerge:
            for n in names:
                layer.merge(n)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters become plain layers again."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; the model has {names}")
    layers = [(p, layer) for p, layer in adapted_modules(model) if name in layer.adapters]
    merged = [p for p, layer in layers if name in layer.merged]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {merged[0]}; unmerge it before deleting")
    for path, layer in layers:
        del layer.adapters[name]
        if layer.active == name:
            layer.active = None
        if not layer.adapters:
            _replace(model, path, layer.unload())
    rest = adapter_names(model)
    if rest and active_adapter(model) is None:
        set_adapter(model, rest[0])


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Merge and unload: fold an adapter into the base weights and return plain layers, in place.

    (Per layer, :meth:`AdaptedLayer.merge` merges in place and keeps the adapter, for unmerging.)

    Args:
        model: an injected model.
        name: the adapter to merge (default: the active one). Other adapters are dropped.

    Returns:
        ``model`` with every adapted layer replaced by its original module type (``nn.Linear``,
        ``Conv1D``, ``nn.Embedding``): exactly the base model's inference cost. Calling it on a
        model with no adapters returns the model unchanged. On a 4-bit base, each layer the
        adapter touches becomes a plain ``nn.Linear`` holding dequantize(W) + ΔW in the model's
        dtype (what the unmerged layer computes, up to rounding; not re-quantized); 4-bit layers
        without it stay 4-bit (:func:`lorakit.dequantize` converts them too).
    """
    layers = list(adapted_modules(model))
    if not layers:
        return model
    name = name or active_adapter(model)
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    for path, layer in progress.bar(layers, desc="merge", unit="layer"):
        if layer.quantized:
            if name in layer.adapters:
                _replace(model, path, dequantized(layer, layer.adapters[name].delta_weight(layer)))
            else:
                _replace(model, path, layer.unload())
            continue
        if name in layer.adapters:
            if any(n != name for n in layer.merged):
                layer.unmerge()
            layer.merge(name)
        else:
            layer.unmerge()
        _replace(model, path, layer.unload())
    _sync_tie_flag(model)
    _forget_quantization(model)
    return model


def _forget_quantization(model: nn.Module) -> None:
    """Once no 4-bit weight is left, the model is no longer transformers-quantized: drop its
    ``quantization_config``, or ``save_pretrained`` writes it and a reload quantizes again."""
    if any(is_quantized(p) for p in model.parameters()):
        return
    config = getattr(model, "config", None)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr, off in (
        ("hf_quantizer", None),
        ("is_quantized", False),
        ("is_loaded_in_4bit", False),
    ):
        if getattr(model, attr, None):
            setattr(model, attr, off)
    if hasattr(model, "quantization_method"):
        model.quantization_method = None


def _sync_tie_flag(model: nn.Module) -> None:
    """Make ``config.tie_word_embeddings`` say what the weights are: merging an adapter on a tied
    embedding unties it (in :meth:`AdaptedLayer.merge`, whenever that ran), and
    ``save_pretrained`` / a reload must not tie the head to the adapted embedding again."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    with contextlib.suppress(Exception):  # models without input / output embeddings
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if inp is not None and out is not None and inp.weight is not out.weight:
            config.tie_word_embeddings = False


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; the base model comes back unchanged."""
    for path, layer in list(adapted_modules(model)):
        layer.unmerge()
        _replace(model, path, layer.unload())
    _sync_tie_flag(model)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (a 4-bit weight counts its dense (out, in))."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(dense_shape(p).numel() for p in model.parameters())
    return trainable, total

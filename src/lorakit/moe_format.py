"""MoE adapters in PEFT's ``target_parameters`` layout, both ways.

PEFT adapts a fused expert tensor (E, ...) with one ``lora_A`` (r·E, in) and one ``lora_B``
(out, r·E) whose column k·E + e is expert e's k-th; it wraps the experts module once per adapted
tensor, in registration order, so the first tensor's keys sit under the most ``base_layer``
levels. A router's (E, H) weight is a plain (r, H) / (E, r) pair. lorakit keeps expert adapters
as A (E, r, in) and B (E, out, r) (:mod:`lorakit.experts`); this module converts and checks.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import (
    EXPERT_PARAMS,
    AdaptedExperts,
    _params_of,
    expert_tensor_paths,
    router_weight_paths,
    split_path,
    tensor_shape,
)
from .methods.experts import ExpertLoRA
from .peft_format import AdapterFile
from .routers import AdaptedRouter


def to_peft(lora: ExpertLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (r·E, in) lora_A and (out, r·E) lora_B: A stacked by expert, B's columns
    interleaved (column k·E + e is expert e's k-th)."""
    A, B = lora.lora_A, lora.lora_B
    e, out, r = B.shape
    return A.reshape(e * r, -1), B.permute(1, 2, 0).reshape(out, r * e)


def from_peft(A: torch.Tensor, B: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_peft`: (E, r, in) and (E, out, r)."""
    r = A.shape[0] // e
    return A.reshape(e, r, A.shape[1]), B.reshape(B.shape[0], r, e).permute(2, 0, 1)


def peft_depths(module: nn.Module, tensors: list[str]) -> dict[str, int]:
    """How many ``base_layer`` levels PEFT nests each adapted tensor of ``module`` under: PEFT
    wraps the module once per tensor in registration order, the first innermost."""
    ordered = [t for t in _params_of(module) if t in tensors]
    return {t: len(ordered) - 1 - i for i, t in enumerate(ordered)}


def peft_tensor_path(model: nn.Module, key_path: str, targets: list[str]) -> str | None:
    """The expert tensor (``<experts>.<tensor>``) a PEFT key path names, or None if it names no
    experts module. ``key_path`` is ``<experts>`` plus one ``.base_layer`` per nesting level;
    ``targets`` is the adapter's ``target_parameters`` (PEFT matches a tensor when its path
    equals or ends with an entry)."""
    mpath, depth = key_path, 0
    while mpath.endswith(".base_layer"):
        mpath, depth = mpath.removesuffix(".base_layer"), depth + 1
    try:
        module = model.get_submodule(mpath)
    except AttributeError:
        return None
    if not _params_of(module):
        return None
    chosen = [
        t
        for t in _params_of(module)
        if any(f"{mpath}.{t}" == s or f"{mpath}.{t}".endswith("." + s) for s in targets)
    ]
    for t, d in peft_depths(module, chosen).items():
        if d == depth:
            return f"{mpath}.{t}"
    return None


def target_parameters(model: nn.Module, paths: list[str]) -> list[str] | None:
    """PEFT ``target_parameters`` selecting exactly the expert tensors ``paths``: their last two
    names (``experts.down_proj``) when those select no others, else the full paths."""
    if not paths:
        return None
    every = expert_tensor_paths(model) + router_weight_paths(model)
    short = sorted({".".join(p.split(".")[-2:]) for p in paths})
    if {p for p in every if any(p.endswith("." + s) for s in short)} == set(paths):
        return short
    return sorted(paths)


def peft_entries(
    model: nn.Module, paths: list[str], found: dict[str, nn.Module]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's key path (``<experts>.base_layer...``) -> its (lora_A, lora_B) for expert tensors."""
    out = {}
    for p in paths:
        mpath, tensor = split_path(p)
        module = model.get_submodule(mpath)
        if isinstance(module, AdaptedRouter):  # its one tensor: no nesting
            out[mpath] = (found[p].lora_A, found[p].lora_B)
            continue
        depth = peft_depths(module, [t for t in module.params if f"{mpath}.{t}" in found])
        out[mpath + ".base_layer" * depth[tensor]] = to_peft(found[p])
    return out


def resolve(model: nn.Module, file: AdapterFile) -> None:
    """Rename PEFT's expert keys (``<experts>.base_layer...``) to the tensors they adapt."""
    targets = file.config.get("target_parameters") or []
    tensors = expert_tensor_paths(model) + router_weight_paths(model)
    for t in targets:
        if not any(_selects([t], p) for p in tensors):
            raise ValueError(
                f"adapter_config.json: target_parameters entry {t!r} selects no MoE expert tensor "
                f"of {type(model).__name__}; lorakit adapts fused expert tensors "
                f"({', '.join(EXPERT_PARAMS)}) through target_parameters, found "
                f"{sorted({'.'.join(p.split('.')[-2:]) for p in tensors}) or 'none'}"
            )
    gates = set(router_weight_paths(model))
    for key_path in list(file.weights):
        tensor, kind = peft_tensor_path(model, key_path, targets), "experts"
        if f"{key_path}.weight" in gates and _selects(targets, f"{key_path}.weight"):
            tensor, kind = f"{key_path}.weight", "router"
        if tensor is not None:
            file.weights[tensor] = file.weights.pop(key_path)
            file.kinds[tensor] = kind
            del file.kinds[key_path]


def _selects(targets: list[str], path: str) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def check_experts(model: nn.Module, file: AdapterFile, p: str, name: str) -> int:
    mpath, tensor = split_path(p)
    module = model.get_submodule(mpath)
    if isinstance(module, AdaptedExperts) and name in module.adapters:
        raise ValueError(f"{mpath} already has an adapter named {name!r}")
    e, n_in, n_out = tensor_shape(module, tensor)
    A, B = file.weights[p]["A"], file.weights[p]["B"]
    r = A.shape[0] // e if A.dim() == 2 else A.shape[1]
    fits = (A.shape, B.shape) in {((r * e, n_in), (n_out, r * e)), ((e, r, n_in), (e, n_out, r))}
    if r < 1 or not fits:
        raise ValueError(
            f"adapter shapes do not fit the MoE expert tensor {p} ({e} experts, in {n_in}, out "
            f"{n_out}): lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; PEFT's layout is "
            f"(r·{e}, {n_in}) and ({n_out}, r·{e})"
        )
    return r


def check_router(model: nn.Module, file: AdapterFile, p: str, name: str) -> int:
    module = model.get_submodule(p.removesuffix(".weight"))
    if isinstance(module, AdaptedRouter) and name in module.adapters:
        raise ValueError(f"{p} already has an adapter named {name!r}")
    (out_f, in_f), (A, B) = module.weight.shape, (file.weights[p]["A"], file.weights[p]["B"])
    r = A.shape[0]
    if A.shape != (r, in_f) or B.shape != (out_f, r):
        raise ValueError(
            f"adapter shapes do not fit the MoE router {p} {tuple(module.weight.shape)}: "
            f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}"
        )
    return r

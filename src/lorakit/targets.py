"""Which layers ``LoRAConfig.targets`` selects: ``all-linear``, module-name suffixes or a regex.

Linear, GPT-2 Conv1D and embedding layers are found by type; MoE expert tensors by what their
module holds (:mod:`lorakit.experts`); output heads, routers / gates and
``nn.MultiheadAttention.out_proj`` by their role, never by family name.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter

from torch import nn

from .experts import expert_tensor_paths, router_weight_paths, routers, split_path
from .layers import layer_kind

ALL_LINEAR = "all-linear"
# Classification / LM heads that "all-linear" leaves alone (PEFT does the same).
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def _adaptable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if p and layer_kind(m) is not None]


def _output_heads(model: nn.Module) -> set[int]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        with contextlib.suppress(Exception):
            head = get_out()
            if isinstance(head, nn.Module):
                heads.add(id(head))
    return heads


def describe_layers(model: nn.Module) -> str:
    """A compact list of the adaptable layers, grouped by leaf name, for error messages."""
    layers = _adaptable(model)
    if not layers:
        return "the model has no nn.Linear, Conv1D or nn.Embedding layers"
    counts = Counter(p.rsplit(".", 1)[-1] for p, _ in layers)
    example = {}
    for p, m in layers:
        example.setdefault(p.rsplit(".", 1)[-1], (p, type(m).__name__))
    parts = [
        f"{leaf} x{n} ({example[leaf][1]}, e.g. {example[leaf][0]!r})" for leaf, n in counts.items()
    ]
    experts = Counter(".".join(p.split(".")[-2:]) for p in expert_tensor_paths(model))
    parts += [f"{t} x{n} (MoE expert tensors)" for t, n in experts.items()]
    return "adaptable layers: " + "; ".join(parts)


def match_targets(model: nn.Module, targets: str | tuple[str, ...] | list[str]) -> list[str]:
    """Paths selected by ``targets`` (see :class:`LoRAConfig`), in model order.

    ``"all-linear"``: every Linear/Conv1D except the output head, classification heads, MoE
    routers / gates and ``nn.MultiheadAttention.out_proj`` (MHA reads that weight directly). MoE
    experts kept as fused 3-D tensors are not linear layers: all-linear skips them, as PEFT's
    does, with a warning naming them; name them to adapt them (``"experts.gate_up_proj"``, or a
    list such as ``["all-linear", "experts.gate_up_proj", "experts.down_proj"]``).
    A list: module-name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``) or
    expert-tensor suffixes; each must match something. Any other string: a regex that must match
    the full path.
    """
    layers = [p for p, _ in _adaptable(model)]
    tensors = expert_tensor_paths(model)
    named_only = tensors + router_weight_paths(model)  # routers: only when named
    if targets == ALL_LINEAR:
        found = _all_linear(model)
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets {targets!r} is not a valid regular expression: {e}") from e
        found = [p for p in layers + named_only if pattern.fullmatch(p)]
    else:
        named = [t for t in targets if t != ALL_LINEAR]
        hits = {t: _suffix_hits(layers + named_only, tensors, t) for t in named}
        unmatched = [t for t in named if not hits[t]]
        if unmatched:
            raise ValueError(f"targets {unmatched} matched no layer; {describe_layers(model)}")
        chosen = set(_all_linear(model)) if ALL_LINEAR in targets else set()
        chosen |= {p for t in named for p in hits[t]}
        found = [p for p in layers + named_only if p in chosen]
    if not found:
        raise ValueError(f"targets {targets!r} matched no layer; {describe_layers(model)}")
    return found


def _suffix_hits(paths: list[str], experts: list[str], suffix: str) -> list[str]:
    """Paths equal to or ending in ``suffix``; an experts module's name selects its tensors."""

    def hit(p: str) -> bool:
        return p == suffix or p.endswith("." + suffix)

    return [p for p in paths if hit(p) or (p in experts and hit(split_path(p)[0]))]


def _all_linear(model: nn.Module) -> list[str]:
    heads = _output_heads(model) | _weight_readers(model) | routers(model)
    return [
        p
        for p, m in _adaptable(model)
        if layer_kind(m) in ("linear", "conv1d")
        and id(m) not in heads
        and p.rsplit(".", 1)[-1] not in _HEAD_NAMES
    ]


def skipped_experts(model: nn.Module, targets) -> str | None:
    """The one-line note ``inject`` gives when ``all-linear`` leaves MoE expert tensors out."""
    tensors = expert_tensor_paths(model)
    if targets != ALL_LINEAR or not tensors:
        return None
    return _skipped_experts(tensors)


def _skipped_experts(tensors: list[str]) -> str:
    counts = Counter(".".join(p.split(".")[-2:]) for p in tensors)
    listed = ", ".join(f"{t} x{n}" for t, n in counts.items())
    return (
        f"all-linear adapts linear layers only (as PEFT's does) and skipped {len(tensors)} MoE "
        f"expert tensors ({listed}); to adapt them too use targets "
        f"{['all-linear', *counts]!r} (CLI: --targets all-linear,{','.join(counts)})"
    )


def _weight_readers(model: nn.Module) -> set[int]:
    """ids of linear layers whose weight their parent reads directly, bypassing ``forward``:
    ``nn.MultiheadAttention.out_proj`` (an adapter there would never run)."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}

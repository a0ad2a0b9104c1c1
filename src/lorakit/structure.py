"""Finding a causal LM's pieces by what they are, for :func:`lorakit.reduce_activation_memory`.

No family names: the LM head is ``get_output_embeddings()`` and the body ``get_decoder()`` (or
``base_model``); an RMSNorm is a module with a 1-D ``weight`` and an eps whose forward, run on a
small random input at patch time, equals :class:`lorakit.fused.RMSNormFunction` (fp32 within
1e-6, bf16 bit for bit); an MLP is a module of two or three projections, one parameter-free
activation and at most one dropout whose forward, run with random stand-in projections, equals
``down(act(gate(x)) ⊙ up(x))``, ``down(act(a) ⊙ b)`` with ``a, b = up(x).chunk(2)`` (a fused
gate/up projection) or ``down(act(up(x)))``. The probes run on real CPU tensors even while the
model is fake (the planner), so a planned run replaces what the real run replaces.

What the loss path cannot reproduce is named by its config field (:data:`HEAD_SCALES`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .fused import ActMulFunction, RMSNormFunction
from .layers import layer_kind

# Config fields that scale the logits after the head (Cohere, Granite, Falcon-H1, ...): the
# chunked loss does not reproduce them. Gemma's final_logit_softcapping it does.
HEAD_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


@dataclass(frozen=True)
class LossPath:
    """How a causal LM's logits are made: ``softcap(head(body(...).last_hidden_state))``."""

    body: nn.Module  # the decoder: its output's last_hidden_state feeds the head
    head: nn.Module  # a bias-free linear (V, d), possibly adapted
    softcap: float | None  # Gemma 2's final_logit_softcapping, or None


def _config_value(model: nn.Module, name: str):
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | str:
    """(body, head) of a transformers causal LM, or why ``model`` is not one."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        return "not a transformers model (no config, no get_output_embeddings)"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate():
        return "no causal LM head (can_generate() is False)"
    head = model.get_output_embeddings()
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    if body is model:
        body = getattr(model, "base_model", model)
    if head is None or body is model:
        return "no decoder body and LM head (get_decoder(), get_output_embeddings())"
    return body, head


def loss_path(model: nn.Module) -> tuple[LossPath | None, list[str]]:
    """The loss path of a causal LM the chunked loss reproduces, or None and what it cannot
    reproduce, each piece by name."""
    parts = causal_lm_parts(model)
    if isinstance(parts, str):
        return None, [parts]
    body, head = parts
    refused = []
    if layer_kind(head) != "linear":
        refused.append(f"the LM head is a {type(head).__name__}, not a linear layer")
    elif getattr(head, "bias", None) is not None:
        refused.append("the LM head has a bias")
    for name in HEAD_SCALES:
        value = _config_value(model, name)
        if value is not None and value != 1:
            refused.append(f"{name}={value} scales the logits")
    if refused:
        return None, refused
    return LossPath(body, head, _config_value(model, "final_logit_softcapping")), []


def plain_lm_head(model: nn.Module) -> nn.Module | None:
    """The LM head of a causal LM whose logits are that head's output on the body's last hidden
    state, nothing applied after it (not Gemma 2's soft-capped or Cohere's scaled logits)."""
    path, _ = loss_path(model)
    return path.head if path is not None and path.softcap is None else None


def sdpa_refusal(model: nn.Module) -> str | None:
    """Why this model's attention cannot run as sdpa with the same result, or None."""
    name = type(model).__name__
    if not getattr(model, "_supports_sdpa", False):
        return f"attention: {name} does not support sdpa (_supports_sdpa=False)"
    softcap = _config_value(model, "attn_logit_softcapping")
    if softcap is not None:
        return f"attention: attn_logit_softcapping={softcap} (sdpa has no soft-capping)"
    if any(n.rpartition(".")[2] == "sinks" for n, _ in model.named_parameters()):
        return "attention: attention sinks (sdpa has none)"
    return None


# -- probes -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _real_tensors() -> Iterator[torch.Generator]:
    """Real CPU tensors (also under the planner's FakeTensorMode), no grad, no autocast, no
    warnings, and a private generator: probing leaves the global RNG as it was."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with (
        unset_fake_temporarily(),
        torch.no_grad(),
        torch.autocast("cpu", enabled=False),
        warnings.catch_warnings(),  # a probed forward's own warnings (dtype mismatch, ...)
    ):
        warnings.simplefilter("ignore")
        yield torch.Generator().manual_seed(0)


def _eps(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def is_norm_like(module: nn.Module) -> bool:
    """A leaf with one parameter, a 1-D ``weight``, no buffers, and an eps: maybe an RMSNorm."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    return (
        list(params) == ["weight"]
        and weight.dim() == 1
        and not list(module.buffers(recurse=False))
        and not list(module.children())
        and _eps(module) is not None
    )


def rms_norm_variant(module: nn.Module) -> tuple[float, bool] | None:
    """(offset, cast_first) of :class:`RMSNormFunction` that computes what ``module`` computes,
    checked on random inputs (rows scaled near sqrt(eps), so eps is checked too), or None."""
    if not is_norm_like(module):
        return None
    eps, width = _eps(module), module.weight.shape[0]
    with _real_tensors() as g:
        scale = torch.tensor([1.0, 10 * eps**0.5, eps**0.5, 3.0])[:, None]
        x = torch.randn(4, width, generator=g) * scale
        w = torch.randn(width, generator=g)
        # fp32; bf16 (tells the cast orders apart); a bf16 input with an fp32 weight
        inputs = ((x, w), (x.bfloat16(), w.bfloat16()), (x.bfloat16(), w))
        for offset, cast_first in itertools.product((0.0, 1.0), (True, False)):
            args = (eps, offset, cast_first)
            if all(_norm_matches(module, xi, wi, args) for xi, wi in inputs):
                return offset, cast_first
    return None


def _norm_matches(module: nn.Module, x: torch.Tensor, w: torch.Tensor, args: tuple) -> bool:
    probe = copy.copy(module)
    probe.__dict__["_parameters"] = {"weight": w}
    try:
        out = type(module).forward(probe, x)
    except Exception:  # a forward that does not run on a plain (rows, width) input: not a norm
        return False
    ref = RMSNormFunction.apply(x, w, *args)
    if out.dtype != ref.dtype or out.shape != ref.shape:
        return False
    if x.dtype == torch.float32:
        return torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    return torch.equal(out, ref)


@dataclass(frozen=True)
class MLPSpec:
    """Which children of an MLP do what: ``dropout(down(hidden))`` with hidden
    ``act(gate(x)) ⊙ up(x)`` (gate set), ``act(a) ⊙ b`` with ``a, b = up(x).chunk(2, -1)``
    (fused) or ``act(up(x))``."""

    up: str
    down: str
    act: str
    gate: str | None = None
    fused: bool = False
    dropout: str | None = None
    recompute: bool = True  # keep only x (True) or also gate and up (False, gated only)
    grad: str | None = None  # the activation, when it is one of fused.KNOWN_GRADS

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused


def mlp_spec(module: nn.Module) -> MLPSpec | None:
    """The :class:`MLPSpec` whose computation equals ``module``'s forward, or None (not an MLP
    of that shape: attention, an MoE block, a decoder layer, ...)."""
    split = _mlp_children(module)
    if split is None:
        return None
    weighted, act, drop = split
    for spec in _hypotheses(weighted, act, drop):
        if _mlp_matches(module, spec):
            return dataclasses.replace(spec, grad=activation_grad(getattr(module, act)))
    return None


def activation_grad(act: Callable) -> str | None:
    """Which of :data:`lorakit.fused.KNOWN_GRADS` ``act`` computes, bit for bit on a probe in
    float32 and bfloat16 (so its backward can be that aten kernel), or None."""
    import torch.nn.functional as F

    known = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    }
    with _real_tensors() as g:
        x = torch.randn(64, generator=g) * 4
        for name, fn in known.items():
            try:
                if all(
                    torch.equal(act(x.to(d)), fn(x.to(d))) for d in (torch.float32, torch.bfloat16)
                ):
                    return name
            except Exception:  # an activation that does not take these inputs: no match
                return None
    return None


def _mlp_children(module: nn.Module) -> tuple[list[str], str, str | None] | None:
    """(projections, activation, dropout) names of a module that may be an MLP, or None."""
    if list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
        return None  # e.g. MoE experts as fused 3-D parameters
    weighted, free, drops = [], [], []
    for name, child in module.named_children():
        if isinstance(child, nn.Dropout):
            drops.append(name)
        elif list(child.parameters()):
            weighted.append(name)
        elif not list(child.buffers()):
            free.append(name)
        else:
            return None  # a stateful parameter-free child (a rotary embedding): not an MLP
    if len(weighted) not in (2, 3) or len(free) != 1 or len(drops) > 1:
        return None
    return weighted, free[0], drops[0] if drops else None


def _hypotheses(weighted: list[str], act: str, drop: str | None) -> Iterator[MLPSpec]:
    if len(weighted) == 3:
        for gate, up, down in itertools.permutations(weighted):
            yield MLPSpec(up, down, act, gate=gate, dropout=drop)
        return
    for up, down in itertools.permutations(weighted):
        yield MLPSpec(up, down, act, dropout=drop)
        yield MLPSpec(up, down, act, fused=True, dropout=drop)


class _StandIn(nn.Module):
    """A random affine map (float64), in place of a projection while probing."""

    def __init__(self, n_in: int, n_out: int, g: torch.Generator) -> None:
        super().__init__()
        self.w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
        self.b = torch.randn(n_out, generator=g, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t() + self.b


class _Half(nn.Module):
    """In place of a dropout while probing: not the identity, so its position is checked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


def _mlp_matches(module: nn.Module, spec: MLPSpec) -> bool:
    d, f = 6, 8
    with _real_tensors() as g:
        parts = {spec.up: _StandIn(d, 2 * f if spec.fused else f, g), spec.down: _StandIn(f, d, g)}
        if spec.gate is not None:
            parts[spec.gate] = _StandIn(d, f, g)
        if spec.dropout is not None:
            parts[spec.dropout] = _Half()
        probe = copy.copy(module)
        probe.__dict__["_modules"] = {**module._modules, **parts}
        x = torch.randn(3, d, generator=g, dtype=torch.float64)
        try:
            out = type(module).forward(probe, x)
            ref = mlp_output(probe, spec, x)
        except Exception:  # a forward that does not run on stand-ins: not this hypothesis
            return False
        return isinstance(out, torch.Tensor) and out.shape == ref.shape and torch.allclose(out, ref)


def mlp_hidden(mlp: nn.Module, spec: MLPSpec, x: torch.Tensor) -> torch.Tensor:
    """The MLP's input to ``down``; a gated product through :class:`lorakit.fused.ActMulFunction`
    (keeps gate and up, recomputes the activation)."""
    act = getattr(mlp, spec.act)
    if spec.gate is not None:
        gate, up = getattr(mlp, spec.gate)(x), getattr(mlp, spec.up)(x)
        return ActMulFunction.apply(gate, up, act, spec.grad)
    h = getattr(mlp, spec.up)(x)
    if spec.fused:
        gate, up = h.chunk(2, dim=-1)
        return ActMulFunction.apply(gate, up, act, spec.grad)
    return act(h)


def mlp_output(
    mlp: nn.Module, spec: MLPSpec, x: torch.Tensor, recompute: Callable | None = None
) -> torch.Tensor:
    """``dropout(down(hidden))``, the hidden part run through ``recompute`` when given."""
    h = mlp_hidden(mlp, spec, x) if recompute is None else recompute(mlp_hidden, mlp, spec, x)
    y = getattr(mlp, spec.down)(h)
    return y if spec.dropout is None else getattr(mlp, spec.dropout)(y)

"""The adapted layer: a frozen linear, GPT-2 Conv1D or embedding holding named adapters.

An adapted layer keeps the base layer's ``weight`` and ``bias`` Parameters under their original
names, so base checkpoints still load into an injected model. Adapters live in ``adapters`` (one
module per name; its class is the method, see ``lorakit.methods``). One adapter is active at a time;
``merge``/``unmerge`` fold it into the weight and back, and are idempotent.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .quant import dense_shape, is_quantized, prepare

Kind = Literal["linear", "conv1d", "embedding"]


def layer_kind(module: nn.Module) -> Kind | None:
    """The kind of a module lorakit can adapt, or None."""
    if isinstance(module, AdaptedLayer):
        return module.kind
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # transformers' GPT-2 Conv1D, detected without importing transformers: weight is (in, out).
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return "conv1d"
    return None


class AdaptedLayer(nn.Module):
    """A frozen ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Embedding`` with low-rank adapters."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        kind = layer_kind(base)
        if kind is None or isinstance(base, AdaptedLayer):
            raise TypeError(f"cannot adapt a {type(base).__name__}")
        self.kind: Kind = kind
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        # Weight stored (in, out) for Conv1D and Embedding; (out, in) for Linear.
        self.fan_in_fan_out = kind != "linear"
        # A bitsandbytes 4-bit weight (lorakit.quant) is dequantized transiently where it is used.
        self.quantized = is_quantized(base.weight)
        prepare(base)
        shape = tuple(dense_shape(base.weight))
        self.in_features, self.out_features = shape[::-1] if kind == "linear" else shape
        # The original module, deliberately unregistered: ``unload`` hands it back.
        self.__dict__["base_layer"] = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled = False
        # True when another module uses the same weight (e.g. embeddings tied to the LM head):
        # merging then unties it, so the other module keeps computing with the base weight.
        self.shared_weight = False

    # -- forward ---------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone (its current weight, which includes merged adapters)."""
        if self.quantized:  # bitsandbytes' own forward: exactly the 4-bit model's layer
            return self.__dict__["base_layer"](x)
        if self.kind == "linear":
            return F.linear(x, self.weight, self.bias)
        if self.kind == "conv1d":  # y = b + x W with W (in, out)
            x2 = x.reshape(-1, x.shape[-1])
            y = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
            return y.view(*x.shape[:-1], y.shape[-1])
        base = self.__dict__["base_layer"]
        return F.embedding(
            x,
            self.weight,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )

    def forward_adds_adapter(self) -> bool:
        """True when ``forward`` runs an adapter on top of :meth:`base_forward`."""
        name = self.active
        return not (name is None or self.disabled or name in self.merged)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.forward_adds_adapter():
            return self.base_forward(x)
        name = self.active
        adapter = self.adapters[name]
        if torch.is_grad_enabled() and not adapter.config.capabilities.trainable_base:
            self._check_frozen(adapter.config.method)
        return adapter(x, self)

    def _check_frozen(self, method: str) -> None:
        """Refuse a trainable base weight/bias for methods whose backward cannot compute dW."""
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise ValueError(
                f"{method} keeps the base weight frozen (its backward does not keep what dW "
                f"needs), but this {self.kind} layer's weight/bias requires grad; freeze them "
                f"or use method='lora'"
            )

    # -- merge -----------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s ΔW in the layout and dtype of ``self.weight``: computed in the
        adapter's dtype (fp32 by default on a 16-bit base), rounded once to the weight's, so a
        merged model keeps the base's dtype."""
        delta = self.adapters[name].delta_weight(self)  # (out, in)
        return (delta.t() if self.fan_in_fan_out else delta).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Merge in place: fold adapter ``name`` (default: the active one) into this layer's weight;
        the layer stays an AdaptedLayer (``unmerge`` undoes it; :func:`lorakit.merge` instead
        merges the whole model and returns plain layers). No-op if already merged."""
        name = name or self.active
        if name is None or name in self.merged:
            return
        if self.quantized:
            raise ValueError(
                "cannot merge an adapter into a 4-bit weight in place (it would have to be "
                "re-quantized, losing precision); lorakit.merge(model) returns plain layers "
                "holding the dequantized weight plus the adapter, or merge onto the "
                "full-precision base (lorakit merge --model <base> --adapter <adapter>)"
            )
        delta = self.delta_weight(name)
        if self.shared_weight:
            self.weight = nn.Parameter(self.weight + delta, requires_grad=self.weight.requires_grad)
            self.shared_weight = False
        else:
            self.weight.add_(delta)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter from the weight again. No-op if none is merged."""
        while self.merged:
            self.weight.sub_(self.delta_weight(self.merged.pop()))

    def unload(self) -> nn.Module:
        """The original module, holding the current (possibly merged) weight and bias."""
        base = self.__dict__["base_layer"]
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, in={self.in_features}, out={self.out_features}, "
            f"active={self.active!r}, merged={self.merged}"
        )

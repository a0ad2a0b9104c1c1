"""LoRAConfig: what to adapt and how. A frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

Method = Literal["lora", "lora_fa", "lors"]


@dataclass(frozen=True)
class Capabilities:
    """What a method supports. Declared once per method in :data:`CAPABILITIES` and enforced
    where an adapter is configured (``LoRAConfig``), injected (``inject``, ``AdaptedLayer``)
    and saved (``save_adapter``); a new method adds one line there."""

    kinds: frozenset[str]  # layer kinds it adapts: "linear", "conv1d", "embedding"
    dropout: bool  # implements LoRAConfig.dropout
    trainable_base: bool  # the base weight/bias may also train (its backward computes dW)
    peft_exact: bool  # PEFT's plain LoRA computes the same function from the saved A and B
    sparse_base: bool  # keeps the base's zero pattern, so it needs a pruned base


_ALL_KINDS = frozenset({"linear", "conv1d", "embedding"})
CAPABILITIES: dict[str, Capabilities] = {
    "lora": Capabilities(
        _ALL_KINDS, dropout=True, trainable_base=True, peft_exact=True, sparse_base=False
    ),
    "lora_fa": Capabilities(
        _ALL_KINDS, dropout=True, trainable_base=False, peft_exact=True, sparse_base=False
    ),
    # One GEMM with the masked W' = (W + s·B A) ⊙ M: no separate adapter input to drop, no dense
    # W (so no embeddings, which are not pruned), and PEFT would apply s·B A unmasked.
    "lors": Capabilities(
        frozenset({"linear", "conv1d"}),
        dropout=False,
        trainable_base=False,
        peft_exact=False,
        sparse_base=True,
    ),
}
METHODS: tuple[str, ...] = tuple(CAPABILITIES)
INITS: tuple[str, ...] = ("kaiming", "gaussian")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class LoRAConfig:
    """Configuration of one low-rank adapter.

    Example:
        ``LoRAConfig(method="lora", rank=16, alpha=32, targets="all-linear")``
    """

    method: Method = "lora"  # "lora" | "lora_fa" | "lors"
    rank: int = 8  # r: inner dimension of B A
    alpha: float = 16.0  # scaling s = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter input, in [0, 1)
    targets: str | tuple[str, ...] = "all-linear"  # "all-linear" | module-name suffixes | regex
    init: Literal["kaiming", "gaussian"] = "kaiming"  # A init; B starts at zero
    use_rslora: bool | None = None  # alpha / sqrt(r); None: True for lors (its scripts), else False
    bias: Literal["none"] = "none"  # biases stay frozen (PEFT's bias="none")
    adapter_dtype: str | None = None  # None: follow the base layer's dtype; else e.g. "float32"
    modules_to_save: tuple[str, ...] = ()  # module-name suffixes trained fully (e.g. a new head)
    grad_correction: bool = False  # lora_fa: v2's g_B (A Aᵀ)⁻¹ / s² before the optimizer
    sparse_grad: Literal["exact", "straight_through"] = "exact"  # lors: adapter gradient mode

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.dropout and not self.capabilities.dropout:
            with_dropout = [m for m, c in CAPABILITIES.items() if c.dropout]
            raise ValueError(
                f"method {self.method!r} does not support dropout (got dropout={self.dropout}); "
                f"use dropout=0.0, or one of {with_dropout}"
            )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' (biases stay frozen), got {self.bias!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in DTYPES:
            raise ValueError(
                f"adapter_dtype must be None (follow the base) or one of {list(DTYPES)}, "
                f"got {self.adapter_dtype!r}"
            )
        if self.sparse_grad not in ("exact", "straight_through"):
            raise ValueError(
                f"sparse_grad must be 'exact' or 'straight_through', got {self.sparse_grad!r}"
            )
        if self.sparse_grad != "exact" and self.method != "lors":
            raise ValueError(f"sparse_grad is a LoRS option; method is {self.method!r}")
        if self.use_rslora is None:
            object.__setattr__(self, "use_rslora", self.method == "lors")
        if self.grad_correction and self.method != "lora_fa":
            raise ValueError(f"grad_correction is a LoRA-FA option; method is {self.method!r}")
        targets = self.targets
        if isinstance(targets, (list, tuple)):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    f"targets must be 'all-linear', a regex string or a non-empty list of "
                    f"module-name suffixes, got {targets!r}"
                )
            object.__setattr__(self, "targets", tuple(targets))
        elif not isinstance(targets, str) or not targets:
            raise ValueError(
                f"targets must be 'all-linear', a regex string or a non-empty list of "
                f"module-name suffixes, got {targets!r}"
            )
        mts = self.modules_to_save
        if isinstance(mts, str) or not all(isinstance(m, str) and m for m in mts):
            raise ValueError(f"modules_to_save must be a list of module-name suffixes, got {mts!r}")
        object.__setattr__(self, "modules_to_save", tuple(mts))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def capabilities(self) -> Capabilities:
        """What this config's method supports."""
        return CAPABILITIES[self.method]

    @property
    def scaling(self) -> float:
        """s multiplying B A."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def dtype(self) -> torch.dtype | None:
        """The adapter parameters' dtype, or None to follow the base layer."""
        return None if self.adapter_dtype is None else DTYPES[self.adapter_dtype]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["targets"], tuple):
            d["targets"] = list(d["targets"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Build a config from a dict (a file, the CLI); unknown keys are an error."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown LoRAConfig keys {unknown}; allowed keys are {allowed}")
        return cls(**data)

    def replace(self, **changes: Any) -> LoRAConfig:
        """A copy with some fields changed (validated like a new config)."""
        return self.from_dict({**self.to_dict(), **changes})

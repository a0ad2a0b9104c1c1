"""One file per method. Each defines an adapter module with the same small interface:

- ``__init__(layer, config, *, dtype)``: an adapter for that :class:`~lorakit.layers.AdaptedLayer`
  (its shapes, kind, device; LoRS also captures its zero pattern);
- ``forward(x, layer) -> y``: the output of the adapted ``layer`` with this adapter active;
- ``delta_weight(layer) -> ΔW`` (out, in): what ``merge`` adds to the weight;
- ``lora_A`` (r, in) and ``lora_B`` (out, r): the tensors saved in PEFT's format;
- ``config``: its :class:`~lorakit.config.LoRAConfig`, whose ``capabilities`` (declared in
  ``lorakit.config.CAPABILITIES``) say what the method supports.
"""

from __future__ import annotations

from torch import nn

from .lora import LoRA
from .lora_fa import LoRAFA
from .lors import LoRS

ADAPTERS: dict[str, type[nn.Module]] = {"lora": LoRA, "lora_fa": LoRAFA, "lors": LoRS}
PLANNED: dict[str, str] = {}


def adapter_class(method: str) -> type[nn.Module]:
    """The adapter module class implementing ``method``."""
    if method in ADAPTERS:
        return ADAPTERS[method]
    if method in PLANNED:
        raise NotImplementedError(f"method {method!r} ({PLANNED[method]}) is not implemented yet")
    raise ValueError(f"unknown method {method!r}; choose one of {list(ADAPTERS)}")

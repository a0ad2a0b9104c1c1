"""Low-rank adapters on MoE routers, when asked for by name or loaded from PEFT.

lorakit never adapts a router by default (``all-linear`` skips it): the router decides which
experts see a token, and moving it is rarely what a fine-tune means. PEFT's ``all-linear`` on
Mixtral and Qwen-MoE does adapt it, through ``target_parameters=["gate.weight"]`` (transformers 4
kept routers as ``nn.Linear``), so lorakit reads, trains and writes such adapters exactly.

A router here is a module with an (E, H) ``weight`` beside an experts module (transformers 5's
``*TopKRouter``). :class:`AdaptedRouter` runs the router's own forward with
``weight + s·B A`` in place of ``weight`` (``torch.func.functional_call``): the (E, H) ΔW is
tiny, so it is formed; plain autograd gives A and B their gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from .methods import adapter_class


class AdaptedRouter(nn.Module):
    """A MoE router whose (E, H) ``weight`` carries low-rank adapters (one LoRA module per name,
    the same classes linear layers use)."""

    kind = "router"
    quantized = False
    fan_in_fan_out = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        for name, p in base.named_parameters(recurse=False):
            setattr(self, name, p)  # weight (and a bias) keep their names: checkpoints load
        self.out_features, self.in_features = self.weight.shape
        self.__dict__["base_layer"] = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled = False

    def forward_adds_adapter(self) -> bool:
        name = self.active
        return not (name is None or self.disabled or name in self.merged)

    def forward(self, *args, **kwargs):
        base = self.__dict__["base_layer"]
        if not self.forward_adds_adapter():
            return base(*args, **kwargs)
        weight = self.weight + self.delta_weight(self.active)
        return torch.func.functional_call(base, {"weight": weight}, args, kwargs)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s·B A (E, H) in the weight's dtype."""
        return self.adapters[name].delta_weight(self).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        name = name or self.active
        if name is None or name in self.merged:
            return
        self.weight.add_(self.delta_weight(name))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            self.weight.sub_(self.delta_weight(self.merged.pop()))

    def unload(self) -> nn.Module:
        return self.__dict__["base_layer"]

    def extra_repr(self) -> str:
        return (
            f"router, in={self.in_features}, experts={self.out_features}, "
            f"active={self.active!r}, merged={self.merged}"
        )


def check_targets(model: nn.Module, paths: list[str], configs: dict, name: str) -> None:
    """Refuse, before anything changes, router weights that ``configs`` cannot adapt."""
    for p in paths:
        module, cfg = model.get_submodule(p.removesuffix(".weight")), configs[p]
        if cfg.method == "lors" or cfg.dropout:
            raise ValueError(
                f"the MoE router {p} takes plain LoRA or LoRA-FA without dropout; got method "
                f"{cfg.method!r}, dropout={cfg.dropout}"
            )
        if isinstance(module, AdaptedRouter) and name in module.adapters:
            raise ValueError(f"{p} already has an adapter named {name!r}")


def add_adapters(model: nn.Module, paths: list[str], configs: dict, name: str) -> None:
    """Give each router weight at ``paths`` an adapter ``name`` (checked by check_targets)."""
    for p in paths:
        mpath = p.removesuffix(".weight")
        module = model.get_submodule(mpath)
        if not isinstance(module, AdaptedRouter):
            module = AdaptedRouter(module)
            model.set_submodule(mpath, module)
        cfg = configs[p]
        dtype = cfg.dtype_for(module.weight.dtype)
        module.adapters[name] = adapter_class(cfg.method)(module, cfg, dtype=dtype)

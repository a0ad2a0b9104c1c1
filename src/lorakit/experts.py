"""LoRA and LoRA-FA on mixture-of-experts weights kept as fused 3-D tensors.

transformers 5 keeps a MoE block's experts in one module with 3-D Parameters, one slice per
expert: ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), or transposed (E, in, out) where
the class says ``is_transposed`` (gpt-oss). Such a module is found by what it holds (3-D
Parameters with ``num_experts`` slices and transformers' layout flags), never by family name.

Per expert e the adapter is the paper's LoRA on that expert's weight: ΔW_e = s·B_e A_e with
A (E, r, in) and B (E, out, r). :class:`AdaptedExperts` sorts the routed (token, expert) slots by
expert and runs each projection as one grouped Function (:mod:`lorakit.methods.experts`), so ΔW_e is
applied to the tokens routed to e only and never materialised (PEFT's ``target_parameters``
builds W + ΔW for every expert in each forward). LoRA keeps the routed inputs for backward and
recomputes H there; LoRA-FA keeps only H = x A_eᵀ (r numbers per routed token).

The router is never adapted. On disk the adapter is PEFT's ``target_parameters`` layout
(:func:`to_peft` / :func:`from_peft`), so PEFT loads it and lorakit loads PEFT's.
"""

from __future__ import annotations

import torch
from torch import nn

from .fake import is_fake
from .fused import ActMulFunction
from .methods.experts import ExpertLoRA, GroupedLoRAFunction, groups
from .structure import activation_grad

# The fused expert tensors lorakit adapts (transformers' names), in their usual order.
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def expert_params(module: nn.Module) -> list[str]:
    """Names of ``module``'s fused expert tensors, in registration order ([] if it is not a
    transformers experts module)."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or not hasattr(module, "is_transposed"):
        return []
    return [
        name
        for name, p in module.named_parameters(recurse=False)
        if name in EXPERT_PARAMS and p.dim() == 3 and p.shape[0] == n
    ]


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module, adapted or not."""
    return isinstance(module, AdaptedExperts) or bool(expert_params(module))


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every experts module (adapted or not), in model order."""
    return [(p, m) for p, m in model.named_modules() if is_experts(m)]


def expert_tensor_paths(model: nn.Module) -> list[str]:
    """``"<module path>.<tensor>"`` of every fused expert tensor of ``model``."""
    return [f"{p}.{t}" for p, m in find_experts(model) for t in _params_of(m)]


def _params_of(module: nn.Module) -> list[str]:
    return module.params if isinstance(module, AdaptedExperts) else expert_params(module)


def _moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(path, block, number of experts)`` of every module with an experts child."""
    found = []
    for path, block in model.named_modules():
        experts = [m for m in block.children() if is_experts(m)]
        if experts:
            found.append((path, block, experts[0].num_experts))
    return found


def routers(model: nn.Module) -> set[int]:
    """ids of the ``nn.Linear`` gates of MoE blocks: a linear sibling of an experts module whose
    output is one number per expert (a router) or a single number (Qwen2-MoE's shared-expert
    gate). ``all-linear`` leaves them alone: a gate is not a projection anyone means to adapt."""
    return {
        id(child)
        for _, block, n in _moe_blocks(model)
        for child in block.children()
        if isinstance(child, nn.Linear) and child.out_features in (1, n)
    }


def router_weight_paths(model: nn.Module) -> list[str]:
    """``"<router>.weight"`` of every MoE router kept as a module with an (E, H) ``weight``
    (transformers 5's ``*TopKRouter``). Adapted only when named: PEFT's ``all-linear`` on
    Mixtral / Qwen-MoE adds them (transformers 4 kept routers as ``nn.Linear``); lorakit's does
    not, but it loads and saves such adapters."""
    found = []
    for path, block, n in _moe_blocks(model):
        for leaf, child in block.named_children():
            w = getattr(child, "weight", None)
            plain = isinstance(child, (nn.Linear, nn.Embedding)) or is_experts(child)
            if not plain and isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[0] == n:
                found.append(f"{path}.{leaf}.weight" if path else f"{leaf}.weight")
    return found


def split_path(path: str) -> tuple[str, str]:
    """``"a.b.experts.down_proj"`` -> ``("a.b.experts", "down_proj")``."""
    module, _, tensor = path.rpartition(".")
    return module, tensor


def tensor_shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """``(E, in, out)`` of expert tensor ``name`` whatever its stored layout."""
    e, a, b = getattr(module, name).shape
    return (e, a, b) if module.is_transposed else (e, b, a)


# -- the adapted module ---------------------------------------------------------------------------


class AdaptedExperts(nn.Module):
    """A transformers experts module whose fused tensors carry low-rank adapters per expert.

    Keeps the original Parameters under their names (base checkpoints load) and the original
    module, unregistered, for its activation (``_apply_gate``) and layout flags. ``adapters``
    maps an adapter name to one :class:`ExpertLoRA` per adapted tensor.
    """

    kind = "experts"
    quantized = False  # bitsandbytes quantizes nn.Linear only: fused experts stay 16-bit

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.params = expert_params(base)
        if not self.params or getattr(base, "has_post_expert_norm", False):
            raise TypeError(f"cannot adapt the experts of a {type(base).__name__}")
        for name, p in base.named_parameters(recurse=False):
            setattr(self, name, p)
        self.num_experts = base.num_experts
        self.is_transposed = bool(base.is_transposed)
        self.__dict__["base_layer"] = base
        act = getattr(base, "act_fn", None)
        self.act_grad = activation_grad(act) if act is not None else None
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled = False

    def forward_adds_adapter(self) -> bool:
        name = self.active
        return not (name is None or self.disabled or name in self.merged)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """hidden (T, H), top_k_index (T, k), top_k_weights (T, k) -> (T, H), as the original."""
        adapter = self.adapters[self.active] if self.forward_adds_adapter() else {}
        return self.routed(hidden, top_k_index, top_k_weights, adapter)

    def routed(self, hidden, top_k_index, top_k_weights, adapter) -> torch.Tensor:
        """The experts' output with ``adapter`` (a name -> :class:`ExpertLoRA` mapping, possibly
        empty), computed over the routed slots grouped by expert."""
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)  # (T·k,)
        order = torch.argsort(flat, stable=True)  # slots grouped by expert
        counts = _counts(flat, self.num_experts)
        order = order[: sum(counts)]  # slots routed nowhere (index >= E) are dropped
        token = order // k
        x = hidden[token]  # (N, H), N = routed slots
        h = self._project(x, self.params[0], adapter, counts)
        y = self._project(self._activation(h), self.params[-1], adapter, counts)  # (N, H)
        y = y * top_k_weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(hidden).index_add_(0, token, y.to(hidden.dtype))

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        """The experts' own activation of the up-projection's output. transformers' default gate
        (``act(gate) ⊙ up`` over the two halves) runs as one Function keeping gate and up only,
        where plain autograd also keeps act(gate) (I numbers per routed token); the same ops."""
        base = self.__dict__["base_layer"]
        if not getattr(base, "has_gate", True):
            return base.act_fn(h)
        if getattr(type(base)._apply_gate, "__name__", "") == "_default_apply_gate":
            gate, up = h.chunk(2, dim=-1)
            return ActMulFunction.apply(gate, up, base.act_fn, self.act_grad)
        return base._apply_gate(h)

    def _project(self, x, name: str, adapter, counts: list[int]) -> torch.Tensor:
        weight, bias = getattr(self, name), getattr(self, f"{name}_bias", None)
        lora = adapter[name] if name in adapter else None  # noqa: SIM401 (ModuleDict)
        if lora is None:  # the frozen per-expert linear alone
            A = B = None
            scaling, keep = 1.0, "none"
        else:
            A, B, scaling = lora.lora_A, lora.lora_B, lora.scaling
            keep = "h" if lora.frozen_a else "x"
        rows = groups(counts, sample=is_fake(x))
        return GroupedLoRAFunction.apply(
            x, weight, bias, A, B, rows, scaling, self.is_transposed, keep
        )

    # -- merge ------------------------------------------------------------------------------
    def delta_weight(self, name: str, tensor: str) -> torch.Tensor:
        """ΔW of adapter ``name`` on ``tensor``, in the tensor's layout and dtype."""
        delta = self.adapters[name][tensor].delta_weight()  # (E, out, in)
        return (delta.transpose(1, 2) if self.is_transposed else delta).to(
            getattr(self, tensor).dtype
        )

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` into the fused tensors in place; no-op if already merged."""
        name = name or self.active
        if name is None or name in self.merged:
            return
        for tensor in self.adapters[name]:
            getattr(self, tensor).add_(self.delta_weight(name, tensor))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            for tensor in self.adapters[name]:
                getattr(self, tensor).sub_(self.delta_weight(name, tensor))

    def unload(self) -> nn.Module:
        """The original module (its tensors are these, merged or not)."""
        return self.__dict__["base_layer"]

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, tensors={self.params}, active={self.active!r}, "
            f"merged={self.merged}"
        )


def _counts(flat: torch.Tensor, n: int) -> list[int]:
    """Routed slots per expert. On fake tensors (lorakit plan) the routing is unknown: the slots
    are assumed spread evenly, which is what the saved bytes (a function of the total) need."""
    if is_fake(flat):
        q, rem = divmod(flat.numel(), n)
        return [q + (e < rem) for e in range(n)]
    return torch.bincount(flat, minlength=n)[:n].tolist()


# -- adding adapters -----------------------------------------------------------------------------


def check_targets(model: nn.Module, paths: list[str], configs: dict, name: str) -> None:
    """Refuse, before anything changes, expert tensors that ``configs`` cannot adapt."""
    for p in paths:
        mpath, tensor = split_path(p)
        module, cfg = model.get_submodule(mpath), configs[p]
        kinds = cfg.capabilities.kinds
        if "experts" not in kinds:
            raise ValueError(
                f"method {cfg.method!r} cannot adapt the MoE expert tensor {p}; it adapts "
                f"{sorted(kinds)} layers (leave the experts out of targets, or use method='lora' "
                f"or 'lora_fa')"
            )
        if cfg.dropout:
            raise ValueError(
                f"dropout is not supported on MoE expert tensors ({p}, dropout={cfg.dropout}): "
                f"set dropout=0.0 (PEFT's target_parameters refuses it too)"
            )
        if cfg.init == "gradient_svd":
            raise ValueError(
                f"init='gradient_svd' does not cover MoE expert tensors ({p}); use 'kaiming' or "
                f"'gaussian', or leave the experts out of targets"
            )
        _, n_in, n_out = tensor_shape(module, tensor)
        if cfg.rank > min(n_in, n_out):
            raise ValueError(
                f"rank must be a positive int <= min(in, out) = {min(n_in, n_out)}, got "
                f"{cfg.rank} for {p}"
            )
        if isinstance(module, AdaptedExperts) and name in module.adapters:
            raise ValueError(f"{mpath} already has an adapter named {name!r}")


def add_adapters(model: nn.Module, paths: list[str], configs: dict, name: str) -> None:
    """Give each expert tensor at ``paths`` an adapter ``name`` (checked by check_targets)."""
    by_module: dict[str, list[str]] = {}
    for p in paths:
        mpath, tensor = split_path(p)
        by_module.setdefault(mpath, []).append(tensor)
    for mpath, tensors in by_module.items():
        module = model.get_submodule(mpath)
        if not isinstance(module, AdaptedExperts):
            module = AdaptedExperts(module)
            _check_reproduces(module)
            model.set_submodule(mpath, module)
        loras = {}
        for t in tensors:
            cfg = configs[f"{mpath}.{t}"]
            weight = getattr(module, t)
            loras[t] = ExpertLoRA(
                tensor_shape(module, t),
                cfg,
                device=weight.device,
                dtype=cfg.dtype_for(weight.dtype),
            )
        module.adapters[name] = nn.ModuleDict(loras)


def group_routing(model: nn.Module) -> int:
    """Run every experts module through lorakit's grouped computation (checked to reproduce
    the module's own forward), adapters or not; returns how many were wrapped.

    Training with an adapter calls this, so the planner (fake tensors, where transformers'
    data-dependent expert loop cannot run) and training run one code path. A module whose
    forward is not reproduced is left as it is.
    """
    wrapped = 0
    for path, module in find_experts(model):
        if isinstance(module, AdaptedExperts):
            continue
        try:
            adapted = AdaptedExperts(module)
            _check_reproduces(adapted)
        except (TypeError, NotImplementedError):
            continue
        model.set_submodule(path, adapted)
        wrapped += 1
    return wrapped


@torch.no_grad()
def _check_reproduces(module: AdaptedExperts) -> None:
    """Refuse an experts class whose forward the grouped computation does not reproduce (one
    token per expert through the real weights, compared with the class's own forward)."""
    weight = getattr(module, module.params[0])
    if is_fake(weight) or weight.device.type == "meta":
        return
    e, hidden = module.num_experts, tensor_shape(module, module.params[0])[1]
    g = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(e, hidden, generator=g, device=weight.device).to(weight.dtype)
    index = torch.arange(e, device=weight.device)[:, None]
    scale = torch.ones(e, 1, device=weight.device, dtype=weight.dtype)
    want = module.unload()(x, index, scale).float()
    got = module.routed(x, index, scale, {}).float()
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
    if not err <= tol:
        raise NotImplementedError(
            f"lorakit's grouped expert forward does not reproduce "
            f"{type(module.__dict__['base_layer']).__name__} (relative difference {err:.2g}); "
            f"leave its tensors out of targets"
        )

"""``reduce_activation_memory``: remove the big activations that are not adapter inputs.

With LoRA-FA the adapters keep r numbers per token; what remains of a decoder's saved activations
is the LM head's logits, norms, the MLP's element-wise ops and attention. For any transformers
causal LM this module swaps in, where it finds the piece (:mod:`lorakit.structure` finds them by
their parameters, attributes and what their forward computes, never by family name):

- a fused linear + cross-entropy loss (:class:`LinearCrossEntropy`) that walks the tokens in
  chunks and never materialises the (tokens x vocab) logits or their log-softmax: the gradient
  w.r.t. the final hidden state is computed chunk by chunk in forward and kept (tokens x hidden)
  instead. Gemma 2's ``final_logit_softcapping`` is reproduced inside the chunks;
- RMSNorm (LLaMA's ``w ⊙ x̂``, Gemma's ``(1 + w) ⊙ x̂``, either cast order, any width: q/k
  norms too) that keeps only its input and one fp32 number per token; LayerNorm stays;
- an MLP (gated with separate or fused gate/up projections, any element-wise activation; or
  up → act → down) that keeps only its input and recomputes the up-projections, adapters
  included, and the activation in backward (``mlp="recompute"``, the default; one extra pass
  over those GEMMs), or, gated MLPs only, keeps gate and up and recomputes only act(gate)·up
  (``mlp="elementwise"``, no extra GEMM). MoE experts are left alone;
- PyTorch's scaled-dot-product attention (``attn_implementation="sdpa"``), which on causal
  batches without padding runs the flash kernel and keeps q, k, v, the output and a logsumexp.

Each replacement computes the same function (fp32 results within float rounding; norms bit for
bit in bf16): the norms and MLPs are checked against the module's own forward on small random
inputs when patched. What cannot be reproduced is left as it is and named in one warning: an LM
head with a bias or logits scaled after it (``logit_scale``, ``logits_scaling``, ...: the model's
own loss stays), attention that sdpa cannot compute (``_supports_sdpa=False``, attention
soft-capping, sinks). An MoE model asked for router logits (``output_router_logits``) computes its
own loss in that call, aux loss included. ``checkpointing=True`` adds HF's activation
checkpointing per decoder layer on top.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .constants import IGNORE_INDEX as IGNORE
from .fake import is_fake
from .fused import (
    ActMulFunction,
    LinearCrossEntropy,
    RMSNormFunction,
    SiLUMulFunction,
    acc_dtype,
)
from .quant import dense_shape, is_quantized
from .structure import (
    MLPSpec,
    causal_lm_parts,
    is_norm_like,
    loss_path,
    mlp_output,
    mlp_spec,
    plain_lm_head,
    rms_norm_variant,
    sdpa_refusal,
)

__all__ = [
    "ActMulFunction",
    "LinearCrossEntropy",
    "RMSNorm",
    "RMSNormFunction",
    "SiLUMulFunction",
    "chunked_causal_lm_loss",
    "enable_checkpointing",
    "plain_lm_head",
    "reduce_activation_memory",
]

MLP_MODES = ("recompute", "elementwise", None)


# -- fused linear + cross-entropy -----------------------------------------------------------------


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    chunk: int = 1024,
    softcap: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token loss and the number of predicted tokens, without full logits.

    hidden (b, s, d) final hidden states, labels (b, s) unshifted (the shift happens here);
    ``softcap`` c: the logits are c·tanh(head(h) / c) (Gemma 2's final_logit_softcapping).
    """
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("chunked loss for an LM head with a bias is not supported")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    if is_fake(y):  # planning: every shifted label is a target (see lorakit.fake)
        keep = torch.arange(y.shape[0], device=y.device)
    else:
        keep = (y != IGNORE).nonzero().squeeze(1)  # skip tokens without loss entirely
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    if _adapter_active(head) or is_quantized(head.weight):
        return _checkpointed_head_loss(h, head, y, chunk, softcap), int(keep.numel())
    # No gradient work when nothing needs it (evaluation under no_grad, a frozen model).
    grads = torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad)
    loss = LinearCrossEntropy.apply(h, head.weight, y, chunk, grads, softcap)
    return loss, int(keep.numel())


def _adapter_active(head: nn.Module) -> bool:
    """An adapted LM head whose adapter runs (its forward is more than ``h Wᵀ``)."""
    from .layers import AdaptedLayer

    return isinstance(head, AdaptedLayer) and head.forward_adds_adapter()


def _head_chunk_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor, softcap) -> torch.Tensor:
    z = head(h)  # (C, V)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return F.cross_entropy(z.float(), y, reduction="sum", ignore_index=IGNORE)


def _checkpointed_head_loss(
    h: torch.Tensor, head: nn.Module, y: torch.Tensor, chunk: int, softcap: float | None
) -> torch.Tensor:
    """Summed loss through the head's own forward (an adapted or 4-bit head), chunk by chunk.

    Each chunk's logits are recomputed in backward instead of kept, so the head's adapter gets
    its gradient and still no (N, V) tensor is saved; it costs one more head GEMM per chunk.
    """
    total = h.new_zeros((), dtype=acc_dtype(h))
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i : i + chunk], y[i : i + chunk]
        if torch.is_grad_enabled():
            total = total + _recompute(_head_chunk_loss, head, hc, yc, softcap)
        else:
            total = total + _head_chunk_loss(head, hc, yc, softcap)
    return total


# -- RMSNorm and MLPs ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Drop-in for an RMSNorm module (same ``weight``) through :class:`RMSNormFunction`.

    ``offset``/``cast_first`` as there; the defaults are LLaMA's (LlamaRMSNorm, Qwen2RMSNorm, ...).
    """

    def __init__(self, base: nn.Module, offset: float = 0.0, cast_first: bool = True) -> None:
        super().__init__()
        self.weight = base.weight
        self.eps = getattr(base, "variance_epsilon", getattr(base, "eps", 1e-6))
        self.offset, self.cast_first = offset, cast_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps, self.offset, self.cast_first)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"


def _recompute(fn, *args):
    from torch.utils.checkpoint import checkpoint

    # Non-reentrant: nests under HF checkpointing, restores the RNG state (dropout masks match).
    return checkpoint(fn, *args, use_reentrant=False)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """An MLP's forward as its ``_lorakit_mlp`` spec says: ``recompute`` keeps only x and re-runs
    the up-projections (adapters included) and the activation in backward; else (gated) keeps
    gate and up and recomputes only act(gate)·up. With a tile, the tokens go through in tiles
    of that many (forward and recompute), each written into one output."""
    spec, tile = self._lorakit_mlp, getattr(self, "_lorakit_tile", None)
    recompute = _recompute if spec.recompute else None
    flat = x.reshape(-1, x.shape[-1])  # (N, d)
    if tile is None or flat.shape[0] <= tile:
        return mlp_output(self, spec, x, recompute)
    out = None
    for i in range(0, flat.shape[0], tile):
        y = mlp_output(self, spec, flat[i : i + tile], recompute)  # (t, d)
        if out is None:
            out = y.new_empty(flat.shape[0], y.shape[-1])
        out[i : i + tile] = y  # the tile's output is freed here, not kept until a cat
    return out.view(*x.shape[:-1], out.shape[-1])


_LLAMA_MLP = MLPSpec("up_proj", "down_proj", "act_fn", gate="gate_proj")


def _gated_mlp_recompute_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``mlp="recompute"`` for a gate_proj/up_proj/act_fn/down_proj MLP, by those names (bench/
    patches single decoder blocks with it)."""
    return mlp_output(self, _LLAMA_MLP, x, _recompute)


def _replace_norms(model: nn.Module) -> list[str]:
    """RMSNorm-computing modules replaced by :class:`RMSNorm`; the norm-like ones that compute
    something else are named."""
    kept = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, RMSNorm) or not is_norm_like(module):
            continue
        variant = rms_norm_variant(module)
        if variant is None:
            kept.add(type(module).__name__)
            continue
        model.set_submodule(name, RMSNorm(module, *variant))
    return [f"norms: {cls} (not an RMSNorm this reproduces)" for cls in sorted(kept)]


def _patch_mlps(model: nn.Module, mode: str, tile: int | None) -> None:
    """Every MLP's forward swapped for :func:`_mlp_forward`; ``elementwise`` only where the MLP
    is gated (an up → act → down MLP has no product to recompute)."""
    for module in model.modules():
        spec = mlp_spec(module)
        if spec is None or (mode == "elementwise" and not spec.gated):
            continue
        module._lorakit_mlp = dataclasses.replace(spec, recompute=mode == "recompute")
        module._lorakit_tile = tile
        module.forward = types.MethodType(_mlp_forward, module)


# -- wiring --------------------------------------------------------------------------------------


def _dense_call(self, kwargs: dict[str, Any]) -> bool:
    """True when this call needs the model's own loss: a loss term the chunks do not compute
    (an MoE router's aux loss, asked for per call or by config) or labels already shifted."""
    router = kwargs.get("output_router_logits")
    if router is None:
        router = getattr(self.config, "output_router_logits", False)
    return bool(router) or kwargs.get("shift_labels") is not None


def _chunked_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs: Any):
    """Causal-LM forward that, given labels, returns the loss without computing full logits."""
    path = None
    if labels is not None and not _dense_call(self, kwargs):
        path, _ = loss_path(self)
    if path is None:
        return self._lorakit_dense_forward(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    out = path.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    total, count = chunked_causal_lm_loss(
        out.last_hidden_state, path.head, labels, self._lorakit_chunk, path.softcap
    )
    loss = total / (num_items if num_items is not None else max(count, 1))
    return CausalLMOutputWithPast(
        loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None)
    )


def loss_chunk(vocab: int) -> int:
    """Tokens per chunk of the fused loss: 1024, fewer for large vocabularies so that a chunk's
    fp32 logits stay within 2^26 values (256 MiB): 512 at Llama-3's 128,256, 128 at Gemma 3's
    262,208 (a chunk's logits are the loss's largest transient)."""
    chunk = 1024
    while chunk > 64 and chunk * vocab > 2**26:
        chunk //= 2
    return chunk


def _chunk_loss(model: nn.Module, chunk_size: int | None) -> list[str]:
    """The chunked loss installed where :func:`lorakit.structure.loss_path` reproduces the
    model's logits; else what it cannot reproduce."""
    path, refused = loss_path(model)
    if path is None:
        return [f"loss: {r} (the model's own loss stays)" for r in refused]
    model._lorakit_chunk = chunk_size or loss_chunk(dense_shape(path.head.weight)[0])
    if not hasattr(model, "_lorakit_dense_forward"):
        model._lorakit_dense_forward = model.forward
        model.forward = types.MethodType(_chunked_forward, model)
    if getattr(model.config, "output_router_logits", False):
        coef = getattr(model.config, "router_aux_loss_coef", None)
        return [
            f"loss: output_router_logits=True (the model adds router_aux_loss_coef={coef} x "
            "its aux loss): calls that ask for router logits compute the model's own loss"
        ]
    return []


def _set_attention(model: nn.Module, attention: str) -> list[str]:
    """``_attn_implementation`` set on every config, unless sdpa would compute another function."""
    if attention == "sdpa" and model.config._attn_implementation != "sdpa":
        refusal = sdpa_refusal(model)
        if refusal is not None:
            return [f"{refusal}; it stays {model.config._attn_implementation!r}"]
    model.config._attn_implementation = attention
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = attention
    return []


def enable_checkpointing(model: nn.Module, offload: bool = False) -> nn.Module:
    """HF activation checkpointing per decoder layer, non-reentrant (nests, keeps RNG state);
    ``offload``: the block inputs it keeps go to host memory (:mod:`lorakit.offload`)."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(
            f"activation checkpointing needs a transformers model; got {type(model).__name__}"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        from .offload import offload_checkpoints

        offload_checkpoints(model)
    return model


def reduce_activation_memory(
    model: nn.Module,
    *,
    chunked_loss: bool = True,
    recompute_norms: bool = True,
    mlp: str | None = "recompute",
    attention: str | None = "sdpa",
    checkpointing: bool = False,
    chunk_size: int | None = None,
    mlp_tile: int | None = None,
    offload: bool = False,
) -> nn.Module:
    """Cut the activations a causal LM keeps for backward, in place; returns the model.

    Pieces are found by structure (see the module docstring): any transformers causal LM works;
    a piece that cannot be reproduced exactly is left as it is and named in one warning, the
    rest is still reduced. Call before or after :func:`lorakit.inject`; works with every method.
    An adapted LM head (``targets=["lm_head"]``) is honoured in either order: its loss then runs
    through the head's own forward, chunk by chunk, with each chunk's logits recomputed.

    Args:
        model: a transformers causal LM (``can_generate()``, a decoder body, an LM head).
        chunked_loss: with ``labels``, compute the loss in token chunks; ``logits`` is then None.
            Needs a bias-free linear head with nothing after it but Gemma's soft-capping.
        recompute_norms: RMSNorms keep only their input.
        mlp: ``"recompute"`` keeps only the MLP's input and recomputes the up-projections
            (gate/up with their adapters; GPT-2's c_fc) and the activation in backward: one
            extra pass over those GEMMs, about 15-20 % of a step, for 2·N·d_ff fewer saved values
            per layer. ``"elementwise"`` keeps gate and up and recomputes only act(gate)·up
            (gated MLPs only). None leaves the MLPs alone.
        attention: set ``config._attn_implementation`` (``"sdpa"`` where the model's attention
            is what sdpa computes), or None to leave it.
        checkpointing: also enable HF activation checkpointing per decoder layer.
        offload: with ``checkpointing``, keep the checkpointed block inputs in host memory.
        chunk_size: tokens per chunk of the fused loss; None: :func:`loss_chunk` of the vocabulary
            (1024 up to 65,536 entries, fewer above).
        mlp_tile: run every MLP over at most this many tokens at a time (forward and, with
            ``mlp="recompute"``, the recompute in backward), so its (tokens x d_ff) transients
            are bounded by the tile instead of the sequence; the same function (rows are
            independent). None: the whole sequence at once.

    Raises:
        ValueError: ``model`` is not a transformers causal LM, ``mlp`` is unknown, or
            ``mlp_tile`` is not a positive int.
    """
    parts = causal_lm_parts(model)
    if isinstance(parts, str):
        raise ValueError(
            "reduce_activation_memory needs a transformers causal LM (can_generate(), a decoder "
            f"body, get_output_embeddings() giving its LM head); got {type(model).__name__}: "
            f"{parts}"
        )
    if mlp not in MLP_MODES:
        raise ValueError(f"mlp={mlp!r}: expected one of {MLP_MODES}")
    if mlp_tile is not None and (not isinstance(mlp_tile, int) or mlp_tile < 1):
        raise ValueError(f"mlp_tile must be a positive int (tokens) or None, got {mlp_tile!r}")
    kept = _chunk_loss(model, chunk_size) if chunked_loss else []
    if recompute_norms:
        kept += _replace_norms(model)
    if mlp is not None:
        _patch_mlps(model, mlp, mlp_tile)
    if attention is not None:
        kept += _set_attention(model, attention)
    if kept:
        warnings.warn(
            f"reduce_activation_memory left these pieces of {type(model).__name__} as they are: "
            + "; ".join(kept),
            stacklevel=2,
        )
    if offload and not checkpointing:
        raise ValueError("offload moves what checkpointing keeps: use it with checkpointing=True")
    if checkpointing:
        enable_checkpointing(model, offload=offload)
    return model

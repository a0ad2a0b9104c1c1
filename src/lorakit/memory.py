"""``reduce_activation_memory``: remove the big activations that are not adapter inputs.

With LoRA-FA the adapters keep r numbers per token; what remains of a decoder's saved activations
is the LM head's logits, norms, the MLP's element-wise ops and attention. For HF causal LMs of the
LLaMA family (LLaMA, SmolLM2, Qwen2, Mistral) and GPT-2 this module swaps in:

- a fused linear + cross-entropy loss that walks the tokens in chunks and never materialises the
  (tokens x vocab) logits or their log-softmax: the gradient w.r.t. the final hidden state is
  computed chunk by chunk in forward and kept (tokens x hidden) instead;
- RMSNorm that keeps only its input (and one fp32 number per token) and recomputes the rest;
- an MLP that keeps only its input and recomputes the up-projections (gate and up, adapters
  included; GPT-2's c_fc) and SiLU(gate)·up in backward (``mlp="recompute"``, the default; one
  extra pass over two of the three MLP GEMMs), or keeps gate and up and recomputes only the
  element-wise SiLU·up (``mlp="elementwise"``, no extra GEMM);
- PyTorch's scaled-dot-product attention (``attn_implementation="sdpa"``), which on causal
  batches without padding runs the flash kernel and keeps q, k, v, the output and a logsumexp.

Each replacement computes the same function (fp32 results within float rounding); tests compare
losses and gradients with the unreduced model. ``checkpointing=True`` adds HF's activation
checkpointing per decoder layer on top.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .constants import IGNORE_INDEX as IGNORE
from .fake import is_fake

# Model types whose norms, MLP and LM head are exactly what the replacements compute (Gemma's
# (1 + w) RMSNorm and soft-capped / scaled logits are not).
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "gpt2"}
MLP_MODES = ("recompute", "elementwise", None)


def _compute_dtype(weight: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """16-bit heads: their own dtype, or float32 where this CPU has no 16-bit units."""
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return acc
    if weight.device.type == "cpu":
        from .hardware import cpu_compute_dtype

        return cpu_compute_dtype(weight.dtype)
    return weight.dtype


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# -- fused linear + cross-entropy -----------------------------------------------------------------


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h Wᵀ`` against ``labels``, in chunks of tokens.

    Shapes: h (N, d), W (V, d), labels (N,) with -100 for no loss; chunk C tokens.

    forward:  for each chunk: Z = h_c Wᵀ (C, V) in fp32; loss += Σ (logsumexp Z − Z[label]);
              dh_c = (softmax Z − onehot) W (C, d); dW += (softmax Z − onehot)ᵀ h_c if W trains.
    backward: dh = g · dh;  dW = g · dW.
    saves:    dh (N, d) in h's dtype (and dW if W requires grad). Never the (N, V) logits.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int, grads: bool = True):
        with torch.autocast(h.device.type, enabled=False):  # the logits stay in fp32
            return LinearCrossEntropy._run(ctx, h, weight, labels, chunk, grads)

    @staticmethod
    def _run(ctx, h, weight, labels, chunk, grads):
        # grads=False (evaluation under no_grad): the loss alone, no dh / dW work.
        n = h.shape[0]
        acc = _acc(h)
        loss = torch.zeros((), dtype=acc, device=h.device)
        dh = torch.zeros_like(h) if grads else None
        dw = torch.zeros_like(weight, dtype=acc) if grads and weight.requires_grad else None
        # The GEMMs run in the weight's compute dtype (a 16-bit head on GPU: its own, as the
        # unreduced model's logits are; never a whole fp32 copy of a 128k-vocabulary head),
        # the softmax in fp32.
        cd = _compute_dtype(weight, acc)
        w = weight.to(cd)
        for i in range(0, n, chunk):
            hc, yc = h[i : i + chunk], labels[i : i + chunk]
            z = (hc.to(cd) @ w.t()).to(acc)  # (C, V)
            valid = yc != IGNORE
            safe = torch.where(valid, yc, 0)
            target = z.gather(1, safe[:, None]).squeeze(1)
            # logsumexp in place (torch.logsumexp allocates a second (C, V) buffer for z - max):
            # z becomes exp(z - max), then the softmax, then the gradient w.r.t. the logits.
            top = z.amax(dim=-1)
            total = z.sub_(top[:, None]).exp_().sum(-1)
            loss += ((total.log() + top - target) * valid).sum()
            if not grads:
                continue
            z.div_(total[:, None])
            z[torch.arange(len(yc), device=z.device), safe] -= 1.0
            z.mul_(valid[:, None])
            dh[i : i + chunk] = (z.to(cd) @ w).to(h.dtype)
            if dw is not None:
                dw.addmm_(z.t(), hc.to(acc))
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        dw = None if dw is None else (dw * g).to(ctx.weight_dtype)
        return dh * g.to(dh.dtype), dw, None, None, None


def chunked_causal_lm_loss(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, int]:
    """Summed next-token loss and the number of predicted tokens, without full logits.

    hidden (b, s, d) final hidden states, labels (b, s) unshifted (the shift happens here).
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
    if _adapter_active(head):
        return _checkpointed_head_loss(h, head, y, chunk), int(keep.numel())
    # No gradient work when nothing needs it (evaluation under no_grad, a frozen model).
    grads = torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad)
    return LinearCrossEntropy.apply(h, head.weight, y, chunk, grads), int(keep.numel())


def _adapter_active(head: nn.Module) -> bool:
    """An adapted LM head whose adapter runs (its forward is more than ``h Wᵀ``)."""
    from .layers import AdaptedLayer

    return isinstance(head, AdaptedLayer) and head.forward_adds_adapter()


def _head_chunk_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = head(h).float()  # (C, V)
    return F.cross_entropy(z, y, reduction="sum", ignore_index=IGNORE)


def _checkpointed_head_loss(
    h: torch.Tensor, head: nn.Module, y: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Summed loss through the head's own forward (an adapted head), chunk by chunk.

    Each chunk's logits are recomputed in backward instead of kept, so the head's adapter gets
    its gradient and still no (N, V) tensor is saved; it costs one more head GEMM per chunk.
    """
    total = h.new_zeros((), dtype=_acc(h))
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i : i + chunk], y[i : i + chunk]
        if torch.is_grad_enabled():
            total = total + _recompute(_head_chunk_loss, head, hc, yc)
        else:
            total = total + _head_chunk_loss(head, hc, yc)
    return total


# -- RMSNorm and SiLU·up -------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """y = w ⊙ (x / rms(x)) computed in fp32 and cast like HF's LlamaRMSNorm.

    Shapes: x (..., d), w (d,). saves: x, w, rstd (one fp32 per row). backward recomputes
    x̂ = x·rstd; dx = rstd·(ĝ − x̂·mean(ĝ ⊙ x̂)) with ĝ = dy ⊙ w; dw = Σ dy ⊙ x̂.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(_acc(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        xhat = x.to(acc) * rstd
        gw = dy.to(acc) * weight.to(acc)
        dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (
                (dy.to(acc) * xhat.to(x.dtype).to(acc))
                .reshape(-1, x.shape[-1])
                .sum(0)
                .to(weight.dtype)
            )
        return dx.to(x.dtype), dw, None


class SiLUMulFunction(torch.autograd.Function):
    """y = SiLU(g) ⊙ u, keeping g and u only (SiLU and the product are recomputed).

    backward: du = dy ⊙ SiLU(g);  dg = dy ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))).
    """

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        sig = torch.sigmoid(g)
        du = dy * (g * sig) if ctx.needs_input_grad[1] else None
        dg = dy * u * sig * (1 + g * (1 - sig)) if ctx.needs_input_grad[0] else None
        return dg, du


class RMSNorm(nn.Module):
    """Drop-in for HF's LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm (same ``weight``)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.weight = base.weight
        self.eps = getattr(base, "variance_epsilon", getattr(base, "eps", 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


def _gate_up(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return SiLUMulFunction.apply(mlp.gate_proj(x), mlp.up_proj(x))


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``mlp="elementwise"``: keeps gate and up (2·N·d_ff), recomputes SiLU and the product."""
    return self.down_proj(_gate_up(self, x))


def _recompute(fn, *args):
    from torch.utils.checkpoint import checkpoint

    # Non-reentrant: nests under HF checkpointing, restores the RNG state (dropout masks match).
    return checkpoint(fn, *args, use_reentrant=False)


def _gated_mlp_recompute_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``mlp="recompute"``: keeps only x; backward re-runs gate/up (adapters included)."""
    return self.down_proj(_recompute(_gate_up, self, x))


def _gpt2_up(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.act(mlp.c_fc(x))


def _gpt2_mlp_recompute_forward(self, x: torch.Tensor) -> torch.Tensor:
    """GPT-2 MLP with ``mlp="recompute"``: keeps only x; backward re-runs c_fc and GELU."""
    return self.dropout(self.c_proj(_recompute(_gpt2_up, self, x)))


# -- wiring --------------------------------------------------------------------------------------


def _is_llama_like(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    return inner is not None and hasattr(inner, "layers") and hasattr(model, "lm_head")


def _is_gpt2(model: nn.Module) -> bool:
    return (
        hasattr(model, "transformer")
        and hasattr(model.transformer, "h")
        and hasattr(model, "lm_head")
    )


def _chunked_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs: Any):
    """Causal-LM forward that, given labels, returns the loss without computing full logits."""
    if labels is None:
        return self._lorakit_dense_forward(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    body = self.transformer if _is_gpt2(self) else self.model
    out = body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    total, count = chunked_causal_lm_loss(
        out.last_hidden_state, self.lm_head, labels, self._lorakit_chunk
    )
    loss = total / (num_items if num_items is not None else max(count, 1))
    return CausalLMOutputWithPast(
        loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None)
    )


def enable_checkpointing(model: nn.Module) -> nn.Module:
    """HF activation checkpointing per decoder layer, non-reentrant (nests, keeps RNG state)."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(
            f"activation checkpointing needs a transformers model; got {type(model).__name__}"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _patch_llama(model: nn.Module, recompute_norms: bool, mlp: str | None) -> None:
    """RMSNorm modules replaced, gated SiLU MLPs' forward swapped (LLaMA family)."""
    for name, module in list(model.named_modules()):
        cls = type(module).__name__
        if recompute_norms and cls.endswith("RMSNorm"):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, RMSNorm(module))
        gated = all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj"))
        if mlp is None or not cls.endswith("MLP") or not gated:
            continue
        act = getattr(getattr(module, "config", None), "hidden_act", "silu")
        if act in ("silu", "swish"):
            fwd = _gated_mlp_recompute_forward if mlp == "recompute" else _gated_mlp_forward
            module.forward = types.MethodType(fwd, module)


def reduce_activation_memory(
    model: nn.Module,
    *,
    chunked_loss: bool = True,
    recompute_norms: bool = True,
    mlp: str | None = "recompute",
    attention: str | None = "sdpa",
    checkpointing: bool = False,
    chunk_size: int = 1024,
) -> nn.Module:
    """Cut the activations a causal LM keeps for backward, in place; returns the model.

    Call before or after :func:`lorakit.inject`; works with every method. An adapted LM head
    (``targets=["lm_head"]``) is honoured in either order: its loss then runs through the head's
    own forward, chunk by chunk, with each chunk's logits recomputed in backward.

    Args:
        model: an HF causal LM of the LLaMA family (LLaMA, SmolLM2, Qwen2, Mistral) or GPT-2.
        chunked_loss: with ``labels``, compute the loss in token chunks; ``logits`` is then None.
        recompute_norms: RMSNorm keeps only its input (LLaMA family).
        mlp: ``"recompute"`` keeps only the MLP's input and recomputes the up-projections
            (gate/up, with their adapters; GPT-2's c_fc) and the activation in backward: one
            extra pass over those GEMMs, about 15-20 % of a step, for 2·N·d_ff fewer saved values
            per layer. ``"elementwise"`` keeps gate and up and recomputes only SiLU·up (LLaMA
            family). None leaves the MLP alone.
        attention: set ``config._attn_implementation`` (``"sdpa"``), or None to leave it.
        checkpointing: also enable HF activation checkpointing per decoder layer.
        chunk_size: tokens per chunk of the fused loss.
    """
    llama, gpt2 = _is_llama_like(model), _is_gpt2(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not (llama or gpt2) or model_type not in SUPPORTED:
        raise ValueError(
            f"reduce_activation_memory supports HF causal LMs of the LLaMA family and GPT-2 "
            f"(model_type in {sorted(SUPPORTED)}); got {type(model).__name__} ({model_type})"
        )
    if mlp not in MLP_MODES:
        raise ValueError(f"mlp={mlp!r}: expected one of {MLP_MODES}")
    if chunked_loss and not hasattr(model, "_lorakit_dense_forward"):
        model._lorakit_dense_forward = model.forward
        model._lorakit_chunk = chunk_size
        model.forward = types.MethodType(_chunked_forward, model)
    if llama:
        _patch_llama(model, recompute_norms, mlp)
    if gpt2 and mlp == "recompute":
        for module in model.modules():
            if type(module).__name__ == "GPT2MLP":
                module.forward = types.MethodType(_gpt2_mlp_recompute_forward, module)
    if attention is not None and hasattr(model, "config"):
        model.config._attn_implementation = attention
        for module in model.modules():
            if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
                module.config._attn_implementation = attention
    if checkpointing:
        enable_checkpointing(model)
    return model

"""A 4-bit frozen base (QLoRA, Dettmers et al. 2023, arXiv 2305.14314) through bitsandbytes.

Two ways to get one, both giving bitsandbytes ``Linear4bit`` layers (NF4 or FP4, blocks of 64
weights, optionally double-quantized block scales):

- :func:`lorakit.load_model` with ``quantize="nf4"`` (transformers' ``BitsAndBytesConfig``,
  weights quantized as they load; the conventional path, and any model loaded that way by hand);
- :func:`lorakit.quantize` on a model in memory, e.g. a pruned one. It also records each layer's zero
  pattern before rounding (1 bit per weight), which LoRS needs: NF4 maps 0 to 0, but small kept
  weights can round to 0 too, so the quantized zeros are a superset of the pruned ones.

An adapted 4-bit layer never keeps a dequantized weight: lorakit's Functions call :func:`dense`
in forward and again in backward for dx, a transient (out, in) tensor freed after its GEMM. That
is the work bitsandbytes' own layer does on CPU (its ``gemm_4bit`` dequantizes, then
``F.linear``), and its backward dequantizes again for dx too. The 4-bit weight has no gradient:
a trainable base weight and full fine-tuning are refused on such layers.

Compute dtype: lorakit computes a 4-bit layer like any other (x's dtype, or autocast's; on CPUs
without 16-bit units, float32 for 16-bit inputs); ``bnb_4bit_compute_dtype`` applies to
bitsandbytes' own layers (layers without an active adapter). :func:`bnb_config` sets it to the
model's dtype, so both agree. Adapters follow ``LoRAConfig.adapter_dtype``'s default applied to
the dtype the weight had before quantization (:func:`dense_dtype`): float32 on a 16-bit or a
float32 model, as PEFT's QLoRA keeps them.

8-bit (``load_in_8bit``, LLM.int8) is refused: bitsandbytes' 8-bit matmul quantizes the
*activations* too, per row with fp16 outlier columns, which lorakit's dequantize-then-GEMM layers
would not reproduce (the adapted model would no longer compute the 8-bit model it was given).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4")
INSTALL = "pip install bitsandbytes==0.50.2 (after the pinned torch, like the other packages)"
# The zero pattern :func:`lorakit.quantize` records on a Linear4bit (a non-persistent buffer).
PATTERN = "lorakit_zero_bits"
NO_PATTERN = (
    "LoRS needs the pruned model's zero pattern, which a 4-bit weight does not keep (small kept "
    "weights can round to 0 as well); quantize the pruned full-precision model with "
    "lorakit.quantize, which records it (the CLI's --quantize does that for lors), instead of "
    "loading it 4-bit through transformers"
)


def require_bnb():
    """The bitsandbytes module, or an ImportError naming the install command."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(f"a 4-bit base needs the bitsandbytes package: {INSTALL}") from None
    return bitsandbytes


def check_quant_type(quant_type: str) -> str:
    if quant_type in ("int8", "8bit", "load_in_8bit"):
        raise ValueError(
            "8-bit bases are not supported: bitsandbytes' 8-bit matmul (LLM.int8) also "
            "quantizes the activations, which lorakit's layers (dequantize, then one GEMM) "
            f"would not reproduce; use a 4-bit base, one of {list(QUANT_TYPES)}"
        )
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {list(QUANT_TYPES)}, got {quant_type!r}")
    return quant_type


def is_quantized(weight: Any) -> bool:
    """True for a bitsandbytes 4-bit weight (packed, with its quant state)."""
    return getattr(weight, "quant_state", None) is not None


def is_quantized_layer(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (not an adapted one)."""
    return type(module).__name__ == "Linear4bit" and is_quantized(module.weight)


def is_8bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear8bitLt"


def state(weight: torch.Tensor):
    """A 4-bit weight's quant state (None for any other weight). Autograd Functions keep it on
    ``ctx``: a tensor they save comes back from backward as a plain tensor, without it."""
    return getattr(weight, "quant_state", None)


def dense_shape(weight: torch.Tensor, qs=None) -> torch.Size:
    """The (out, in) shape of a weight, quantized (its state: ``qs`` or its own) or not."""
    qs = qs or state(weight)
    return weight.shape if qs is None else torch.Size(qs.shape)


def dense_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a weight had before quantization (its own dtype if not quantized)."""
    return weight.quant_state.dtype if is_quantized(weight) else weight.dtype


def dense(weight: torch.Tensor, dtype: torch.dtype, qs=None) -> torch.Tensor:
    """``weight`` as a dense tensor in ``dtype``: a 4-bit weight (its state: ``qs`` or its own)
    dequantized, a new transient (out, in) tensor; any other weight cast (a no-op when it is
    already in ``dtype``)."""
    qs = qs or state(weight)
    if qs is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bf

    absmax = qs.absmax
    if qs.nested:  # double quantization: the block scales are 8-bit themselves
        absmax = (bf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    if weight.device.type == "cpu" and qs.shape[-1] % qs.blocksize:
        return _dense_by_table(weight.data, absmax, qs, dtype)
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight.data.view(-1, 1), absmax, qs.blocksize, qs.quant_type, qs.shape, dtype
    )


def _dense_by_table(packed: torch.Tensor, absmax: torch.Tensor, qs, dtype) -> torch.Tensor:
    """Dequantization by table lookup, for rows that blocks straddle (``in % blocksize != 0``):
    bitsandbytes 0.50's AVX-512 CPU kernel assumes blocks within rows and scales those wrongly
    (seen: (48, 32) in blocks of 64, an error of 40 % of the largest weight)."""
    import bitsandbytes.functional as bf

    codes = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack((codes >> 4, codes & 15), dim=1).reshape(-1)  # high nibble first
    table = bf.get_4bit_type(qs.quant_type, device=packed.device)
    n = qs.shape.numel()
    scale = absmax.float().repeat_interleave(qs.blocksize)[:n]  # the last block may be partial
    return (table[nibbles[:n].long()] * scale).view(qs.shape).to(dtype)


def zero_pattern(module: nn.Module) -> torch.Tensor | None:
    """The packed zero pattern of a linear layer's weight (:func:`lorakit.bitmask.pack_mask`):
    computed from a full-precision weight, the one :func:`lorakit.quantize` recorded for a 4-bit one,
    None for a 4-bit weight quantized without recording it."""
    from .bitmask import pack_mask

    base = module.__dict__.get("base_layer", module)  # an AdaptedLayer's original module
    if not is_quantized(module.weight):
        return pack_mask(module.weight.detach())
    if getattr(base, PATTERN + "_none", False):  # recorded: no zero at all
        return pack_mask(torch.ones(dense_shape(module.weight), dtype=torch.bool))
    return getattr(base, PATTERN, None)


def prepare(module: nn.Module) -> None:
    """Keep a 4-bit layer's packed weight in bitsandbytes' canonical layout, which lorakit
    dequantizes: on CPUs with avx512_bf16, bitsandbytes repacks it for its inference kernel on
    the first no-grad eval forward; that is undone here and switched off for this layer."""
    if not is_quantized(getattr(module, "weight", None)):
        return
    module.support_avx512bf16_for_cpu = False
    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)


def keep_canonical(model: nn.Module) -> nn.Module:
    """:func:`prepare` every 4-bit layer of ``model`` as it is loaded, so that no eval forward
    repacks a weight before lorakit adapts it (bitsandbytes' repacking keeps the block scales
    in bfloat16, and undoing it does not give the original back)."""
    straddling = []
    for name, m in model.named_modules():
        prepare(m)
        qs = state(getattr(m, "weight", None))
        if qs is not None and m.weight.device.type == "cpu" and qs.shape[-1] % qs.blocksize:
            straddling.append(name)
    if straddling and torch.backends.cpu.get_cpu_capability() == "AVX512":
        import warnings

        warnings.warn(
            f"{len(straddling)} 4-bit layers (e.g. {straddling[0]}) have an input width that is "
            "not a multiple of the 4-bit block: on this AVX-512 CPU bitsandbytes' own kernels "
            "compute them wrongly; lorakit's adapted layers dequantize them exactly, so target "
            "every 4-bit layer",
            stacklevel=3,
        )
    return model


def bnb_config(quant_type: str = "nf4", *, double_quant: bool = True, compute_dtype=None):
    """transformers' ``BitsAndBytesConfig`` for a 4-bit base (``compute_dtype``: the model's)."""
    require_bnb()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=check_quant_type(quant_type),
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


@torch.no_grad()
def dequantized(module: nn.Module, delta: torch.Tensor | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` computing what a 4-bit layer computes (plus ``delta``, (out, in)),
    in the dtype the weight had before quantization."""
    w = module.weight
    dtype = dense_dtype(w)
    weight = dense(w, dtype)
    if delta is not None:
        weight += delta.to(dtype)
    out, inp = weight.shape
    bias = module.bias
    linear = nn.Linear(inp, out, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return linear

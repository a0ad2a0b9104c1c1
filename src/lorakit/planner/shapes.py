"""Model shapes the planner knows by name, and reading any other model's config.json.

Only the config is ever read: the planner builds the model on fake tensors. The built-ins are the
public ``config.json`` fields that decide a model's tensors (and its rotary scaling, which decides
nothing about memory but keeps the config valid), so no download is needed to plan them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096}
_LLAMA2 |= {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
_LLAMA31 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 131072}
_LLAMA31 |= {"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False}
_LLAMA31["rope_scaling"] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "max_position_embeddings": 8192}
_SMOLLM2 |= {"rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def _shape(base: dict[str, Any], d: int, ff: int, layers: int, heads: int, kv: int, **kw):
    return base | {
        "hidden_size": d,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        **kw,
    }


BUILTIN: dict[str, dict[str, Any]] = {
    "llama-2-7b": _shape(_LLAMA2, 4096, 11008, 32, 32, 32),
    "llama-2-13b": _shape(_LLAMA2, 5120, 13824, 40, 40, 40),
    "llama-2-70b": _shape(_LLAMA2, 8192, 28672, 80, 64, 8),
    "llama-3.1-8b": _shape(_LLAMA31, 4096, 14336, 32, 32, 8),
    "llama-3.1-70b": _shape(_LLAMA31, 8192, 28672, 80, 64, 8),
    "mistral-7b": _shape(  # Mistral-7B-v0.3
        {"model_type": "mistral", "vocab_size": 32768, "max_position_embeddings": 32768},
        4096,
        14336,
        32,
        32,
        8,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen2.5-7b": _shape(
        {"model_type": "qwen2", "vocab_size": 152064, "max_position_embeddings": 131072},
        3584,
        18944,
        28,
        28,
        4,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "mixtral-8x7b": _shape(
        {"model_type": "mixtral", "vocab_size": 32000, "max_position_embeddings": 32768},
        4096,
        14336,  # each expert's width
        32,
        32,
        8,
        num_local_experts=8,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": _shape(  # 128 experts of width 768, 8 per token
        {"model_type": "qwen3_moe", "vocab_size": 151936, "max_position_embeddings": 40960},
        2048,
        6144,
        48,
        32,
        4,
        head_dim=128,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "gemma-3-4b": _shape(  # the text model of gemma-3-4b-pt
        {"model_type": "gemma3_text", "vocab_size": 262208, "max_position_embeddings": 131072},
        2560,
        10240,
        34,
        8,
        4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": _shape(_SMOLLM2, 576, 1536, 30, 9, 3, rope_theta=100000.0),
    "smollm2-1.7b": _shape(_SMOLLM2, 2048, 8192, 24, 32, 32, rope_theta=130000.0),
}


def load_config(model: str | os.PathLike):
    """A transformers config for ``model``: a built-in name, a local folder, or a hub id.

    The embedded ``smollm2-135m`` reads the real config of the packaged model when it has been
    converted already (the same config training uses); otherwise its built-in shape.
    """
    from transformers import AutoConfig

    name = str(model)
    folder = Path(name)
    if name.lower() in BUILTIN:
        fields = dict(BUILTIN[name.lower()])
        if name.lower() == "smollm2-135m":
            from ..models import cache_dir

            cached = cache_dir() / "smollm2-135m-instruct" / "config.json"
            if cached.is_file():
                return AutoConfig.from_pretrained(cached.parent)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if folder.is_dir():
        file = folder / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"--model {folder}: the folder has no config.json")
        try:
            json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--model {folder}: config.json is not valid JSON ({e})") from None
        return AutoConfig.from_pretrained(folder)
    if "/" in name and not name.startswith((".", "/")):
        from ..hub import locate

        where = locate(name, tuple(BUILTIN))  # one look-up: no minutes of retries when offline
        try:
            return AutoConfig.from_pretrained(where)
        except OSError as e:
            raise ValueError(
                f"--model {name}: could not read its config from the hub ({e}); give a built-in "
                f"shape ({', '.join(BUILTIN)}) or a local folder with config.json"
            ) from None
    raise ValueError(
        f"--model {name}: not a built-in shape, a folder or a hub id (owner/name). "
        f"Built-ins: {', '.join(BUILTIN)}"
    )

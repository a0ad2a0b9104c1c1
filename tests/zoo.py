"""Tiny random-config models of the families people fine-tune, built offline (no download).

``build(family)`` returns a float32 model in eval mode with a fixed seed. Every decoder has two
layers, hidden 32, 4 query heads / 2 key-value heads (head_dim 8), vocab 128; MoE families have
4 experts, 2 per token. Shapes differ between the two projections of a block where the family
allows it, so a transposed layout cannot pass a test by accident.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 128
DENSE = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "gpt_neox",
    "gpt2",
)
MOE = ("mixtral", "qwen3_moe", "gpt_oss", "qwen2_moe")
ENCODERS = ("bert",)
CAUSAL = DENSE + MOE
FAMILIES = CAUSAL + ENCODERS

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_MOE = {
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 40,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.0,
}
_OVERRIDES: dict[str, dict] = {
    "gpt2": {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
        "vocab_size": VOCAB,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gpt_neox": {"rotary_pct": 0.5},
    "gemma2": {"sliding_window": 16, "query_pre_attn_scalar": 8},
    "gemma3_text": {"sliding_window": 16, "query_pre_attn_scalar": 8},
    "gpt_oss": {"sliding_window": 16, "intermediate_size": 24},
    "bert": {"max_position_embeddings": 64, "num_labels": 3},
}


def config(family: str, **overrides):
    """The tiny config of ``family`` (a transformers ``model_type``)."""
    from transformers import AutoConfig

    fields = dict(_COMMON)
    if family in MOE:
        fields.update(_MOE)
    if family == "gpt2":
        fields = {}
    if family == "bert":
        fields = {k: v for k, v in _COMMON.items() if k not in ("num_key_value_heads", "head_dim")}
    fields.update(_OVERRIDES.get(family, {}))
    fields.update(overrides)
    return AutoConfig.for_model(family, **fields)


def build(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A float32 tiny model of ``family`` in eval mode; bert is a 3-class sequence classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = config(family, **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if family in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32)
    if family in MOE:  # transformers' default (grouped_mm) needs bf16 on CPU; eager is exact
        model.config._experts_implementation = "eager"
    return model.eval()


def batch(seed: int = 1, b: int = 2, s: int = 12) -> dict[str, torch.Tensor]:
    """Token ids and labels (no padding) for any zoo model."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}

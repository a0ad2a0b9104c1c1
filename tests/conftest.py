"""Tiny random-config models shared by the contract tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


class MLP(nn.Module):
    """A plain nn.Module: embedding, two linears, a head."""

    def __init__(self, vocab: int = 64, d: int = 24, hidden: int = 40) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.embed(input_ids))))))


def tiny_llama(hidden_size: int = 32, intermediate_size: int = 48) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(cfg)


# name -> (factory, "all-linear"-style targets that include an embedding, expected linear count)
MODELS = {
    "llama": (tiny_llama, ["embed_tokens", "q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["wte", "c_attn", "c_proj"]),
    "bert": (tiny_bert, ["word_embeddings", "query", "value", "dense"]),
    "mlp": (MLP, ["embed", "fc1", "fc2"]),
}


def build(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0, method: str = "lora"
) -> nn.Module:
    """A tiny model; pruned to 50 % (magnitude) when ``method`` needs a sparse base (LoRS)."""
    import lorakit as lk

    torch.manual_seed(seed)
    model = MODELS[name][0]().to(dtype)
    if lk.LoRAConfig(method=method).capabilities.sparse_base:
        lk.prune(model, "magnitude", 0.5, progress=False)
    return model.eval()


def targets_for(name: str, which: str, method: str = "lora"):
    """ "all-linear", or the model's listed targets ("with-embedding"), without the embedding
    (listed first) for methods that cannot adapt one."""
    if which == "all-linear":
        return "all-linear"
    import lorakit as lk

    listed = MODELS[name][1]
    embedding = "embedding" in lk.LoRAConfig(method=method).capabilities.kinds
    return listed if embedding else listed[1:]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def perturb(model: nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    """Give every adapter non-zero A and B so the adapter actually changes outputs."""
    import lorakit as lk

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.adapted_layers(model):
            for adapter in layer.adapters.values():
                for t in (adapter.lora_A, adapter.lora_B):
                    t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * scale)


@pytest.fixture(params=list(MODELS))
def model_name(request) -> str:
    return request.param


METHODS = ["lora", "lora_fa", "lors"]


@pytest.fixture(params=METHODS)
def method(request) -> str:
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny LLaMA with SmolLM2's tokenizer, saved as an HF folder. Its widths are multiples of
    64, bitsandbytes' block: its AVX-512 CPU kernels scale blocks that straddle rows wrongly."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.models import smollm2_dir

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# Labelled reviews for the tiny training runs (test_train, test_train_length, test_precision, ...).
REVIEWS = [
    ("a wonderful, moving film", 1),
    ("dull and far too long", 0),
    ("the cast is superb and the script sings", 1),
    ("a tedious mess", 0),
    ("funny, warm and smart", 1),
    ("i wanted my two hours back", 0),
    ("beautifully shot and acted", 1),
    ("lifeless and predictable", 0),
] * 4  # 32 examples


@pytest.fixture
def data_file(tmp_path) -> Path:
    """A JSONL file of :data:`REVIEWS` (text + label)."""
    import json

    f = tmp_path / "reviews.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in REVIEWS))
    return f

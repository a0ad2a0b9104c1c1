"""The saved-bytes accounting and its breakdown."""

from __future__ import annotations

import torch
from conftest import build

import lorakit as lk
from lorakit.profile import CATEGORIES, saved_breakdown, training_memory


def test_breakdown_sums_to_total_and_names_parts():
    model = lk.inject(build("llama"), lk.LoRAConfig(rank=4))
    model.train()
    ids = torch.randint(0, 128, (1, 16))
    _, total = lk.count_saved(model, lambda: model(input_ids=ids, labels=ids).loss)
    _, parts = saved_breakdown(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert set(parts) == set(CATEGORIES)
    assert sum(parts.values()) == total
    for cat in ("adapter inputs", "attention", "mlp", "norms", "logits/loss"):
        assert parts[cat] > 0, cat


def test_reduce_removes_logits():
    model = lk.reduce_activation_memory(
        lk.inject(build("llama"), lk.LoRAConfig(method="lora_fa", rank=4))
    )
    ids = torch.randint(0, 128, (1, 16))
    _, parts = saved_breakdown(model, lambda: model(input_ids=ids, labels=ids).loss)
    # The fused loss keeps d(loss)/d(hidden), (tokens - 1) x hidden floats, and the int64 indices
    # of the tokens with a label; nothing of vocabulary size.
    assert parts["logits/loss"] == 15 * 32 * 4 + 15 * 8


def test_params_excluded_and_training_memory():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    _, saved = lk.count_saved(lin, lambda: lin(x).sum())
    assert saved == 4 * 8 * 4  # x only: the weight (saved for dx) is a parameter
    mem = training_memory(lin, saved)
    assert mem["weights"] == mem["grads"] == (64 + 8) * 4
    assert mem["optimizer"] == 2 * mem["grads"]
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")


def test_count_saved_frees_the_graph():
    """A counted forward must not keep its graph alive once dropped (a saved output tied to its
    own grad_fn, or the held tensors, would leak every counted forward's activations)."""
    import gc
    import weakref

    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8)
    refs = []

    def fn():
        y = torch.sigmoid(x @ w)  # sigmoid saves its output
        refs.append(weakref.ref(y))
        return y.sum()

    loss, nbytes = lk.count_saved([], fn)
    assert nbytes == 2 * 4 * 8 * 4  # x (kept by x @ w for the gradient of w) and sigmoid(.)
    del loss  # no backward (memory-only counting): nothing frees the saved tensors but gc
    gc.collect()
    assert refs[0]() is None

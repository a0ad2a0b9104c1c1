"""``--compile``: torch.compile of a model with lorakit's layers and Functions (inductor, CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
import zoo

import lorakit as lk


def _model(method: str, reduce: bool):
    model = zoo.build("llama")
    if method == "lors":
        lk.prune(model, "magnitude", 0.5, progress=False)
    lk.inject(model, lk.LoRAConfig(method=method, rank=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    if reduce:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lk.reduce_activation_memory(model)
    return model.train()


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lors"])
@pytest.mark.parametrize("reduce", [False, True])
def test_no_graph_break_in_an_adapted_decoder_block(method, reduce):
    model = _model(method, reduce)
    layer = model.model.layers[0]
    x = torch.randn(2, 12, 32, requires_grad=True)
    pos = model.model.rotary_emb(x, torch.arange(12)[None].expand(2, -1))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(
        lambda x: layer(x, position_embeddings=pos, attention_mask=None)
    )(x)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_equals_eager():
    batch = zoo.batch()
    eager = _model("lora_fa", reduce=True)
    compiled = _model("lora_fa", reduce=True)
    compiled.compile()
    torch._dynamo.reset()
    losses, grads = [], []
    for model in (eager, compiled):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # compiling in place keeps the module's names: the adapter saves as before
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_compiled_under_checkpointing_and_offload():
    """Saved-tensor hooks (checkpointing, offload) around a compiled reduced model."""
    batch = zoo.batch()
    eager, compiled = _model("lora_fa", reduce=True), _model("lora_fa", reduce=True)
    for model in (eager, compiled):
        lk.memory.enable_checkpointing(model, offload=True)
    compiled.compile()
    torch._dynamo.reset()
    losses = []
    for model in (eager, compiled):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (eager, compiled)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)

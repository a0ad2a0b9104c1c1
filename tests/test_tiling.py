"""Sequence tiling of the MLP (``reduce_activation_memory(mlp_tile=...)``): the same loss and
gradients as the untiled model, and a (tokens x d_ff) working set bounded by the tile."""

from __future__ import annotations

import pytest
import torch
import zoo

import lorakit as lk
from lorakit.planner.tracker import live_peak


def _model(family, method, mlp, tile, dtype=torch.float32):
    model = zoo.build(family, intermediate_size=96).to(dtype)
    lk.inject(model, lk.LoRAConfig(method=method, rank=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    lk.reduce_activation_memory(model, mlp=mlp, mlp_tile=tile)
    return model.train()


def _loss_and_grads(model, batch):
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "family,mlp",
    [
        ("llama", "recompute"),
        ("llama", "elementwise"),
        ("phi3", "recompute"),
        ("gpt2", "recompute"),
    ],
)
@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_tiled_equals_untiled(family, mlp, method):
    batch = zoo.batch(b=2, s=24)
    want_loss, want = _loss_and_grads(_model(family, method, mlp, None, torch.float64), batch)
    got_loss, got = _loss_and_grads(_model(family, method, mlp, 7, torch.float64), batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_tile_bounds_the_working_set():
    batch = zoo.batch(b=1, s=64)

    def peak(tile):
        model = zoo.build("llama", intermediate_size=1024, hidden_size=32)
        lk.inject(model, lk.LoRAConfig(method="lora_fa", rank=4, targets="all-linear"))
        lk.reduce_activation_memory(model, mlp_tile=tile)
        model.train()
        held = [*model.parameters(), *model.buffers()]
        return live_peak(lambda: model(**batch).loss.backward(), held)

    untiled, tiled = peak(None), peak(8)
    # gate, up and act(gate)·up of 64 tokens x 1024 in fp32 are 768 KiB; tiles of 8 cut that 8x
    assert untiled - tiled >= 3 * (64 - 8) * 1024 * 4 * 0.9


def test_tile_must_be_a_positive_int():
    with pytest.raises(ValueError, match="mlp_tile must be a positive int"):
        lk.reduce_activation_memory(zoo.build("llama"), mlp_tile=0)


def test_train_config_tile_needs_reduce_memory():
    from lorakit.config import TrainConfig

    with pytest.raises(ValueError, match=r"mlp_tile needs reduce_memory on"):
        TrainConfig.from_flat({"mlp_tile": 512})
    assert TrainConfig.from_flat({"mlp_tile": 512, "reduce_memory": True}).mlp_tile == 512


def test_plan_models_the_tile(tmp_path):
    from lorakit.planner import plan

    # a wide MLP and a tiny vocabulary: the MLP's working set is the step's largest transient
    zoo.config("llama", hidden_size=64, intermediate_size=2048).save_pretrained(tmp_path)
    flat = {"model": str(tmp_path), "method": "lora_fa", "batch_size": 1, "max_len": 2048}
    flat |= {"reduce_memory": True, "target": "cpu"}
    untiled, tiled = plan(**flat), plan(**flat, mlp_tile=64)
    assert tiled.activations == untiled.activations  # tiling saves nothing more or less
    assert tiled.peak < untiled.peak


def test_loss_chunk_follows_the_vocabulary():
    from lorakit.memory import loss_chunk

    assert [loss_chunk(v) for v in (128, 49152, 65536, 128256, 262208)] == [
        1024,
        1024,
        1024,
        512,
        128,
    ]
    model = lk.reduce_activation_memory(zoo.build("llama"))
    assert model._lorakit_chunk == 1024

"""Offloaded activation checkpoints (``--offload``): exact, and the bytes move where they should."""

from __future__ import annotations

import pytest
import torch
import zoo

import lorakit as lk
from lorakit.config import TrainConfig
from lorakit.distributed import SINGLE
from lorakit.offload import watch
from lorakit.planner import plan
from lorakit.tasks import batch_loss, collate
from lorakit.train import _adapt

B, S = 2, 16


def _cfg(tmp_path, method="lora_fa", reduce=False, offload=True) -> TrainConfig:
    zoo.build("llama").save_pretrained(tmp_path)
    flat = {"model": str(tmp_path), "method": method, "batch_size": B, "max_len": S, "rank": 4}
    flat |= {"reduce_memory": reduce, "checkpointing": True, "offload": offload}
    return TrainConfig.from_flat(flat)


def _run(cfg: TrainConfig):
    """(loss, adapter gradients, device bytes saved, host bytes offloaded) of one step."""
    model = zoo.build("llama")
    _adapt(model, cfg, "lm", SINGLE)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    model.train()
    ids = torch.randint(3, zoo.VOCAB, (B, S), generator=torch.Generator().manual_seed(0))
    batch = collate([{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids], 0)
    host: list[int] = []
    with watch(lambda t: host.append(t.untyped_storage().nbytes())):
        loss, saved = lk.count_saved(model, lambda: batch_loss(model, batch))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return loss.detach(), grads, saved, sum(host)


@pytest.mark.parametrize("method", ["lora", "lora_fa"])
@pytest.mark.parametrize("reduce", [False, True])
def test_same_loss_and_gradients_block_inputs_on_the_host(method, reduce, tmp_path):
    on = _run(_cfg(tmp_path, method, reduce, offload=True))
    off = _run(_cfg(tmp_path, method, reduce, offload=False))
    assert torch.equal(on[0], off[0])
    for a, b in zip(on[1], off[1], strict=True):
        assert torch.equal(a, b)
    inputs = 2 * B * S * 32 * 4  # two layers' inputs, fp32, hidden 32
    assert off[2] - on[2] == inputs  # gone from what backward keeps on the device...
    assert on[3] == inputs and off[3] == 0  # ...and held on the host instead


def test_plan_counts_device_and_host_bytes(tmp_path):
    cfg = _cfg(tmp_path, "lora_fa", reduce=True)
    planned = plan(cfg, target="cpu")
    _, _, saved, host = _run(cfg)
    assert planned.activations == saved
    assert planned.host == host > 0
    assert "host memory (offloaded, pinned)" in planned.table()
    without = plan(_cfg(tmp_path, "lora_fa", reduce=True, offload=False), target="cpu")
    assert without.host == 0 and without.activations - planned.activations == host


def test_offload_needs_checkpointing():
    with pytest.raises(ValueError, match="offload.*checkpointing"):
        TrainConfig.from_flat({"offload": True})
    with pytest.raises(ValueError, match="offload.*checkpointing"):
        lk.reduce_activation_memory(zoo.build("llama"), offload=True)


@pytest.mark.parametrize("tile", [None, 8])
def test_planned_step_equals_the_same_accounting_on_real_tensors(tmp_path, tile):
    """The planner's step (device peak, host bytes) against its own storage accounting run on
    real tensors: the tiny LLaMA with LoRA-FA + reduce + checkpointing + offload (+ MLP tile)."""
    from lorakit.checkpoint import trainable_parameters
    from lorakit.planner.core import _batch, _measure

    cfg = _cfg(tmp_path, "lora_fa", reduce=True)
    if tile:
        cfg = TrainConfig.from_flat({**cfg.to_flat(), "mlp_tile": tile})
    planned = plan(cfg, target="cpu")
    model = zoo.build("llama")
    _adapt(model, cfg, "lm", SINGLE)
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, foreach=False)
    peak, _, totals = _measure(model, optimizer, params, _batch(B, S), 1, 1, False, False)
    assert peak == planned.phases["train_step"]
    assert totals["host"] == planned.host > 0

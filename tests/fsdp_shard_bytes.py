"""Run under torchrun (gloo, CPU): what one FSDP2 rank actually holds, as JSON on rank 0.

torchrun --nproc-per-node 2 tests/fsdp_shard_bytes.py '<flat TrainConfig keys as JSON>'
"""

from __future__ import annotations

import json
import sys

import torch

from lorakit import distributed as dist
from lorakit.config import DTYPES, TrainConfig
from lorakit.models import load_model
from lorakit.tasks import batch_loss
from lorakit.train import _adapt


def local_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = getattr(t, "_local_tensor", t)
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def main() -> None:
    cfg = TrainConfig.from_flat(json.loads(sys.argv[1]))
    ctx = dist.setup()
    model, _ = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
    _adapt(model, cfg, "lm", ctx)
    model = dist.wrap(model, "fsdp", ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    ids = torch.randint(0, 100, (cfg.batch_size // ctx.world, cfg.max_len))
    batch_loss(model, {"input_ids": ids, "labels": ids.clone()}).backward()
    grads = local_bytes([p.grad for p in params])
    opt.step()
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    out = {
        "weights": local_bytes(frozen),
        "trainable": local_bytes(params),
        "gradients": grads,
        "optimizer": local_bytes(states),
    }
    if ctx.is_main:
        print(json.dumps(out))
    dist.teardown(ctx)


if __name__ == "__main__":
    main()

"""Evaluation helpers: last-token logits with a shared-prefix KV cache equal the plain forward."""

from __future__ import annotations

import pytest
import torch
from conftest import build

from lorakit.evaluate import last_token_logits, token_losses


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prefix_cache_matches_full_forward(name):
    model = build(name)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(1, 128, (9,), generator=g).tolist()
    seqs = [prefix + torch.randint(1, 128, (n,), generator=g).tolist() for n in (1, 5, 3, 8, 2)]
    got = last_token_logits(model, seqs, pad_id=0, batch_size=2)
    with torch.no_grad():
        want = torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1] for s in seqs])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_token_losses_keep_only_label_positions():
    model = build("llama")
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    mask = torch.ones_like(ids)
    loss, n = token_losses(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    with torch.no_grad():
        full = model(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), reduction="sum"
    )
    assert n == 4
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)

"""Integration tests on the real SmolLM2-135M (converted once from the packaged GGUF, cached)."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def smollm2():
    from lorakit.models import load_model

    model, tok = load_model("smollm2-135m")
    return model.eval(), tok


def test_peft_interop_on_real_model(smollm2, tmp_path):
    import copy

    base, tok = smollm2
    ids = tok("The film was a delight from start to finish.", return_tensors="pt")["input_ids"]
    model = lk.inject(
        copy.deepcopy(base),
        lk.LoRAConfig(rank=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for _, layer in lk.adapted_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.01)
    ours = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, rtol=0, atol=1e-4)
    merged = lk.merge(model)
    torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=0, atol=1e-4)


def test_saved_activations_real_model_bf16(smollm2):
    """LoRA-FA keeps less than LoRA, and reduce_activation_memory less again, same loss."""
    import copy

    base, _ = smollm2
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    saved, losses = {}, {}
    for name, method, reduce in [
        ("lora", "lora", False),
        ("lora_fa", "lora_fa", False),
        ("lora_fa+reduce", "lora_fa", True),
    ]:
        m = lk.inject(
            copy.deepcopy(base).bfloat16(), lk.LoRAConfig(method=method, rank=16, alpha=32)
        )
        if reduce:
            lk.reduce_activation_memory(m)
        m.train()
        loss, saved[name] = lk.count_saved(m, lambda m=m: m(input_ids=ids, labels=ids).loss)
        losses[name] = float(loss)
    assert saved["lora_fa+reduce"] < saved["lora_fa"] < saved["lora"]
    assert abs(losses["lora_fa+reduce"] - losses["lora_fa"]) < 0.05

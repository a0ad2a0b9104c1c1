"""The library route for TRL users: a lorakit-injected model trains under TRL's SFTTrainer as a
plain model. Runs where TRL is installed (requirements-bench.txt); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk

trl = pytest.importorskip("trl")


def test_sft_trainer_trains_a_lora_fa_model(tiny, tmp_path):
    from datasets import Dataset

    from lorakit.models import load_model

    model, tok = load_model(tiny)
    lk.inject(model, lk.LoRAConfig(method="lora_fa", rank=4))
    layers = dict(lk.adapted_layers(model))
    layer = layers["model.layers.0.self_attn.q_proj"].adapters["default"]
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    chat = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"messages": chat}] * 4),
        processing_class=tok,
    )
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert torch.equal(layer.lora_A, a0)  # LoRA-FA: A frozen
    assert not torch.equal(layer.lora_B, b0)  # B trained

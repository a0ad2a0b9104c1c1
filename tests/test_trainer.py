"""An injected model trains inside transformers.Trainer and its adapter is saved in our format."""

from __future__ import annotations

import torch
from conftest import build, logits

import lorakit as lk
from lorakit.integrations import save_adapter_callback


def test_trainer_trains_injected_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lk.inject(build("llama"), lk.LoRAConfig(rank=4, alpha=8))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 12), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, save_steps=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, callbacks=[save_adapter_callback()]
    )
    trainer.train()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in before.items() if n.endswith("lora_B"))
    for step in (2, 4):
        assert (
            tmp_path / "out" / f"checkpoint-{step}" / "adapter" / "adapter_model.safetensors"
        ).exists()
    lk.save_adapter(model, tmp_path / "final")
    loaded = lk.load_adapter(build("llama"), tmp_path / "final")
    model.eval()
    ids = torch.randint(0, 128, (2, 8), generator=g)
    assert torch.equal(logits(loaded, ids), logits(model, ids))

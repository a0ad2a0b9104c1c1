"""The library route for TRL users: a lorakit-injected model trains under TRL's SFTTrainer as a
plain model, and lk.integrations.SFTTrainer checkpoints the adapter only and resumes from it.
trl is a test dependency (requirements.txt): these tests run in ``make test``, never skipped."""

from __future__ import annotations

from pathlib import Path

import torch
import trl
from trainer_checks import check_adapter_only, losses, stop_at

import lorakit as lk
import lorakit.integrations


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


CHATS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [("Name a colour.", "Blue."), ("Two plus two?", "Four."), ("Say hi.", "Hi!")] * 4
]


def test_sft_trainer_checkpoints_hold_the_adapter_and_resume(tiny, tmp_path):
    from datasets import Dataset

    from lorakit.models import load_model

    def run(out: Path, resume: str | None = None, callbacks=()):
        model, tok = load_model(tiny)
        torch.manual_seed(0)  # the same adapter init in every run
        lk.inject(model, lk.LoRAConfig(rank=4))
        args = trl.SFTConfig(
            output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2,
            learning_rate=1e-2, report_to=[], use_cpu=True, gradient_checkpointing=False,
            disable_tqdm=True, logging_steps=1, seed=0,
        )  # fmt: skip
        trainer = lorakit.integrations.SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([{"messages": c} for c in CHATS]),
            processing_class=tok,
            callbacks=list(callbacks),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    full, full_model = run(tmp_path / "full")
    for step in (2, 4):
        check_adapter_only(tmp_path / "full" / f"checkpoint-{step}")
    run(tmp_path / "cut", callbacks=[stop_at(2)])
    resumed, resumed_model = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    want, got = losses(full), losses(resumed)  # steps 1-2 from the checkpoint's trainer_state
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    trained = dict(full_model.named_parameters())
    for n, p in resumed_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[n], rtol=0, atol=1e-6)

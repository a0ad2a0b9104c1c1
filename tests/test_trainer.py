"""An injected model trains inside transformers.Trainer; lk.integrations.Trainer's checkpoints
hold the adapter only (PEFT's files) and resume to the uninterrupted run's losses."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import build, logits
from safetensors.torch import load_file
from trainer_checks import check_adapter_only, losses, stop_at

import lorakit as lk
import lorakit.integrations
from lorakit.integrations import save_adapter_callback


def _rows() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 12), generator=g)
    ]


def test_trainer_trains_injected_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lk.inject(build("llama"), lk.LoRAConfig(rank=4, alpha=8))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, save_steps=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=_rows(), callbacks=[save_adapter_callback()]
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
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_trainer_checkpoints_hold_the_adapter_and_resume(tmp_path):
    from transformers import TrainingArguments

    def run(out: Path, resume: str | None = None, callbacks=()):
        model = lk.inject(build("llama"), lk.LoRAConfig(rank=4, alpha=8))
        model.train()
        args = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=4, max_steps=6, save_steps=2,
            learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, seed=0,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = lorakit.integrations.Trainer(
            model=model, args=args, train_dataset=_rows(), callbacks=list(callbacks)
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    full, full_model = run(tmp_path / "full")
    for step in (2, 4, 6):
        check_adapter_only(tmp_path / "full" / f"checkpoint-{step}")
    run(tmp_path / "cut", callbacks=[stop_at(2)])
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed, resumed_model = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    want, got = losses(full), losses(resumed)  # steps 1-2 from the checkpoint's trainer_state
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    trained = dict(full_model.named_parameters())
    for n, p in resumed_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[n], rtol=0, atol=1e-6)
    # The checkpoint is an adapter lorakit's loader (and PEFT's) reads.
    loaded = lk.load_adapter(build("llama"), tmp_path / "full" / "checkpoint-6")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    full_model.eval()
    torch.testing.assert_close(logits(loaded, ids), logits(full_model, ids), rtol=0, atol=1e-6)


def test_trainer_loads_the_best_adapter_at_end(tmp_path):
    from transformers import TrainingArguments

    from lorakit.adapters import adapter_payload

    model = lk.inject(build("llama"), lk.LoRAConfig(rank=4, alpha=8))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, save_steps=2,
        eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, learning_rate=5e-2,
        report_to=[], use_cpu=True, disable_tqdm=True,
        greater_is_better=True,  # "best" = the highest loss: an early checkpoint, not the last
    )  # fmt: skip
    rows = _rows()
    trainer = lorakit.integrations.Trainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows[:4]
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-6"
    check_adapter_only(best)
    saved = load_file(best / "adapter_model.safetensors")
    now = adapter_payload(model)[0]
    assert saved.keys() == now.keys()
    assert all(torch.equal(saved[k], now[k]) for k in saved)
    assert trainer.evaluate()["eval_loss"] == trainer.state.best_metric

"""Using lorakit inside Hugging Face ``transformers.Trainer``.

An injected model is an ordinary ``nn.Module`` with only the adapter trainable, so Trainer trains
it as is. Trainer's own checkpoints hold the whole model; add :func:`save_adapter_callback` to also
write each checkpoint's adapter in PEFT's format::

    model = lk.inject(model, lk.LoRAConfig(rank=16, alpha=32))
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[lk.integrations.save_adapter_callback()])
    trainer.train()                      # <output_dir>/checkpoint-N/adapter/ after each save
    lk.save_adapter(model, "out/adapter")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import save_adapter

if TYPE_CHECKING:
    from transformers import TrainerCallback


def save_adapter_callback(name: str | None = None) -> TrainerCallback:
    """A ``TrainerCallback`` writing ``checkpoint-<step>/adapter`` whenever Trainer saves."""
    from transformers import TrainerCallback

    class SaveAdapterCallback(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "adapter"
                save_adapter(model, folder, name)
            return control

    return SaveAdapterCallback()

"""Using lorakit inside Hugging Face ``transformers.Trainer`` (and TRL's trainers).

An injected model is an ordinary ``nn.Module`` with only the adapter trainable, so any Trainer
trains it as is. What a plain Trainer does not know is that only the adapter changes: it saves
the whole model into every ``checkpoint-N/`` (16 GB per checkpoint for an 8B model), where a
PEFT model in the same Trainer saves the adapter alone. :class:`Trainer`, ``SFTTrainer`` (TRL's,
built on first use) and :func:`adapter_checkpoints` (for any Trainer subclass) save and resume
the way PEFT models do::

    model = lk.inject(model, lk.LoRAConfig(rank=16, alpha=32))
    trainer = lk.integrations.Trainer(model=model, args=args, train_dataset=ds)
    trainer.train()                          # checkpoint-N/: adapter_model.safetensors,
                                             # adapter_config.json, optimizer, scheduler, state
    trainer.train(resume_from_checkpoint=True)   # loads the adapter back, in place
    lk.integrations.SFTTrainer(model=model, args=sft_args, ...)   # the same for TRL
    lk.integrations.adapter_checkpoints(trl.DPOTrainer)          # any other Trainer class

Why a subclass: Trainer writes the model in ``_save`` (every checkpoint and ``save_model()``)
and reads it back in ``_load_from_checkpoint`` / ``_load_best_model``; both branch on
``isinstance(model, PeftModel)`` and nothing else. A callback runs only after the full model is
written and cannot make a resume read adapter files; patching the model's ``save_pretrained``
would change the user's model object and still not load. So the subclass overrides those
three methods, for a model holding a lorakit adapter only (anything else, and DeepSpeed / FSDP,
whose sharded states Trainer gathers itself, keeps Trainer's own behaviour). The files are the
ones :func:`lorakit.save_adapter` writes: PEFT loads them.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import transformers

from . import moe_format
from .adapters import copy_adapter_weights, save_adapter
from .inject import active_adapter
from .peft_format import WEIGHTS_NAME, read_adapter

if TYPE_CHECKING:
    from torch import nn
    from transformers import TrainerCallback

__all__ = ["Trainer", "adapter_checkpoints", "restore_adapter", "save_adapter_callback"]

T = TypeVar("T", bound=type)


def restore_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy a saved adapter's weights (and modules_to_save) into ``model``'s active adapter, in
    place: the parameters, and so an optimizer holding them, stay the same objects."""
    file = read_adapter(folder)
    moe_format.resolve(model, file)
    copy_adapter_weights(model, file.weights, active_adapter(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, t in file.saved_params.items():
            params[key].copy_(t)


def adapter_checkpoints(trainer_class: T) -> T:
    """A subclass of ``trainer_class`` (``transformers.Trainer`` or a subclass of it) whose
    checkpoints and ``save_model()`` hold the adapter only, in PEFT's format, and which resumes
    from them (``train(resume_from_checkpoint=...)``) and loads them for
    ``load_best_model_at_end``.
    """

    class AdapterCheckpoints(trainer_class):
        def _adapted(self) -> nn.Module | None:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                return None
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            return model if active_adapter(model) is not None else None

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            model = self._adapted()
            if model is None:
                return super()._save(output_dir, state_dict)
            if not self.args.should_save:
                return None
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            save_adapter(model, output_dir)
            tokenizer = self.processing_class
            if tokenizer is None:
                tokenizer = getattr(self.data_collator, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            return None

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            adapted = self._adapted()
            if adapted is None or not (Path(resume_from_checkpoint) / WEIGHTS_NAME).is_file():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            restore_adapter(adapted, resume_from_checkpoint)
            return None

        def _load_best_model(self) -> None:
            adapted, best = self._adapted(), self.state.best_model_checkpoint
            if adapted is None or not (Path(best) / WEIGHTS_NAME).is_file():
                return super()._load_best_model()
            restore_adapter(adapted, best)
            return None

    AdapterCheckpoints.__name__ = AdapterCheckpoints.__qualname__ = trainer_class.__name__
    AdapterCheckpoints.__module__ = __name__
    AdapterCheckpoints.__doc__ = (
        f"``{trainer_class.__module__}.{trainer_class.__name__}`` saving and resuming the "
        "lorakit adapter only (see :func:`lorakit.integrations.adapter_checkpoints`)."
    )
    return AdapterCheckpoints


Trainer = adapter_checkpoints(transformers.Trainer)


@cache
def _sft_trainer() -> type:
    try:
        from trl import SFTTrainer
    except ImportError as e:
        raise ImportError(
            "lorakit.integrations.SFTTrainer wraps TRL's SFTTrainer, and trl is not installed; "
            "pip install trl (requirements-bench.txt pins the tested version)"
        ) from e
    return adapter_checkpoints(SFTTrainer)


def __getattr__(name: str) -> Any:
    # SFTTrainer is built on first use: importing this module does not import TRL.
    if name == "SFTTrainer":
        return _sft_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_adapter_callback(name: str | None = None) -> TrainerCallback:
    """A ``TrainerCallback`` writing ``checkpoint-<step>/adapter`` whenever Trainer saves.

    For a plain ``transformers.Trainer``, whose checkpoints still hold the whole model; prefer
    :class:`Trainer`, whose checkpoints are the adapter (and resume).
    """
    from transformers import TrainerCallback

    class SaveAdapterCallback(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "adapter"
                save_adapter(model, folder, name)
            return control

    return SaveAdapterCallback()

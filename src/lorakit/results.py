"""What a finished training run writes beside its checkpoint: the trained adapter (or the whole
model, for full fine-tuning) and ``task.json``, the run's input encoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .distributed import Context


def save_result(
    model, tokenizer, cfg: TrainConfig, out: Path, ctx: Context, spec: dict[str, Any]
) -> None:
    """The trained adapter (or full model) under ``out``, with the run's input encoding
    (``spec``: task, classes, chat template) in the adapter's metadata (``lorakit_task``, which
    ``lorakit eval`` and ``generate`` read; PEFT ignores it) and in ``out/task.json``; gathered
    on every rank, written once, every file with a plainly created file's mode."""
    from .adapters import adapter_payload, write_adapter
    from .distributed import full
    from .fileio import atomic_write, save_pretrained

    text = json.dumps(spec, indent=2)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "task.json", lambda f: Path(f).write_text(text))
    if cfg.method != "full":
        tensors, config, metadata = adapter_payload(model)
        metadata = {**metadata, "lorakit_task": json.dumps(spec)}
        if ctx.is_main:
            write_adapter(out / "adapter", (tensors, config, metadata))
        return
    state = None
    if ctx.enabled:  # FSDP shards: gather each tensor whole into a state dict first
        state = {k: full(v).cpu() for k, v in model.state_dict().items()}
    if ctx.is_main:
        save_pretrained(out / "model", model, tokenizer, state_dict=state)

"""A run's numerics: float16 training with a loss scaler, and the attention kernel it loads.

float16 keeps 5 exponent bits: gradients below about 6e-8 flush to zero and activations above
65504 overflow. For GPUs without bfloat16 (T4, V100) a float16 run multiplies the loss by a
scale before backward and divides the gradients by it before clipping (``torch.amp.GradScaler``,
on CPU as on CUDA): a step whose gradients overflowed is skipped and the scale halved, and the
scale doubles after 2000 steps without overflow. As with bfloat16, only the frozen base and the
activations are 16-bit: the adapter's master weights, gradients and AdamW states are fp32
(:meth:`lorakit.LoRAConfig.dtype_for`), which the scaler needs (it cannot unscale fp16
gradients). The scaler's state is saved in every checkpoint and restored on resume.
"""

from __future__ import annotations

import typing
import warnings
from typing import Any, Literal

import torch

# What ``from_pretrained(attn_implementation=...)`` accepts; auto: the model's own default.
Attention = Literal[
    "auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"
]
ATTENTION: tuple[str, ...] = typing.get_args(Attention)


def check_precision(cfg: Any) -> None:
    """Refuse, by name, what a :class:`lorakit.config.TrainConfig`'s ``dtype`` and
    ``attn_implementation`` cannot do together with the rest of it."""
    if cfg.attn_implementation not in ATTENTION:
        raise ValueError(
            f"attn_implementation must be one of {list(ATTENTION)}, got {cfg.attn_implementation!r}"
        )
    if cfg.dtype != "float16":
        return
    if cfg.adapter is None:
        raise ValueError(
            "dtype float16 trains with a loss scaler, which needs fp32 master weights; full "
            "fine-tuning would train the float16 weights themselves. Use an adapter method "
            "(lora, lora_fa, lors), or dtype bfloat16 / float32 for method full"
        )
    if cfg.adapter.adapter_dtype == "float16":
        raise ValueError(
            "dtype float16 trains with a loss scaler, which needs fp32 master weights; got "
            "adapter_dtype='float16'. Leave adapter_dtype unset (fp32 on a 16-bit base) or "
            "give float32"
        )
    if cfg.strategy == "fsdp":
        raise ValueError(
            "dtype float16 with strategy fsdp: its sharded gradients would need a sharded loss "
            "scaler; use strategy ddp, or dtype bfloat16 with fsdp"
        )


def no_scaler() -> torch.amp.GradScaler:
    """A disabled scaler: scale, unscale, step and update pass straight through."""
    return torch.amp.GradScaler("cpu", enabled=False)


def loss_scaler(
    cfg: Any, params: list[torch.nn.Parameter], meta: dict[str, Any] | None = None
) -> torch.amp.GradScaler:
    """The run's loss scaler: enabled for ``dtype`` float16 (restored from a checkpoint's
    ``meta``), a pass-through otherwise.

    Raises:
        ValueError: a float16 run trains float16 parameters (a full-trained module such as a
            classification head, or ``modules_to_save``), which the scaler cannot unscale.
    """
    if cfg.dtype != "float16":
        return no_scaler()
    half = [p for p in params if p.dtype == torch.float16]
    if half:
        raise ValueError(
            f"dtype float16 trains with a loss scaler, which needs fp32 master weights, but "
            f"{len(half)} trainable tensors are float16 (modules trained fully: "
            f"modules_to_save, a seq-cls head); use dtype bfloat16 or float32 for this run"
        )
    device = params[0].device.type if params else "cpu"
    scaler = torch.amp.GradScaler(device)
    if meta is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    # A step the scaler skips (its gradients overflowed) still advances the schedule, as in
    # transformers' Trainer; torch warns about that once when it happens on the first step.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
    return scaler

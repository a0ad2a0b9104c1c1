"""``lorakit.train(...)``: a training run from Python, configured exactly as ``lorakit train``.

The package exports this function as ``lorakit.train`` (the module of the loop itself stays
importable as ``from lorakit.train import setup, train_step, ...``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .config import TrainConfig
from .flags import read_config_file
from .train import train as _train


def train(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    /,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune as ``lorakit train`` does, with the same configuration and the same outputs.

    Args:
        config: a :class:`~lorakit.config.TrainConfig`, a run file (YAML, JSON or TOML, as
            ``--config``), a flat mapping of the same keys, or None for the defaults.
        resume: continue from the checkpoint in the output folder (``--resume``).
        overwrite: start afresh even if the output folder holds a checkpoint (``--overwrite``).
        **options: keys of the flat mapping (the flags' names with ``_``: ``model``, ``data``,
            ``method``, ``rank``, ``max_steps``, ``output``, ...), over ``config``'s; values as
            the CLI reads them (``lr="4e-3"`` is ``lr=0.004``).

    Returns:
        The run's summary, also written to ``<output>/summary.json``: ``method``, ``steps``,
        ``trainable_params``, ``time_s``, ``final_loss``, the ``val_*`` metrics, ``output``.
        The adapter is in ``<output>/adapter`` (:func:`lorakit.load_adapter`).

    Example:
        ``lk.train(model="smollm2-135m", data="rotten-tomatoes", method="lora_fa",
        max_steps=10, output="runs/fa")``

    Raises:
        ValueError: an unknown key or a bad value, named with what is allowed.
        TypeError: ``config`` is none of the above.
    """
    if isinstance(config, TrainConfig) and not options:
        cfg = config
    else:
        if isinstance(config, TrainConfig):
            flat = config.to_flat()
        elif isinstance(config, (str, os.PathLike)):
            flat = read_config_file(config)
        elif isinstance(config, Mapping) or config is None:
            flat = dict(config or {})
        else:
            raise TypeError(
                "config must be a TrainConfig, a run file's path, a mapping or None, got "
                f"{type(config).__name__}"
            )
        cfg = TrainConfig.from_flat({**flat, **options})
    if cfg.fit:  # as lorakit train: plan first, take the cheapest setting that fits
        from .planner.choose import fit_run

        cfg = fit_run(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    return _train(cfg, resume=resume, overwrite=overwrite)["summary"]

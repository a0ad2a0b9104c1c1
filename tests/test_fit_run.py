"""``lorakit train --fit``: the cheapest setting that fits, chosen by planning first."""

from __future__ import annotations

import dataclasses

import pytest
import zoo

from lorakit.config import TrainConfig
from lorakit.planner import plan
from lorakit.planner.choose import candidates, choose
from lorakit.planner.fit import MARGIN


@pytest.fixture
def cfg(tmp_path) -> TrainConfig:
    zoo.build("llama", intermediate_size=512).save_pretrained(tmp_path)
    flat = {"model": str(tmp_path), "method": "lora", "batch_size": 4, "max_len": 256}
    return TrainConfig.from_flat(flat)


def test_candidates_go_from_free_to_costly(cfg):
    order = [
        (why, c.micro_batch_size, c.reduce_memory, c.checkpointing) for why, c in candidates(cfg)
    ]
    assert order[0] == ("as asked", 4, False, False)
    assert order[1:4] == [("reduce_memory", m, True, False) for m in (4, 2, 1)]
    last = list(candidates(cfg))[-1][1]
    assert (last.micro_batch_size, last.mlp_tile, last.offload) == (1, 1024, True)
    # an option the user turned on stays on in every candidate
    on = dataclasses.replace(cfg, reduce_memory=True)
    assert all(c.reduce_memory for _, c in candidates(on))


def test_choose_takes_the_first_that_fits(cfg):
    asked = plan(cfg, target="cpu").peak
    reduced = plan(dataclasses.replace(cfg, reduce_memory=True), target="cpu").peak
    assert reduced < asked
    budget = int(reduced / (1 - MARGIN)) + 1  # reduce fits, the run as asked does not
    lines = []
    chosen, p = choose(cfg, budget, target="cpu", report=lines.append)
    assert (chosen.reduce_memory, chosen.micro_batch_size, chosen.checkpointing) == (True, 4, False)
    assert p.peak == reduced and len(lines) == 2 and lines[-1].endswith("-> fits")
    # plenty of room: nothing changes
    same, _ = choose(cfg, asked * 2, target="cpu", report=lines.append)
    assert same == dataclasses.replace(cfg, micro_batch_size=4)


def test_nothing_fits_says_what_would(cfg):
    with pytest.raises(ValueError, match=r"nothing fits.*a 4-bit base.*LoRA-FA.*shorter rows"):
        choose(cfg, "1MiB", target="cpu", report=lambda _: None)

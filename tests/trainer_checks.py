"""Checks shared by the Trainer and TRL tests: what an adapter-only checkpoint holds, the
losses a Trainer logged, a run cut short after a step."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open


def safetensors_keys(folder: Path) -> dict[str, list[str]]:
    """File name -> tensor names, for every .safetensors file in ``folder`` (recursively)."""
    found = {}
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(f, "pt") as st:
            found[str(f.relative_to(folder))] = list(st.keys())
    return found


def check_adapter_only(checkpoint: Path) -> None:
    """PEFT's checkpoint files and Trainer's state; no tensor but the adapter's anywhere."""
    names = {f.name for f in checkpoint.iterdir()}
    expected = {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"}
    assert expected | {"trainer_state.json", "training_args.bin"} <= names, names
    assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}, names
    keys = safetensors_keys(checkpoint)
    assert list(keys) == ["adapter_model.safetensors"], keys
    assert all(".lora_A." in k or ".lora_B." in k for k in keys["adapter_model.safetensors"])
    adapter = (checkpoint / "adapter_model.safetensors").stat().st_size
    total = sum(f.stat().st_size for f in checkpoint.rglob("*.safetensors"))
    assert total < 2 * adapter


def losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def stop_at(step: int):
    """A callback ending training after ``step`` (a run killed there, its checkpoint written)."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= step
            return control

    return Stop()

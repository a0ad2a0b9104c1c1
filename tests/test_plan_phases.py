"""lorakit plan's phases (gradient-SVD init, training step, validation) against real tensors.

Each phase's planned peak is compared with the same phase run on real tensors, measured by the
planner's own storage accounting (``lorakit.planner.tracker.live_peak``): deterministic and the
same on any CPU, unlike resident memory (bench/plan_validate.py compares that). Two checks:

- the operations the planner runs, on real tensors: equal, byte for byte, on a tiny LLaMA and on
  the real SmolLM2-135M;
- lorakit's own run code (``train._gradient_svd_init``, ``train_step``, ``tasks.evaluate``):
  it holds what is planned, plus in validation the token ids of its share of the validation set
  beyond the batch it runs (the planner knows no data set) and a few scalars.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.config import DTYPES, TrainConfig
from lorakit.distributed import SINGLE
from lorakit.evaluate import token_losses
from lorakit.gradient_init import gradient_svd_init
from lorakit.models import load_model
from lorakit.planner import plan
from lorakit.planner.tracker import live_peak
from lorakit.tasks import batch_loss
from lorakit.train import _adapt

SCALARS = 64  # bytes: losses, norms and counts as 0-d tensors, held by the run code


def _real(cfg: TrainConfig, model=None):
    """The model of ``cfg`` on real tensors, set up as training sets it up."""
    if model is None:
        model, _ = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
    if cfg.method == "lors":
        lk.prune(model, "magnitude", 0.5, progress=False)
    _adapt(model, cfg, "lm", SINGLE)
    return model.train()


def _state(model, optimizer=None) -> list[torch.Tensor]:
    """What lives across phases: weights, buffers, trainable parameters, optimizer states."""
    found = [*model.parameters(), *model.buffers()]
    for s in optimizer.state.values() if optimizer is not None else ():
        found += [t for t in s.values() if torch.is_tensor(t)]
    return found


def _rows(n: int, seq: int) -> dict[str, torch.Tensor]:
    """What ``collate`` makes of ``n`` unpadded rows of ``seq`` tokens."""
    ids = torch.randint(0, 100, (n, seq), generator=torch.Generator().manual_seed(n))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _step(model, optimizer, params, batch) -> None:
    """``train.train_step``'s tensor work on one micro-batch, single process."""
    count = batch["labels"][:, 1:].numel()
    loss = batch_loss(model, batch)
    (loss * 1 / count).backward()
    loss.detach().item()
    torch.nn.utils.clip_grad_norm_(params, math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _init_batches(cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """All of gradient-SVD init's micro-batches (the planner runs the first two)."""
    micro = cfg.micro_batch_size or cfg.batch_size
    n = cfg.init_samples
    return [_rows(min(micro, n - i), cfg.max_len) for i in range(0, n, micro)]


def _real_phases(cfg: TrainConfig, model) -> dict[str, int]:
    """Each phase's live-storage peak on real tensors, in run order."""
    found = {}
    if cfg.adapter is not None and cfg.adapter.init == "gradient_svd":
        batches, n = _init_batches(cfg), cfg.init_samples * (cfg.max_len - 1)
        found["gradient_svd_init"] = live_peak(
            lambda: gradient_svd_init(model, lambda m, b: batch_loss(m, b) / n, batches),
            _state(model) + [t for b in batches for t in b.values()],
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = _rows(cfg.micro_batch_size or cfg.batch_size, cfg.max_len)
    _step(model, optimizer, params, batch)  # the optimizer states exist from here on
    state = _state(model, optimizer) + list(batch.values())
    found["train_step"] = live_peak(lambda: _step(model, optimizer, params, batch), state)
    model.eval()
    with torch.no_grad():
        found["validation"] = live_peak(lambda: token_losses(model, batch), state)
    model.train()
    return found


GRADIENT_SVD = {"init": "gradient_svd", "rank": 4}  # q = 4r = 16: a quick svd_lowrank
TINY = [
    {"method": "lora", "init_samples": 3, **GRADIENT_SVD},
    {"method": "lora", "dtype": "bfloat16", "checkpointing": True},
    {"method": "lora_fa", "reduce_memory": True},
    {"method": "lors", "init_samples": 4, **GRADIENT_SVD},
    {"method": "full"},
]


@pytest.mark.parametrize(
    "keys",
    TINY,
    ids=[
        "lora-gradient_svd",
        "lora-bf16-checkpointing",
        "lora_fa-reduce",
        "lors-gradient_svd",
        "full",
    ],
)
def test_each_phase_equals_its_real_tensors_on_a_tiny_llama(tiny, keys):
    cfg = TrainConfig.from_flat({"model": str(tiny), "batch_size": 2, "max_len": 64, **keys})
    p = plan(cfg, target="cpu")
    assert p.phases == _real_phases(cfg, _real(cfg))
    assert p.peak == max(p.phases.values()) == p.phases[p.peak_phase]
    assert sum(p.at_peak.values()) == p.peak


SMOLLM2 = [
    {"method": "lora", "init_samples": 3, "targets": ["q_proj", "v_proj"], **GRADIENT_SVD},
    {"method": "lora_fa", "reduce_memory": True, "dtype": "bfloat16"},
]


@pytest.mark.parametrize("keys", SMOLLM2, ids=["lora-gradient_svd", "lora_fa-reduce-bf16"])
def test_each_phase_equals_its_real_tensors_on_smollm2(keys):
    flat = {"model": "smollm2-135m", "batch_size": 2, "max_len": 64, **keys}
    cfg = TrainConfig.from_flat(flat)
    assert plan(cfg, target="cpu").phases == _real_phases(cfg, _real(cfg))


@pytest.fixture
def wide(tmp_path):
    """A LLaMA config with wide layers and a small vocabulary: weights outweigh activations."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config.save_pretrained(tmp_path)
    return tmp_path


def test_gradient_svd_init_sets_the_peak_of_its_run(wide):
    """Init holds a dense gradient of every adapted weight at once: on wide layers that is more
    than a training step holds, and the plan's peak is that phase's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    flat = {"model": str(wide), "method": "lora", "rank": 4, "batch_size": 2, "max_len": 32}
    cfg = TrainConfig.from_flat(flat | {"init": "gradient_svd", "init_samples": 4})
    torch.manual_seed(0)
    model = _real(cfg, AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(wide)))
    batches = _init_batches(cfg)
    real = live_peak(
        lambda: gradient_svd_init(model, lambda m, b: batch_loss(m, b), batches),
        _state(model) + [t for b in batches for t in b.values()],
    )
    p = plan(cfg, target="cpu")
    assert p.peak == real
    assert p.peak_phase == "gradient_svd_init"
    assert real > 1.5 * p.phases["train_step"]
    assert p.phases["train_step"] == plan(TrainConfig.from_flat(flat), target="cpu").peak


def test_cli_plan_names_each_phase_and_the_peak(wide, capsys):
    args = ["plan", "--model", str(wide), "--batch-size", "2", "--max-len", "32", "--rank", "4"]
    assert main([*args, "--init", "gradient_svd", "--init-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "at the peak of the run, in its gradient-SVD init" in out
    phases = out[out.index("peak of each phase:") :].splitlines()[1:]
    assert [line.split("  ")[1] for line in phases] == [
        "gradient-SVD init",
        "training step",
        "validation (no grad)",
    ]
    assert phases[0].endswith("<- the run's peak")


def test_gradient_svd_init_refuses_a_4bit_base(tiny):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="init gradient_svd needs a dense base"):
        TrainConfig.from_flat({"model": str(tiny), "quantize": "nf4", **GRADIENT_SVD})
    cfg = TrainConfig.from_flat({"model": str(tiny), "quantize": "nf4", "rank": 4})
    model, _ = load_model(str(tiny))
    _adapt(model, cfg, "lm", SINGLE)
    with pytest.raises(ValueError, match=r"q_proj\.weight is torch\.uint8 \(a quantized base\)"):
        gradient_svd_init(model, lambda m, b: batch_loss(m, b), [_rows(1, 8)])


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(" ".join(f"word{i % 97} and the {i} quick brown fox" for i in range(600)))
    return f


@pytest.mark.parametrize(
    "keys",
    [
        {"method": "lora", "micro_batch_size": 1, "init_samples": 3, **GRADIENT_SVD},
        {"method": "lora_fa", "reduce_memory": True},
    ],
    ids=["lora-accumulate-gradient_svd", "lora_fa-reduce"],
)
def test_the_run_code_holds_what_is_planned(tiny, text_file, tmp_path, keys):
    """train.setup's gradient-SVD init, train_step and tasks.evaluate, measured: each holds the
    planned peak, plus in validation the rows of its share of the validation set that are not
    in the batch being run (8 bytes per token; the planner knows no data set)."""
    import importlib

    from lorakit import tasks

    train = importlib.import_module("lorakit.train")  # the loop's module; lk.train: the entry
    flat = {"model": str(tiny), "data": str(text_file), "val_data": str(text_file)}
    flat |= {"batch_size": 2, "max_len": 64, "eval_examples": 5, "output": str(tmp_path / "run")}
    cfg = TrainConfig.from_flat(flat | {"progress": False, **keys})
    p = plan(cfg, target="cpu")
    kaiming = dataclasses.replace(cfg, adapter=cfg.adapter.replace(init="kaiming"))
    run = train.setup(kaiming)
    data = run.prep.val_blocks  # the validation set, there before and after (not planned)
    real = {}
    if cfg.adapter.init == "gradient_svd":
        real["gradient_svd_init"] = live_peak(
            lambda: train._gradient_svd_init(run.model, cfg, run.prep, run.tokenizer),
            [*_state(run.model), data],
        )
    train.train_step(run)
    state = [*_state(run.model, run.optimizer), data]
    real["train_step"] = live_peak(lambda: train.train_step(run), state)
    real["validation"] = live_peak(
        lambda: tasks.evaluate(run.model, run.tokenizer, run.prep, cfg), state
    )
    micro = cfg.micro_batch_size or cfg.batch_size
    share = (cfg.eval_examples - micro) * cfg.max_len * 8  # the stacked rows not in the batch
    allowed = {"gradient_svd_init": 0, "train_step": 0, "validation": share}
    assert real.keys() == p.phases.keys()
    for phase, planned in p.phases.items():
        extra = real[phase] - data.untyped_storage().nbytes() - planned
        assert 0 <= extra <= allowed[phase] + SCALARS, (phase, extra)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_no_grad_loss_in_chunks_equals_the_loss_of_full_logits(name, monkeypatch):
    """Validation's loss from the head's input, a few positions at a time, against the loss of
    the whole (b, s, vocab) logits (what training computes): left padding, ignored labels, an
    adapted head (its adapter runs on every chunk)."""
    from conftest import build, perturb

    from lorakit import evaluate

    monkeypatch.setattr(evaluate, "LOSS_CHUNK", 6, raising=False)  # 3 positions of 2 rows
    model = build(name)
    head = "lm_head" if name == "llama" else "c_attn"
    lk.inject(model, lk.LoRAConfig(rank=2, targets=[head, "lm_head"]))
    perturb(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    labels = torch.where(mask.bool(), ids, -100)
    labels[0, 2:5] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    full, n = token_losses(model, batch)  # with grad: whole logits
    with torch.no_grad():
        chunked, m = token_losses(model, batch)
    assert n == m == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(chunked, full.detach(), rtol=1e-6, atol=0)
    assert "forward" not in model.get_output_embeddings().__dict__  # the head's own again


def test_validation_holds_no_full_logits(tiny, monkeypatch):
    """No-grad validation holds a few chunks of float32 logits, not the (b, s, vocab) logits
    (and their float32 copy and log-softmax) of the batch."""
    from lorakit import evaluate

    monkeypatch.setattr(evaluate, "LOSS_CHUNK", 64, raising=False)
    cfg = TrainConfig.from_flat({"model": str(tiny), "method": "lora", "max_len": 256})
    model = _real(cfg).eval()
    batch = _rows(2, 256)
    state = _state(model) + list(batch.values())
    with torch.no_grad():
        transient = live_peak(lambda: token_losses(model, batch), state) - live_peak(
            lambda: None, state
        )
    logits = 2 * 256 * model.config.vocab_size * 4  # one float32 (b, s, vocab) tensor
    assert transient < logits / 2

"""The whole contract on every family of the zoo (tests/zoo.py), for every method that applies.

Per family x method: identity at init; one AdamW step lowers the loss; gradients equal plain
autograd (PEFT's, for the methods PEFT computes); save -> load identical; PEFT loads ours and we
load PEFT's; merge exact (LoRS: still sparse); ``plan(target="cpu")`` saved bytes equal
``count_saved`` of the same training set-up. MoE families adapt their experts too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import zoo

import lorakit as lk
from lorakit.config import TrainConfig
from lorakit.distributed import SINGLE
from lorakit.experts import group_routing
from lorakit.inject import adapted_modules
from lorakit.planner import plan
from lorakit.tasks import batch_loss, collate
from lorakit.train import _adapt

METHODS = ("lora", "lora_fa", "lors")
CASES = [(f, m) for f in zoo.FAMILIES for m in METHODS]
PEFT_CASES = [(f, m) for f, m in CASES if m != "lors"]


def _targets(family: str, method: str):
    # LoRS keeps a pruned weight sparse; fused experts are not pruned, so it adapts linears only
    return ["all-linear", "experts"] if family in zoo.MOE and method != "lors" else "all-linear"


def _base(family: str, method: str):
    model = zoo.build(family)
    if method == "lors":
        lk.prune(model, "magnitude", 0.5, progress=False)
    return model


def _config(family: str, method: str) -> lk.LoRAConfig:
    return lk.LoRAConfig(method=method, rank=2, alpha=4, targets=_targets(family, method))


def _adapted(family: str, method: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-linear's note on skipped experts (LoRS on MoE)
        return lk.inject(_base(family, method), _config(family, method))


def _inputs(family: str) -> dict[str, torch.Tensor]:
    batch = zoo.batch()
    if family in zoo.ENCODERS:
        batch["labels"] = torch.tensor([0, 2])
    return batch


def _perturb(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _out(model, family):
    return model(**_inputs(family)).logits


@pytest.mark.parametrize("family,method", CASES)
def test_identity_at_init(family, method):
    base = _base(family, method)
    if "experts" in _targets(family, method):  # adapted experts compute through this
        group_routing(base)  # (checked against the experts' own forward in test_experts.py)
    want = _out(base, family)
    assert torch.equal(_out(_adapted(family, method), family), want)


@pytest.mark.parametrize("family,method", CASES)
def test_one_step_lowers_the_loss(family, method):
    model = _adapted(family, method)  # eval mode: no dropout, so the two losses compare
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = _inputs(family)
    before = model(**batch).loss
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model(**batch).loss
    assert after < before


@pytest.mark.parametrize("family,method", CASES)
def test_save_load_identical(family, method, tmp_path):
    model = _adapted(family, method)
    _perturb(model)
    lk.save_adapter(model, tmp_path)
    back = lk.load_adapter(_base(family, method), tmp_path)
    assert torch.equal(_out(back, family), _out(model, family))


@pytest.mark.parametrize("family,method", CASES)
def test_merge_exact(family, method):
    model = _adapted(family, method)
    _perturb(model)
    want = _out(model, family)
    merged = lk.merge(model)
    assert not list(adapted_modules(merged))
    torch.testing.assert_close(_out(merged, family), want, rtol=0, atol=1e-5)
    if method == "lors":  # still exactly as sparse as the pruned base
        pruned = _base(family, method)
        for (name, p), q in zip(merged.named_parameters(), pruned.parameters(), strict=True):
            if p.dim() == 2 and "embed" not in name and "wte" not in name:
                assert torch.equal(p == 0, q == 0) or not (q == 0).any(), name


@pytest.mark.parametrize("family,method", PEFT_CASES)
def test_peft_loads_ours_with_the_same_gradients(family, method, tmp_path):
    from peft import PeftModel

    model = _adapted(family, method)
    _perturb(model)
    lk.save_adapter(model, tmp_path)
    peft = PeftModel.from_pretrained(_base(family, method), tmp_path, is_trainable=True)
    batch = _inputs(family)
    ours, theirs = model(**batch), peft(**batch)
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=0, atol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    ours_b = sorted(p.grad.norm().item() for n, p in model.named_parameters() if "lora_B" in n)
    their_b = sorted(p.grad.norm().item() for n, p in peft.named_parameters() if "lora_B" in n)
    assert len(ours_b) == len(their_b)
    torch.testing.assert_close(torch.tensor(ours_b), torch.tensor(their_b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family,method", PEFT_CASES)
def test_we_load_peft(family, method, tmp_path):
    from peft import LoraConfig, get_peft_model

    experts = ["experts.gate_up_proj", "experts.down_proj"] if family in zoo.MOE else None
    peft = get_peft_model(
        _base(family, method),
        LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", target_parameters=experts),
    )
    _perturb(peft, seed=5)
    want = _out(peft, family)
    peft.save_pretrained(tmp_path)
    ours = lk.load_adapter(_base(family, method), tmp_path)
    torch.testing.assert_close(_out(ours, family), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,method", [c for c in CASES if c[0] in zoo.CAUSAL])
def test_plan_equals_count_saved(family, method, tmp_path):
    zoo.build(family).save_pretrained(tmp_path)
    flat = {"model": str(tmp_path), "method": method, "batch_size": 2, "max_len": 12}
    flat |= {"rank": 2, "alpha": 4, "targets": _targets(family, method)}
    cfg = TrainConfig.from_flat(flat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planned = plan(cfg, target="cpu").activations
        model = _base(family, method)
        _adapt(model, cfg, "lm", SINGLE)
    model.train()
    ids = torch.randint(3, zoo.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = collate([{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids], 0)
    assert planned == lk.count_saved(model, lambda: batch_loss(model, batch))[1]

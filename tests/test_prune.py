"""Pruning: exact patterns, errors, and agreement with small independent references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build

import lorakit as lk
from lorakit.prune import Sparsity, mask_from_scores, sparsegpt_prune

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _calib(n=8, seq=16):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(0))


def _linears(model):
    return {n: m for n, m in model.named_modules() if n.endswith(PROJ)}


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "3:2", "0:4", "2-4", "half", True])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match=r"sparsity|N:M"):
        Sparsity.parse(bad)


def test_nm_needs_divisible_input():
    with pytest.raises(ValueError, match=r"2:5 sparsity needs input dims divisible by 5"):
        lk.prune(build("llama"), "magnitude", "2:5")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_is_exact(method, pattern):
    n, m = map(int, pattern.split(":"))
    model = build("llama")
    report = lk.prune(model, method, pattern, _calib(), progress=False)
    for name, lin in _linears(model).items():
        groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, m).sum(-1)
        assert int(groups.max()) <= n, name
        assert report[name] == pytest.approx(1 - n / m, abs=1e-6)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_unstructured_fraction(method):
    model = build("llama")
    lk.prune(model, method, 0.5, _calib(), progress=False)
    for name, lin in _linears(model).items():
        zeros = (lin.weight == 0).sum(1) if method == "wanda" else (lin.weight == 0).sum()
        if method == "wanda":  # per output row
            assert bool((zeros == lin.weight.shape[1] // 2).all()), name
        else:  # per block of columns, overall half
            assert int(zeros) == pytest.approx(lin.weight.numel() // 2, abs=lin.weight.shape[0]), (
                name
            )


def test_gpt2_conv1d_and_skips_embeddings_and_head():
    model = build("gpt2")
    wte = model.transformer.wte.weight.clone()
    report = lk.prune(model, "wanda", "2:4", _calib(), progress=False)
    assert "transformer.h.0.attn.c_attn" in report and "lm_head" not in report
    assert torch.equal(model.transformer.wte.weight, wte)
    w = model.transformer.h[0].mlp.c_fc.weight.t()  # (out, in)
    assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) == 2


STAGES = {  # groups of layers calibrated together, in order
    False: [PROJ],  # one pass over the unpruned block (the reference code's order)
    True: [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)],
}


def _reference_prune(model, calib, true_sequential, prune_layer):
    """For each block and each group of its layers in turn, a full forward of the partly pruned
    model collects the group's layer inputs (float64); ``prune_layer(module, x)`` prunes each."""
    for block in model.model.layers:
        for stage in STAGES[true_sequential]:
            xs: dict[str, list[torch.Tensor]] = {}
            mods = {n: m for n, m in block.named_modules() if n.endswith(stage)}
            hooks = [
                m.register_forward_hook(
                    lambda mod, a, o, n=n, xs=xs: xs.setdefault(n, []).append(
                        a[0].double().reshape(-1, a[0].shape[-1])
                    )
                )
                for n, m in mods.items()
            ]
            with torch.no_grad():
                model(input_ids=calib)
            for h in hooks:
                h.remove()
            for n, m in mods.items():
                with torch.no_grad():
                    prune_layer(m, torch.cat(xs[n]))


def _wanda_half(m, x):
    score = m.weight.abs().double() * (x**2).sum(0).sqrt()
    drop = score.argsort(dim=1)[:, : m.weight.shape[1] // 2]
    m.weight.scatter_(1, drop, 0.0)


def _sparsegpt_24(m, x):
    m.weight.copy_(sparsegpt_prune(m.weight, 2 * x.t() @ x / len(x), Sparsity.parse("2:4")))


@pytest.mark.parametrize("true_sequential", [False, True])
def test_wanda_matches_reference(true_sequential):
    """Score |W|·‖X_j‖ over the layer's calibration inputs, drop the lowest half of each row."""
    model = build("llama")
    ref = copy.deepcopy(model)
    calib = _calib()
    lk.prune(
        model, "wanda", 0.5, calib, progress=False, batch_size=3, true_sequential=true_sequential
    )
    _reference_prune(ref, calib, true_sequential, _wanda_half)
    for (n, a), (_, b) in zip(_linears(model).items(), _linears(ref).items(), strict=True):
        assert torch.equal(a.weight == 0, b.weight == 0), n
        assert torch.equal(a.weight, b.weight), n


@pytest.mark.parametrize("true_sequential", [False, True])
def test_sparsegpt_prune_matches_reference(true_sequential):
    """sparsegpt_prune on each layer on its own, from its H in float64."""
    model = build("llama")
    ref = copy.deepcopy(model)
    calib = _calib()
    lk.prune(
        model, "sparsegpt", "2:4", calib, progress=False, batch_size=3,
        true_sequential=true_sequential,
    )  # fmt: skip
    _reference_prune(ref, calib, true_sequential, _sparsegpt_24)
    for (n, a), (_, b) in zip(_linears(model).items(), _linears(ref).items(), strict=True):
        assert torch.equal(a.weight == 0, b.weight == 0), n
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)


def test_true_sequential_differs_from_one_pass():
    """Calibrating o/gate/up/down on already-pruned inputs changes their masks (else the option
    would be vacuous on this model)."""
    a, b = build("llama"), build("llama")
    b.load_state_dict(a.state_dict())
    lk.prune(a, "wanda", 0.5, _calib(), progress=False, true_sequential=True)
    lk.prune(b, "wanda", 0.5, _calib(), progress=False, true_sequential=False)
    la, lb = _linears(a), _linears(b)
    assert torch.equal(
        la["model.layers.0.self_attn.q_proj"].weight, lb["model.layers.0.self_attn.q_proj"].weight
    )
    assert not torch.equal(
        la["model.layers.0.mlp.down_proj"].weight, lb["model.layers.0.mlp.down_proj"].weight
    )


def _naive_obs(w, H, mask, damp=0.01):
    """Reference OBS without Cholesky or blocking: explicit inverse, rank-1 elimination per column."""
    W = w.double().clone()
    H = H.double().clone()
    H += torch.eye(H.shape[0], dtype=H.dtype) * damp * torch.diag(H).mean()
    Hinv = torch.linalg.inv(H)
    for j in range(W.shape[1]):
        err = torch.where(mask[:, j], W[:, j], torch.zeros_like(W[:, j])) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        W[mask[:, j], j] = 0
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return W


@pytest.mark.parametrize("pattern", [0.5, "2:4"])
def test_sparsegpt_matches_naive_obs(pattern):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, dtype=torch.float64, generator=g)
    w = torch.randn(12, 64, dtype=torch.float64, generator=g)
    H = 2 * x.t() @ x / x.shape[0]
    got = sparsegpt_prune(w, H, Sparsity.parse(pattern), block=64)
    mask = got == 0
    want = _naive_obs(w, H, mask)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    # and it beats plain masking with the same mask on the calibration data
    masked = w * ~mask
    assert (x @ (got - w).t()).norm() < (x @ (masked - w).t()).norm()


def test_mask_from_scores_per_row():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    assert mask_from_scores(s, Sparsity.parse(0.5)).tolist() == [
        [False, True, False, True],
        [True, True, False, False],
    ]
    assert mask_from_scores(s, Sparsity.parse("1:2")).tolist() == [
        [False, True, False, True],
        [True, False, True, False],
    ]


def test_calibration_too_short():
    from transformers import AutoTokenizer

    from lorakit.models import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    with pytest.raises(
        ValueError, match=r"calibration text has \d+ tokens, too short for 128 windows of 512"
    ):
        lk.prune(build("llama"), "wanda", 0.5, ["just a few words"], tokenizer=tok, progress=False)


def _problem(rows=12, cols=64, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, dtype=torch.float64, generator=g)
    w = torch.randn(rows, cols, dtype=torch.float64, generator=g)
    return w, 2 * x.t() @ x / tokens


def test_sparsegpt_nm_group_size_not_dividing_block():
    """1:3 on 192 columns with the default block of 128: groups must not straddle blocks."""
    w, H = _problem(cols=192)
    got = sparsegpt_prune(w, H, Sparsity.parse("1:3"))
    assert int((got != 0).reshape(12, -1, 3).sum(-1).max()) == 1
    assert int((got == 0).sum()) == 12 * 128
    torch.testing.assert_close(got, _naive_obs(w, H, got == 0), rtol=1e-8, atol=1e-8)
    # N:M masks are decided per group, so the block size must not change the result.
    for block in (3, 64, 192):
        got_b = sparsegpt_prune(w, H, Sparsity.parse("1:3"), block=block)
        torch.testing.assert_close(got_b, got, rtol=1e-8, atol=1e-8)


def test_sparsegpt_width_not_divisible():
    w, H = _problem(cols=30)
    with pytest.raises(ValueError, match=r"2:4 sparsity needs a width divisible by 4, got 30"):
        sparsegpt_prune(w, H, Sparsity.parse("2:4"))
    with pytest.raises(ValueError, match=r"weights must be \(out, 30\) to match H, got \(12, 29\)"):
        sparsegpt_prune(w[:, :29], H, Sparsity.parse(0.5))


@pytest.mark.parametrize("pattern", [0.5, "2:4", "1:3"])
def test_sparsegpt_creates_tensors_on_h_device(pattern):
    """Every tensor SparseGPT makes (the damping, the inverse, the masks) follows H's device; the
    meta device stands in for a GPU here: mixing it with a CPU tensor raises."""
    w = torch.empty(12, 96, device="meta")
    H = torch.empty(96, 96, device="meta")
    got = sparsegpt_prune(w, H, Sparsity.parse(pattern))
    assert got.device.type == "meta" and got.shape == w.shape and got.dtype == w.dtype
    stacked = sparsegpt_prune([w, w[:4]], H, Sparsity.parse(pattern))
    assert [t.device.type for t in stacked] == ["meta", "meta"]


@pytest.mark.parametrize("pattern", [0.5, "2:4"])
def test_sparsegpt_stacked_equals_one_by_one(pattern):
    """Weights sharing an input are solved as one stacked matrix, each with its own mask."""
    w, H = _problem(rows=20)
    w[12:] *= 10  # a layer of larger weights: a shared threshold would prune only the first
    sp = Sparsity.parse(pattern)
    a, b = sparsegpt_prune([w[:12], w[12:]], H, sp)
    torch.testing.assert_close(a, sparsegpt_prune(w[:12], H, sp), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b, sparsegpt_prune(w[12:], H, sp), rtol=1e-10, atol=1e-10)
    assert int((a == 0).sum()) == 12 * 32 and int((b == 0).sum()) == 8 * 32


def test_sparsegpt_float32_close_to_float64():
    w, H = _problem()
    got = sparsegpt_prune(w.float(), H.float(), Sparsity.parse("2:4"))
    assert got.dtype == torch.float32
    want = sparsegpt_prune(w, H, Sparsity.parse("2:4"))
    assert torch.equal(got == 0, want == 0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_inverse_cholesky():
    from lorakit.prune import _inverse_cholesky

    _, H = _problem()
    U = _inverse_cholesky(H)
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U, torch.linalg.cholesky(torch.linalg.inv(H), upper=True))


def test_shared_inputs_are_grouped():
    """q/k/v and gate/up read the same tensor: one statistic each, computed once."""
    from lorakit.prune import _Calibration

    model = build("llama")
    block = model.model.layers[0]
    layers = {p: m for p, m in block.named_modules() if p.endswith(PROJ)}
    inputs = []
    h = block.register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=_calib(2))
        model(input_ids=_calib(3))
    h.remove()
    calib = _Calibration(layers, gram=True).run(block, inputs)
    assert calib.groups(layers) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    assert calib.tokens["mlp.gate_proj"] == 5 * 16
    assert sorted(calib.sums) == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
    ]
    # one group only: its input is taken at its first layer and the forward stops there
    only = _Calibration(layers, gram=True, only=["mlp.gate_proj", "mlp.up_proj"])
    calls = []
    block.mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    only.run(block, inputs)
    assert list(only.sums) == ["mlp.gate_proj"] and calls == []
    torch.testing.assert_close(only.sums["mlp.gate_proj"], calib.sums["mlp.gate_proj"])

"""LoRS: exact and straight-through gradients, sparsity kept through training and merging."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, logits
from torch import nn

import lorakit as lk
from lorakit.bitmask import pack_mask
from lorakit.methods.lors import LoRSFunction


def _inputs(fan_in_fan_out: bool, dtype=torch.float64, n=5, d_in=8, d_out=6, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=dtype, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.5] = 0  # 50 % unstructured
    b = torch.randn(d_out, dtype=dtype, generator=g)
    A = torch.randn(r, d_in, dtype=dtype, generator=g, requires_grad=True)
    B = torch.randn(d_out, r, dtype=dtype, generator=g, requires_grad=True)
    return x, (w.t().contiguous() if fan_in_fan_out else w), b, A, B


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_exact_gradcheck_float64(fan_in_fan_out):
    x, w, b, A, B = _inputs(fan_in_fan_out)
    assert torch.autograd.gradcheck(
        lambda x, A, B: LoRSFunction.apply(x, w, b, A, B, pack_mask(w), 0.7, fan_in_fan_out, True),
        (x, A, B),
    )


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_exact_equals_autograd_of_masked_forward(fan_in_fan_out, monkeypatch):
    monkeypatch.setattr("lorakit.methods.lors.TILE_ELEMENTS", 20)  # tiles of 2 rows of 10
    x, w, b, A, B = _inputs(fan_in_fan_out, torch.float64, n=7, d_in=10, d_out=9, r=4)
    g = torch.randn(7, 9, dtype=torch.float64)
    y = LoRSFunction.apply(x, w, b, A, B, pack_mask(w), 1.3, fan_in_fan_out, True)
    got = torch.autograd.grad(y, (x, A, B), g)
    w_oi = w.t() if fan_in_fan_out else w
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y_ref = x2 @ ((w_oi + 1.3 * B2 @ A2) * (w_oi != 0)).t() + b
    want = torch.autograd.grad(y_ref, (x2, A2, B2), g)
    torch.testing.assert_close(y, y_ref)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


def test_straight_through_equals_its_formula():
    x, w, b, A, B = _inputs(False, torch.float64)
    g = torch.randn(5, 6, dtype=torch.float64)
    s = 0.9
    y = LoRSFunction.apply(x, w, b, A, B, pack_mask(w), s, False, False)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), g)
    xd, Ad, Bd = x.detach(), A.detach(), B.detach()
    torch.testing.assert_close(dB, s * g.t() @ (xd @ Ad.t()))
    torch.testing.assert_close(dA, s * (g @ Bd).t() @ xd)
    # dx is exact in both modes: G W'.
    torch.testing.assert_close(dx, g @ ((w + s * Bd @ Ad) * (w != 0)))


def _pruned_mlp(seed=0):
    model = build("llama")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p[torch.rand(p.shape) < 0.5] = 0
    return model


@pytest.mark.parametrize("mode", ["exact", "straight_through"])
def test_training_and_merge_keep_every_zero(mode, ids):
    model = lk.inject(_pruned_mlp(), lk.LoRAConfig(method="lors", rank=4, sparse_grad=mode))
    zeros = {p: (layer.weight == 0).clone() for p, layer in lk.adapted_layers(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        logits(model, ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    before = logits(model, ids)
    lk.merge(model)
    for path, mask in zeros.items():
        w = model.get_submodule(path).weight
        assert bool((w[mask] == 0).all()), path
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)


def test_lors_scaling_defaults_to_rslora():
    assert lk.LoRAConfig(method="lors", rank=16, alpha=16).scaling == pytest.approx(4.0)
    assert lk.LoRAConfig(
        method="lors", rank=16, alpha=16, use_rslora=False
    ).scaling == pytest.approx(1.0)


def test_save_load_round_trip_and_mask_check(ids, tmp_path):
    model = lk.inject(_pruned_mlp(), lk.LoRAConfig(method="lors", rank=4))
    with torch.no_grad():
        for _, layer in lk.adapted_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.1)
    lk.save_adapter(model, tmp_path)
    loaded = lk.load_adapter(_pruned_mlp(), tmp_path)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    other = _pruned_mlp(seed=1)  # pruned differently
    with pytest.raises(
        ValueError,
        match=r"trained on a differently pruned model: the zero pattern of model\.layers\.0",
    ):
        lk.load_adapter(other, tmp_path)
    assert not list(lk.adapted_layers(other))


def test_saves_no_weight_sized_tensor():
    d, n = 64, 8
    lin = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        lin.weight[torch.rand(d, d) < 0.5] = 0
    model = lk.inject(
        nn.Sequential(lin), lk.LoRAConfig(method="lors", rank=4, targets="all-linear")
    )
    x = torch.randn(n, d)
    _, saved = lk.count_saved(model, lambda: model(x).sum())
    assert saved == n * d * 4  # x only


def test_sparse_grad_only_for_lors():
    with pytest.raises(ValueError, match=r"sparse_grad is a LoRS option; method is 'lora'"):
        lk.LoRAConfig(sparse_grad="straight_through")


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lors"])
def test_gradient_svd_init(method, ids):
    base = _pruned_mlp()
    model = lk.inject(
        copy.deepcopy(base), lk.LoRAConfig(method=method, rank=3, targets=["q_proj", "down_proj"])
    )

    def loss_fn(m, batch):
        return m(input_ids=batch, labels=batch).loss

    batches = [ids, ids.flip(1)]
    before = logits(model, ids)
    assert lk.gradient_svd_init(model, loss_fn, batches) == 2
    assert torch.equal(logits(model, ids), before)  # B = 0: the model is unchanged
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    # Reference: the mean dense gradient of the base model, its top right singular vectors.
    ref = copy.deepcopy(base)
    for b in batches:
        loss_fn(ref, b).backward()
    for path, layer in lk.adapted_layers(model):
        g = ref.get_submodule(path).weight.grad / 2
        _, _, Vh = torch.linalg.svd(g.double(), full_matrices=False)
        A = layer.adapters["default"].lora_A.double()
        # same subspace: projecting A's rows onto the top-3 singular directions keeps them whole
        P = Vh[:3].t() @ Vh[:3]
        torch.testing.assert_close(A @ P, A, atol=1e-3, rtol=0)
        assert torch.count_nonzero(layer.adapters["default"].lora_B) == 0


def test_dropout_refused():
    with pytest.raises(ValueError, match=r"method 'lors' does not support dropout"):
        lk.LoRAConfig(method="lors", dropout=0.1)


def test_embedding_refused():
    with pytest.raises(ValueError, match=r"method 'lors' cannot adapt model\.embed_tokens, a embe"):
        lk.inject(_pruned_mlp(), lk.LoRAConfig(method="lors", targets=["embed_tokens", "q_proj"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pattern_survives_merge_unmerge_cycles(dtype, ids, tmp_path):
    base = _pruned_mlp().to(dtype)
    model = lk.inject(copy.deepcopy(base), lk.LoRAConfig(method="lors", rank=4))
    with torch.no_grad():  # a large delta: W + ΔW rounds small kept weights away
        for _, layer in lk.adapted_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 1.0)
    zeros = {p: layer.weight == 0 for p, layer in lk.adapted_layers(model)}
    lk.save_adapter(model, tmp_path / "before")
    for _ in range(3):
        for _, layer in lk.adapted_layers(model):
            layer.merge()
        with lk.disable_adapters(model):  # unmerges, then merges again
            pass
        for _, layer in lk.adapted_layers(model):
            layer.unmerge()
    for path, layer in lk.adapted_layers(model):
        assert torch.equal(~layer.adapters["default"].pattern(), zeros[path]), path
    lk.save_adapter(model, tmp_path / "after")
    from safetensors import safe_open

    def fingerprints(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            return f.metadata()["lorakit_masks"]

    assert fingerprints(tmp_path / "before") == fingerprints(tmp_path / "after")
    lk.load_adapter(copy.deepcopy(base), tmp_path / "after")  # the pruned base still matches
    lk.merge(model)
    for path, mask in zeros.items():
        assert not model.get_submodule(path).weight[mask].any(), path

"""Adapter dtype: fp32 master weights by default on a 16-bit base, without an fp32 copy of x."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, logits, perturb, targets_for
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from lorakit import hardware
from lorakit.bitmask import pack_mask
from lorakit.methods.lora import LoRAFunction
from lorakit.methods.lora_fa import LoRAFAFunction
from lorakit.methods.lors import LoRSFunction

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.fixture(params=["native", "float32"])
def policy(request, monkeypatch):
    """Both ways a 16-bit layer computes on CPU: in the 16-bit dtype (CPUs with bf16 units) and
    in float32 (CPUs without), whatever this CPU has."""
    monkeypatch.delenv(hardware.ENV, raising=False)
    hardware.set_cpu_compute(request.param)
    yield request.param
    hardware.set_cpu_compute(None)


def adapter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every adapter's lora_A and lora_B (LoRA-FA's A is a buffer)."""
    return [
        t
        for _, layer in lk.adapted_layers(model)
        for adapter in layer.adapters.values()
        for t in (adapter.lora_A, adapter.lora_B)
    ]


@pytest.mark.parametrize(
    ("base", "explicit", "expected"),
    [
        (BF16, None, FP32),
        (FP16, None, FP32),
        (FP32, None, FP32),
        (FP64, None, FP64),
        (BF16, "bfloat16", BF16),
        (BF16, "float16", FP16),
        (FP32, "float64", FP64),
    ],
)
def test_adapter_dtype_default_and_explicit(method, base, explicit, expected):
    model = build("llama", base, method=method)
    cfg = lk.LoRAConfig(
        method=method,
        rank=4,
        targets=targets_for("llama", "with-embedding", method),
        adapter_dtype=explicit,
    )
    lk.inject(model, cfg)
    assert {t.dtype for t in adapter_tensors(model)} == {expected}
    # The base is untouched: still entirely in its own dtype.
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {base}


def test_dtype_for():
    cfg = lk.LoRAConfig()
    assert [cfg.dtype_for(d) for d in (BF16, FP16, FP32, FP64, torch.uint8)] == [
        FP32,
        FP32,
        FP32,
        FP64,
        FP32,
    ]
    assert lk.LoRAConfig(adapter_dtype="bfloat16").dtype_for(FP32) == BF16
    assert cfg.dtype is None  # the default is not an explicit choice (not saved as one)


def _train_A(method: str, adapter_dtype: str | None, steps: int = 10) -> tuple[float, set]:
    """Fraction of lora_A's entries that changed in ``steps`` AdamW steps at lr 1e-4 on a bf16
    tiny LLaMA (no weight decay: only gradient steps move A), and the adapter dtypes."""
    model = build("llama", BF16, method=method)
    torch.manual_seed(0)
    lk.inject(model, lk.LoRAConfig(method=method, rank=4, adapter_dtype=adapter_dtype))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    A0 = [
        layer.adapters["default"].lora_A.detach().clone() for _, layer in lk.adapted_layers(model)
    ]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):  # B starts at zero: step 1 moves B, then A has a gradient
        ids = torch.randint(0, 128, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    A1 = [layer.adapters["default"].lora_A.detach() for _, layer in lk.adapted_layers(model)]
    changed = sum(int((a != b).sum()) for a, b in zip(A0, A1, strict=True))
    total = sum(a.numel() for a in A0)
    return changed / total, {t.dtype for t in adapter_tensors(model)}


@pytest.mark.parametrize("method", ["lora", "lors"])
def test_bf16_base_small_updates_are_kept(method):
    """With the default (fp32) adapters every entry of A moves; bf16 adapters round most small
    AdamW steps away (the reason for the default)."""
    changed, dtypes = _train_A(method, None)
    assert dtypes == {FP32}
    assert changed >= 0.99, changed
    changed16, dtypes16 = _train_A(method, "bfloat16")
    assert dtypes16 == {BF16}
    assert changed16 < 0.9, changed16


N, D_IN, D_HID, R = 256, 48, 40, 8


def _mlp(method: str, dropout: float, adapter_dtype: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_IN)).to(BF16)
    if method == "lors":
        with torch.no_grad():
            for m in (model[0], model[2]):
                m.weight[torch.rand(m.weight.shape) < 0.5] = 0
    cfg = lk.LoRAConfig(
        method=method, rank=R, dropout=dropout, targets=["0", "2"], adapter_dtype=adapter_dtype
    )
    return lk.inject(model, cfg).train()


def _saved(model: nn.Module) -> int:
    x = torch.randn(N, D_IN, dtype=BF16, generator=torch.Generator().manual_seed(1))
    return lk.count_saved(model, lambda: model(x).float().sum())[1]


@pytest.mark.parametrize(
    ("method", "dropout"), [("lora", 0.0), ("lora_fa", 0.0), ("lora_fa", 0.1), ("lors", 0.0)]
)
def test_fp32_adapters_keep_no_fp32_copy_of_x(policy, method, dropout):
    """A bf16 model with fp32 adapters saves exactly the bf16 tensors it saves with bf16
    adapters: x (LoRA, LoRS) or H = x Aᵀ (LoRA-FA) in bf16, never an fp32 copy of x."""
    model = _mlp(method, dropout, None)
    assert {t.dtype for t in adapter_tensors(model)} == {FP32}
    saved = _saved(model)
    assert saved == _saved(_mlp(method, dropout, "bfloat16"))
    tanh_out = 2 * N * D_HID  # bf16, also layer 2's input
    if method == "lora_fa":
        rng = torch.get_rng_state().numel() if dropout else 0
        assert saved == 2 * (2 * N * R + rng) + tanh_out
    else:
        assert saved == 2 * N * D_IN + tanh_out  # layer 0's x; layer 2's x is tanh's output


def test_fp32_adapters_with_lora_dropout_keep_no_fp32_copy_of_x(policy):
    """LoRA with dropout runs plain autograd, which may keep 16-bit casts of A and B (r·(in +
    out) numbers per layer) but nothing of x's size in fp32 (that would be 4·N·in bytes)."""
    fp32, bf16 = _saved(_mlp("lora", 0.1, None)), _saved(_mlp("lora", 0.1, "bfloat16"))
    casts = 2 * R * (D_IN + D_HID) * 2  # both layers' A and B, 2 bytes each
    assert fp32 <= bf16 + casts < bf16 + 4 * N * D_IN


def _function_case(method: str):
    """bf16 x, W, b (values exact in fp32), fp32 A and B, a bf16 upstream gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).to(BF16)
    w = torch.randn(24, 32, generator=g).to(BF16)
    if method == "lors":
        w[torch.rand(w.shape, generator=g) < 0.5] = 0
    b = torch.randn(24, generator=g).to(BF16)
    A = torch.randn(4, 32, generator=g) / 4
    B = torch.randn(24, 4, generator=g) / 4
    gy = torch.randn(64, 24, generator=g).to(BF16)
    return x, w, b, A, B, gy


def _apply(method: str, x, w, b, A, B, s):
    if method == "lora":
        return LoRAFunction.apply(x, w, b, A, B, s, False)
    if method == "lora_fa":
        return LoRAFAFunction.apply(x, w, b, A, B, s, False, 0.0)
    return LoRSFunction.apply(x, w, b, A, B, pack_mask(w), s, False, True)


def _reference(method: str, x, w, b, A, B, s):
    """The layer in plain float64 autograd (LoRS: W' = (W + s·B A) ⊙ M)."""
    if method == "lors":
        return x @ ((w + s * B @ A) * (w != 0)).t() + b
    return x @ w.t() + b + s * (x @ A.t()) @ B.t()


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lors"])
def test_fp32_adapter_gradients_match_autograd(policy, method):
    """The Functions on a bf16 input with fp32 A, B against plain float64 autograd of the same
    values. Each error is bounded by the magnitude of its sum of products (the same computation
    on absolute values): by 2^-6 of it when the layer computes in bf16 (a few bf16 roundings),
    and for LoRA's and LoRS's dA / dB by 1e-5 when it computes in fp32 (fp32 accumulation: the
    adapter's gradient is not rounded to bf16 on the way)."""
    s = 1.5
    x, w, b, A, B, gy = _function_case(method)
    trained_A = method != "lora_fa"
    xg, Ag, Bg = x.clone().requires_grad_(), A.clone().requires_grad_(trained_A), B.clone()
    Bg.requires_grad_()
    y = _apply(method, xg, w, b, Ag, Bg, s)
    y.backward(gy)
    assert y.dtype == BF16 and xg.grad.dtype == BF16
    assert Bg.grad.dtype == FP32 and (Ag.grad is None) == (not trained_A)
    assert not trained_A or Ag.grad.dtype == FP32

    def run(absolute: bool):
        vals = [t.double().abs() if absolute else t.double() for t in (x, w, b, A, B, gy)]
        x64, w64, b64, A64, B64, g64 = vals
        x64.requires_grad_()
        A64.requires_grad_(trained_A)
        B64.requires_grad_()
        y64 = _reference(method, x64, w64, b64, A64, B64, s)
        y64.backward(g64)
        return y64.detach(), x64.grad, A64.grad, B64.grad

    ref, mag = run(False), run(True)
    got = (y, xg.grad, Ag.grad, Bg.grad)
    bf16_bound = 2**-6
    # LoRA-FA keeps H = x Aᵀ in bf16 for backward by design (2·N·r bytes), so its dB carries
    # bf16 rounding in either policy.
    fp32_bound = 1e-5 if policy == "float32" and method != "lora_fa" else bf16_bound
    bounds = (bf16_bound, bf16_bound, fp32_bound, fp32_bound)  # y and dx are bf16 outputs
    for name, g_, r_, m_, bound in zip(("y", "dx", "dA", "dB"), got, ref, mag, bounds, strict=True):
        if r_ is None:
            continue
        err = (g_.double() - r_).abs()
        assert (err <= bound * m_ + 1e-12).all(), (name, float((err / m_.clamp_min(1e-30)).max()))


def _adapter_file(folder) -> tuple[set[torch.dtype], dict[str, str]]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.mark.parametrize(("explicit", "stored"), [(None, FP32), ("bfloat16", BF16)])
def test_save_load_round_trip_on_a_bf16_base(method, explicit, stored, ids, tmp_path):
    """The default writes fp32 tensors (as PEFT does) and no dtype of its own; an explicit dtype
    is written and comes back. Both reload bit-identically."""
    base = build("llama", BF16, method=method)
    targets = targets_for("llama", "with-embedding", method)
    cfg = lk.LoRAConfig(method=method, rank=4, targets=targets, adapter_dtype=explicit)
    model = lk.inject(copy.deepcopy(base), cfg)
    perturb(model, scale=0.1)
    lk.save_adapter(model, tmp_path)
    dtypes, metadata = _adapter_file(tmp_path)
    assert dtypes == {stored}
    assert metadata.get("lorakit_adapter_dtype") == explicit
    loaded = lk.load_adapter(copy.deepcopy(base), tmp_path)
    assert {t.dtype for t in adapter_tensors(loaded)} == {stored}
    for a, b in zip(adapter_tensors(model), adapter_tensors(loaded), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_a_16bit_adapter_without_a_recorded_dtype_loads_as_fp32(ids, tmp_path):
    """bf16 tensors with no recorded dtype (PEFT with autocast_adapter_dtype=False, or lorakit
    before fp32 became the default) load as fp32 on a bf16 base, as PEFT loads them, and compute
    exactly what the bf16 adapter computed (bf16 values are exact in fp32)."""
    base = build("llama", BF16)
    cfg = lk.LoRAConfig(rank=4, targets=targets_for("llama", "with-embedding"))
    old = lk.inject(copy.deepcopy(base), cfg.replace(adapter_dtype="bfloat16"))
    perturb(old, scale=0.1)
    lk.save_adapter(old, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    _, metadata = _adapter_file(tmp_path)
    del metadata["lorakit_adapter_dtype"]
    save_file(load_file(file), file, metadata=metadata)
    loaded = lk.load_adapter(copy.deepcopy(base), tmp_path)
    assert {t.dtype for t in adapter_tensors(loaded)} == {FP32}
    with torch.no_grad():
        assert torch.equal(logits(loaded, ids), logits(old, ids))


def test_merge_keeps_the_base_dtype(method, ids):
    base = build("llama", BF16, method=method)
    targets = targets_for("llama", "with-embedding", method)
    model = lk.inject(copy.deepcopy(base), lk.LoRAConfig(method=method, rank=4, targets=targets))
    perturb(model, scale=0.1)
    with torch.no_grad():
        before = logits(model, ids).float()
        merged = lk.merge(model)
        after = logits(merged, ids).float()
    assert {p.dtype for p in merged.parameters()} == {BF16}
    assert sorted(merged.state_dict()) == sorted(base.state_dict())
    # Merged == unmerged up to bf16 rounding of W + ΔW, far below what the adapter changes.
    with torch.no_grad():
        effect = (before - logits(base, ids).float()).abs().max()
    assert (after - before).abs().max() < 0.1 * effect

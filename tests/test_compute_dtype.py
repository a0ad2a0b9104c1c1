"""The CPU compute-dtype policy of adapted layers, with the CPU's flags faked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import build

import lorakit as lk
from lorakit import hardware
from lorakit.methods.lora import LoRAFunction, compute_dtype, layer_dtypes

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(*flags)`` makes the process see a CPU with those flags and no override."""
    monkeypatch.delenv(hardware.ENV, raising=False)

    def fake(*flags: str) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
        hardware.set_cpu_compute(None)

    yield fake
    hardware.set_cpu_compute(None)  # forget the faked decisions


def x_of(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(4, 8, dtype=dtype)


@pytest.mark.parametrize("flags", [("avx512_bf16",), ("amx_tile", "amx_bf16"), ("bf16",)])
def test_bf16_units_compute_in_bf16(cpu, flags):
    cpu("avx2", *flags)
    assert layer_dtypes(x_of(BF16)) == (BF16, BF16)
    assert layer_dtypes(x_of(FP16)) == (FP16, FP32)  # bf16 units say nothing about fp16
    assert layer_dtypes(x_of(FP32)) == (FP32, FP32)


@pytest.mark.parametrize("flags", [("avx512_fp16",), ("amx_fp16",)])
def test_fp16_units_compute_in_fp16(cpu, flags):
    cpu(*flags)
    assert compute_dtype(x_of(FP16)) == FP16
    assert compute_dtype(x_of(BF16)) == FP32


@pytest.mark.parametrize("flags", [("avx2", "fma"), ("avx2", "avx512f", "avx512bw"), ()])
def test_without_units_compute_in_fp32(cpu, flags):
    cpu(*flags)  # () = flags unreadable (no /proc/cpuinfo)
    assert layer_dtypes(x_of(BF16)) == (BF16, FP32)
    assert layer_dtypes(x_of(FP16)) == (FP16, FP32)
    assert compute_dtype(x_of(torch.float64)) == torch.float64


def test_env_override(cpu, monkeypatch):
    cpu("avx512_bf16")
    monkeypatch.setenv(hardware.ENV, "float32")
    hardware.set_cpu_compute(None)
    assert compute_dtype(x_of(BF16)) == FP32
    cpu("avx2")
    monkeypatch.setenv(hardware.ENV, "native")
    hardware.set_cpu_compute(None)
    assert compute_dtype(x_of(BF16)) == BF16
    assert compute_dtype(x_of(FP16)) == FP16
    monkeypatch.setenv(hardware.ENV, "fp32")
    hardware.set_cpu_compute(None)
    with pytest.raises(ValueError, match=r"LORAKIT_CPU_COMPUTE must be one of auto, float32, nat"):
        compute_dtype(x_of(BF16))


def test_function_override_wins_over_env(cpu, monkeypatch):
    cpu("avx512_bf16")
    monkeypatch.setenv(hardware.ENV, "native")
    hardware.set_cpu_compute("float32")
    assert compute_dtype(x_of(BF16)) == FP32
    hardware.set_cpu_compute("auto")
    assert compute_dtype(x_of(BF16)) == BF16
    with pytest.raises(ValueError, match=r"one of auto, float32, native, got 'bf16'"):
        hardware.set_cpu_compute("bf16")


def test_decided_once_per_process(cpu, monkeypatch):
    reads = []

    def flags():
        reads.append(1)
        return frozenset({"avx512_bf16"})

    cpu()
    monkeypatch.setattr(hardware, "cpu_flags", flags)
    hardware.set_cpu_compute(None)
    x = x_of(BF16)
    assert all(compute_dtype(x) == BF16 for _ in range(100))
    monkeypatch.setenv(hardware.ENV, "float32")  # too late: the decision is cached
    assert compute_dtype(x) == BF16
    assert len(reads) == 1


@pytest.mark.parametrize(("flags", "cd"), [(("amx_bf16",), BF16), (("avx2",), FP32)])
def test_autocast_is_honoured(cpu, flags, cd):
    cpu(*flags)
    x = x_of(FP32)
    with torch.autocast("cpu", dtype=BF16):
        assert layer_dtypes(x) == (BF16, cd)
        A, B = torch.randn(2, 8, requires_grad=True), torch.randn(3, 2, requires_grad=True)
        y = LoRAFunction.apply(x, torch.randn(3, 8), None, A, B, 1.0, False)
    assert y.dtype == BF16
    assert y.grad_fn.cd == cd  # ctx: the dtype the Function computed in


def test_cuda_computes_in_x_dtype(cpu):
    cpu("avx2")  # flags matter only on CPU
    for dtype in (BF16, FP16, FP32):
        fake = SimpleNamespace(device=torch.device("cuda"), dtype=dtype)
        assert layer_dtypes(fake) == (dtype, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor_computes_in_x_dtype(cpu):
    cpu("avx2")
    for dtype in (BF16, FP16):
        assert layer_dtypes(torch.randn(2, 2, dtype=dtype, device="cuda")) == (dtype, dtype)


@pytest.mark.parametrize(("flags", "cd"), [(("avx512_bf16",), BF16), (("avx2",), FP32)])
def test_bf16_function_matches_fp32_reference(cpu, flags, cd):
    cpu(*flags)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(32, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8)
    A, B = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
    xb, Ab, Bb = (t.bfloat16().requires_grad_() for t in (x, A, B))
    y = LoRAFunction.apply(xb, w.bfloat16(), b.bfloat16(), Ab, Bb, 1.5, False)
    assert y.dtype == BF16 and y.grad_fn.cd == cd
    y.float().sum().backward()
    assert xb.grad.dtype == Ab.grad.dtype == Bb.grad.dtype == BF16
    ref = x @ w.t() + b + 1.5 * (x @ A.t()) @ B.t()
    torch.testing.assert_close(y.float(), ref, atol=0.25, rtol=0.02)


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lors"])
def test_bf16_model_trains_with_bf16_units(cpu, method):
    cpu("avx512_bf16")
    base = build("llama").bfloat16()
    if method == "lors":
        with torch.no_grad():
            for n, p in base.named_parameters():
                if n.endswith("proj.weight"):
                    p[torch.rand(p.shape) < 0.5] = 0
    model = lk.inject(base, lk.LoRAConfig(method=method, rank=4))
    ids = torch.randint(0, 128, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == BF16  # the model computes in bf16 ...
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    # ... and its default adapters are fp32 master weights with fp32 gradients.
    assert grads and all(
        g is not None and g.dtype == FP32 and torch.isfinite(g).all() for g in grads
    )


def test_describe_names_flags_and_policy(cpu):
    cpu("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    line = hardware.describe()
    assert "avx512_bf16" in line and "amx_bf16" in line
    assert "(auto): bfloat16 -> bfloat16, float16 -> float32" in line
    cpu("avx2")
    assert "no bf16/fp16 units" in hardware.describe()

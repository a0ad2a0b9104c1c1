"""reduce_activation_memory: same loss and gradients, fewer saved bytes; its Functions gradcheck."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import zoo
from conftest import build

import lorakit as lk
from lorakit.memory import (
    ActMulFunction,
    LinearCrossEntropy,
    RMSNorm,
    RMSNormFunction,
    SiLUMulFunction,
)
from lorakit.structure import rms_norm_variant


def test_gradcheck_linear_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([1, 4, -100, 10, 0, -100, 3])
    assert torch.autograd.gradcheck(lambda h, w: LinearCrossEntropy.apply(h, w, y, 3), (h, w))
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    loss = LinearCrossEntropy.apply(h, w, y, 3)
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, (h, w))
    for a, b in zip(grads, torch.autograd.grad(ref, (h, w)), strict=True):
        torch.testing.assert_close(a, b)


def test_gradcheck_linear_cross_entropy_softcapped():
    """Gemma 2's final_logit_softcapping inside the chunks: c·tanh(z / c) before the loss."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([1, 4, -100, 10, 0, -100, 3])
    cap = 2.5

    def fused(h, w):
        return LinearCrossEntropy.apply(h, w, y, 3, True, cap)

    assert torch.autograd.gradcheck(fused, (h, w))
    ref = F.cross_entropy(torch.tanh(h @ w.t() / cap) * cap, y, reduction="sum")
    loss = fused(h, w)
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, (h, w))
    for a, b in zip(grads, torch.autograd.grad(ref, (h, w)), strict=True):
        torch.testing.assert_close(a, b)


def _rms_norm_reference(x, w, eps, offset, cast_first):
    """Plain autograd: LLaMA's (cast_first) and Gemma's / OLMo-2's (not) forward."""
    xf = x.float() if x.dtype != torch.float64 else x
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    scale = w if offset == 0 else offset + w.to(xf.dtype)
    return scale * xhat.to(x.dtype) if cast_first else (scale * xhat).to(x.dtype)


@pytest.mark.parametrize(("offset", "cast_first"), [(0.0, True), (0.0, False), (1.0, False)])
def test_gradcheck_rmsnorm(offset, cast_first):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    args = (1e-6, offset, cast_first)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, *args), (x, w))
    y = RMSNormFunction.apply(x, w, *args)
    ref = _rms_norm_reference(x, w, *args)
    torch.testing.assert_close(y, ref)
    dy = torch.randn(4, 6, dtype=torch.float64, generator=g)
    for a, b in zip(
        torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(ref, (x, w), dy), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu", "relu2"])
def test_gradcheck_act_mul(act):
    """act(g)·u keeping g and u: float64 gradcheck; in float32 the same bits as plain autograd."""
    from transformers.activations import ACT2FN

    from lorakit.structure import activation_grad

    fn = ACT2FN[act]
    grad = activation_grad(fn)  # the aten backward of a known activation, else torch.func.vjp
    assert grad == {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    u = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: ActMulFunction.apply(g, u, fn, grad), (g, u))
    g32, u32 = (t.detach().float().requires_grad_() for t in (g, u))
    dy = torch.randn(4, 6, generator=gen)
    y = ActMulFunction.apply(g32, u32, fn, grad)
    ref = fn(g32) * u32
    assert torch.equal(y, ref)
    for a, b in zip(
        torch.autograd.grad(y, (g32, u32), dy),
        torch.autograd.grad(ref, (g32, u32), dy),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_gradcheck_silu_mul():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    u = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(SiLUMulFunction.apply, (x, u))
    y, ref = SiLUMulFunction.apply(x, u), F.silu(x) * u
    torch.testing.assert_close(y, ref)
    dy = torch.randn(4, 6, dtype=torch.float64, generator=g)
    for a, b in zip(
        torch.autograd.grad(y, (x, u), dy), torch.autograd.grad(ref, (x, u), dy), strict=True
    ):
        torch.testing.assert_close(a, b)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


CASES = [  # (model, method, mlp mode, adapter dropout); GPT-2 has no gated MLP to "elementwise"
    *[(n, m, "recompute", 0.0) for n in ("llama", "gpt2") for m in ("lora", "lora_fa")],
    *[("llama", m, "elementwise", 0.0) for m in ("lora", "lora_fa")],
    ("llama", "lora_fa", "recompute", 0.1),  # dropout masks regenerated in the recompute
    ("gpt2", "lora_fa", "recompute", 0.1),
    ("llama", "lors", "recompute", 0.0),
    ("gpt2", "lors", "recompute", 0.0),
]


@pytest.mark.parametrize(("name", "method", "mlp", "dropout"), CASES)
def test_same_loss_and_grads_fewer_bytes(name, method, mlp, dropout):
    torch.manual_seed(0)
    cfg = lk.LoRAConfig(method=method, rank=4, dropout=dropout)
    base = lk.inject(build(name, method=method), cfg)
    for m in base.modules():  # GPT-2's dropout would draw different masks in the two runs
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for _, layer in lk.adapted_layers(base):
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.02)
    reduced = lk.reduce_activation_memory(copy.deepcopy(base), chunk_size=7, mlp=mlp)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    base.train()
    reduced.train()
    torch.manual_seed(2)  # the same adapter-dropout masks in both runs (and in the recompute)
    loss_a, saved_a = lk.count_saved(base, lambda: _loss(base, ids))
    torch.manual_seed(2)
    loss_b, saved_b = lk.count_saved(reduced, lambda: _loss(reduced, ids))
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    grads_a = {n: p.grad for n, p in base.named_parameters() if p.requires_grad}
    grads_b = {n: p.grad for n, p in reduced.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6)
    assert saved_b < saved_a


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (lambda: build("mlp"), r"got MLP: not a transformers model"),
        (lambda: zoo.build("bert"), r"got BertForSequenceClassification: no causal LM head"),
        (lambda: build("bert"), r"got BertForMaskedLM: no causal LM head"),
    ],
)
def test_rejects_other_models(model, why):
    with pytest.raises(ValueError, match=r"needs a transformers causal LM .*" + why):
        lk.reduce_activation_memory(model())


def test_logits_still_available_without_labels():
    model = lk.reduce_activation_memory(build("llama"))
    ids = torch.randint(0, 128, (1, 8))
    assert model(input_ids=ids).logits.shape == (1, 8, 128)


def test_mlp_recompute_keeps_only_the_mlp_input():
    """mlp="recompute" drops gate and up (2·N·d_ff fp32 values per layer) relative to
    mlp="elementwise" and adds back nothing but the MLP input, which the adapters already keep."""
    torch.manual_seed(0)
    base = lk.inject(build("llama"), lk.LoRAConfig(method="lora_fa", rank=4))
    ids = torch.randint(0, 128, (1, 16))
    saved = {}
    for mode in ("elementwise", "recompute"):
        model = lk.reduce_activation_memory(copy.deepcopy(base), mlp=mode)
        saved[mode] = lk.count_saved(model, lambda m=model: _loss(m, ids))[1]
    cfg = base.config
    layers, n, r = cfg.num_hidden_layers, 16, 4
    gate_up = layers * 2 * n * cfg.intermediate_size * 4
    adapter_h = layers * 2 * n * r * 4  # gate's and up's H = x Aᵀ, recomputed as well
    mlp_in = layers * n * cfg.hidden_size * 4  # the post-attention norm's output
    assert saved["elementwise"] - saved["recompute"] == gate_up + adapter_h - mlp_in


def test_rejects_unknown_mlp_mode():
    with pytest.raises(ValueError, match=r"mlp='fast': expected one of"):
        lk.reduce_activation_memory(build("llama"), mlp="fast")


@pytest.mark.parametrize("order", ["reduce_then_inject", "inject_then_reduce"])
def test_adapted_lm_head_trains_in_either_order(order):
    cfg = lk.LoRAConfig(rank=4, targets=["lm_head", "q_proj"])
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = lk.inject(build("llama"), cfg)
    torch.nn.init.normal_(plain.lm_head.adapters["default"].lora_B, std=0.05)
    if order == "reduce_then_inject":
        reduced = lk.reduce_activation_memory(build("llama"), chunk_size=7)
        lk.inject(reduced, cfg)
        reduced.load_state_dict(plain.state_dict())
    else:
        reduced = lk.reduce_activation_memory(copy.deepcopy(plain), chunk_size=7)
    loss_a, loss_b = _loss(plain, ids), _loss(reduced, ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    head_a, head_b = (m.lm_head.adapters["default"] for m in (plain, reduced))
    assert head_b.lora_B.grad is not None and head_b.lora_B.grad.abs().sum() > 0
    torch.testing.assert_close(head_b.lora_B.grad, head_a.lora_B.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_b.lora_A.grad, head_a.lora_A.grad, rtol=1e-4, atol=1e-6)
    # No (tokens x vocab) logits are kept for backward: the adapted head adds less than them.
    no_head = lk.reduce_activation_memory(build("llama"), chunk_size=7)
    lk.inject(no_head, cfg.replace(targets=["q_proj"]))
    _, saved = lk.count_saved(reduced, lambda: _loss(reduced, ids))
    _, saved_no_head = lk.count_saved(no_head, lambda: _loss(no_head, ids))
    assert saved - saved_no_head < 2 * 15 * 128 * 4


def test_chunked_loss_does_no_gradient_work_without_grad():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.mm += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    h = torch.randn(20, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False)
    labels = torch.randint(0, 30, (20,))
    counts = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad), CountMM() as mode:
            loss, _ = lk.memory.chunked_causal_lm_loss(h[None], head, labels[None], 7)
        counts[grad] = mode.mm
    assert counts[False] == 3  # one logits GEMM per chunk of 7 (19 predicted tokens), no dh
    assert counts[True] == 6


# -- every family of the zoo -------------------------------------------------------------------


def _reduce(model, **kwargs):
    """reduce_activation_memory and the pieces it named as left alone."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.reduce_activation_memory(model, **kwargs)
    return [str(w.message) for w in caught if "reduce_activation_memory" in str(w.message)]


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("method", ["lora", "lora_fa"])
@pytest.mark.parametrize("family", zoo.CAUSAL)
def test_reduce_every_family(family, method):
    """Same loss and gradients as the unreduced model, fewer saved bytes, for every family."""
    cfg = lk.LoRAConfig(method=method, rank=4, alpha=8, targets="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-linear names the MoE experts it skips
        base = _no_dropout(lk.inject(zoo.build(family), cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lk.adapted_layers(base):
            b = layer.adapters["default"].lora_B
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    reduced = copy.deepcopy(base)
    _reduce(reduced, chunk_size=7)
    batch = zoo.batch()
    base.train()
    reduced.train()
    out_a, saved_a = lk.count_saved(base, lambda: base(**batch))
    out_b, saved_b = lk.count_saved(reduced, lambda: reduced(**batch))
    assert out_b.logits is None  # the chunked loss ran
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-5, atol=1e-6)
    out_a.loss.backward()
    out_b.loss.backward()
    grads_a = {n: p.grad for n, p in base.named_parameters() if p.requires_grad}
    grads_b = {n: p.grad for n, p in reduced.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-7, msg=n)
    assert saved_b < saved_a


_SDPA_REFUSED = "does not support sdpa (_supports_sdpa=False); it stays 'eager'"
# family -> (RMSNorms replaced as (offset, cast_first), MLP replaced: (kind, count), note)
PIECES = {
    "llama": ({(0.0, True): 5}, ("gated", 2), None),
    "mistral": ({(0.0, True): 5}, ("gated", 2), None),
    "qwen2": ({(0.0, True): 5}, ("gated", 2), None),
    "qwen3": ({(0.0, True): 9}, ("gated", 2), None),  # q_norm / k_norm over head_dim
    "gemma2": ({(1.0, False): 9}, ("gated", 2), _SDPA_REFUSED),  # GELU-tanh, (1 + w)
    "gemma3_text": ({(1.0, False): 13}, ("gated", 2), None),
    "phi3": ({(0.0, True): 5}, ("fused", 2), None),  # gate_up_proj
    "olmo2": ({(0.0, False): 9}, ("gated", 2), None),  # q/k norms over the projection width
    "gpt_neox": ({}, ("plain", 2), None),  # LayerNorm stays
    "gpt2": ({}, ("plain", 2), None),
    "mixtral": ({(0.0, True): 5}, None, None),  # experts left alone
    "qwen3_moe": ({(0.0, True): 9}, None, None),
    "gpt_oss": ({(0.0, False): 5}, None, _SDPA_REFUSED),  # attention sinks
    "qwen2_moe": ({(0.0, True): 5}, ("gated", 2), None),  # the shared expert
}


@pytest.mark.parametrize("family", zoo.CAUSAL)
def test_pieces_each_family_gets(family):
    norms, mlps, note = PIECES[family]
    model = zoo.build(family)
    attention = model.config._attn_implementation if note else "sdpa"
    notes = _reduce(model)
    assert hasattr(model, "_lorakit_dense_forward")  # the chunked loss
    found: dict = {}
    for m in model.modules():
        if isinstance(m, RMSNorm):
            found[m.offset, m.cast_first] = found.get((m.offset, m.cast_first), 0) + 1
    assert found == norms
    specs = [m._lorakit_mlp for m in model.modules() if "_lorakit_mlp" in m.__dict__]
    kinds = {"gated" if s.gate else "fused" if s.fused else "plain" for s in specs}
    assert (kinds, len(specs)) == (({mlps[0]}, mlps[1]) if mlps else (set(), 0))
    assert model.config._attn_implementation == attention
    assert len(notes) == (note is not None)
    assert note is None or note in notes[0]


@pytest.mark.parametrize("family", [f for f in zoo.CAUSAL if PIECES[f][0]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_replaced_norms_compute_what_the_family_computes(family, dtype):
    """Bit for bit in bf16 (the cast order of each family), to float rounding in fp32."""
    model = zoo.build(family).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g))
    before = dict(model.named_modules())
    _reduce(model, chunked_loss=False, mlp=None, attention=None)
    replaced = {n: m for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    assert replaced
    for name, norm in replaced.items():
        x = torch.randn(3, norm.weight.shape[0], generator=g).to(dtype)
        ours, theirs = norm(x), before[name](x)
        assert ours.dtype == theirs.dtype
        if dtype == torch.bfloat16:
            assert torch.equal(ours, theirs), name
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_norm_probe_refuses_what_it_cannot_reproduce():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class OwnEps(LlamaRMSNorm):  # reports eps 1e-3, computes with 1e-6
        def forward(self, x):
            xf = x.float()
            return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))

    assert rms_norm_variant(LlamaRMSNorm(8)) == (0.0, True)
    assert rms_norm_variant(OwnEps(8, eps=1e-3)) is None
    assert rms_norm_variant(torch.nn.LayerNorm(8, bias=False)) is None


class _SumGated(torch.nn.Module):
    """gate/up/down and an activation, but act(gate)+up: not a product to recompute."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(4, 6), torch.nn.Linear(4, 6)
        self.down_proj, self.act_fn = torch.nn.Linear(6, 4), torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


class _Swapped(_SumGated):
    """The names say nothing: the activation is applied to up_proj's output."""

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_mlp_probe_finds_roles_by_what_the_forward_computes():
    from lorakit.structure import MLPSpec, mlp_spec

    assert mlp_spec(_SumGated()) is None
    swapped = _Swapped()
    assert mlp_spec(swapped) == MLPSpec("gate_proj", "down_proj", "act_fn", "up_proj", grad="silu")
    llama_mlp = zoo.build("llama").model.layers[0].mlp
    assert mlp_spec(llama_mlp) == MLPSpec(
        "up_proj", "down_proj", "act_fn", "gate_proj", grad="silu"
    )


def test_head_side_scaling_keeps_the_models_own_loss():
    """A piece the chunked loss cannot reproduce is named; norms, MLP, attention still reduce."""
    model = zoo.build("llama")
    model.config.logits_scaling = 4.0
    notes = _reduce(model)
    assert len(notes) == 1 and "logits_scaling=4.0 scales the logits" in notes[0]
    assert not hasattr(model, "_lorakit_dense_forward")
    assert any(isinstance(m, RMSNorm) for m in model.modules())
    assert "_lorakit_mlp" in model.model.layers[0].mlp.__dict__
    biased = zoo.build("llama")
    biased.lm_head = torch.nn.Linear(32, zoo.VOCAB)
    assert "the LM head has a bias" in _reduce(biased)[0]
    assert not hasattr(biased, "_lorakit_dense_forward")


def test_plain_lm_head_gates_the_evaluation_loss():
    from lorakit.evaluate import _plain_head

    llama, gemma3 = zoo.build("llama"), zoo.build("gemma3_text")
    assert _plain_head(llama) is llama.lm_head
    assert _plain_head(gemma3) is gemma3.lm_head  # no soft-capping configured
    assert _plain_head(zoo.build("gemma2")) is None  # final_logit_softcapping=30
    assert _plain_head(zoo.build("bert")) is None
    assert _plain_head(build("mlp")) is None


@pytest.mark.parametrize("family", zoo.CAUSAL)
def test_evaluation_loss_of_every_family(family):
    """token_losses (its chunked no-grad loss where the head is plain) equals the model's own."""
    from lorakit.evaluate import token_losses

    model, batch = zoo.build(family), zoo.batch()
    with torch.no_grad():
        total, n = token_losses(model, batch)
        ref = model(**batch).loss
    torch.testing.assert_close(total / n, ref, rtol=1e-5, atol=1e-6)


def test_router_aux_loss_is_the_models_own():
    """An MoE model adds router_aux_loss_coef x its aux loss when router logits are asked for:
    those calls compute the model's own loss; the others the chunked one."""
    base = zoo.build("mixtral", router_aux_loss_coef=0.5)
    reduced = copy.deepcopy(base)
    assert _reduce(reduced) == []
    batch = zoo.batch()
    with_aux = reduced(**batch, output_router_logits=True)
    assert with_aux.logits is not None
    torch.testing.assert_close(with_aux.loss, base(**batch, output_router_logits=True).loss)
    chunked = reduced(**batch)
    assert chunked.logits is None
    torch.testing.assert_close(chunked.loss, base(**batch).loss)
    by_config = zoo.build("mixtral", router_aux_loss_coef=0.5, output_router_logits=True)
    notes = _reduce(copy.deepcopy(by_config))
    assert "output_router_logits=True" in notes[0]


def test_fake_model_gets_the_same_pieces():
    """The planner reduces a model on fake tensors: the probes still run (on real ones)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = zoo.build("gemma2")
        _reduce(fake)
    norms = [m for m in fake.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 9 and {(m.offset, m.cast_first) for m in norms} == {(1.0, False)}
    assert sum("_lorakit_mlp" in m.__dict__ for m in fake.modules()) == 2


@pytest.mark.parametrize("mlp", ["recompute", "elementwise"])
@pytest.mark.parametrize("family", zoo.CAUSAL)
def test_norms_and_mlps_are_bit_exact_in_bf16(family, mlp):
    """The replaced norms and MLPs run the model's own kernels in its own cast order: in bf16
    the loss is the same bits (the chunked loss, computed in fp32, is left out); gradients
    (fp32 adapters) agree to float rounding (bit for bit on this CPU)."""
    cfg = lk.LoRAConfig(method="lora", rank=4, alpha=8, targets="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = _no_dropout(lk.inject(zoo.build(family), cfg)).to(torch.bfloat16)
    for _, layer in lk.adapted_layers(base):
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.02)
    reduced = copy.deepcopy(base)
    _reduce(reduced, chunked_loss=False, attention=None, mlp=mlp)
    batch = zoo.batch()
    losses = [m.train()(**batch).loss for m in (base, reduced)]
    assert torch.equal(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for (n, a), b in zip(base.named_parameters(), reduced.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=n)

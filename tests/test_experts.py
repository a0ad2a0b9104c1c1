"""LoRA / LoRA-FA on MoE experts kept as fused 3-D tensors (lorakit.experts)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import zoo

import lorakit as lk
from lorakit.experts import AdaptedExperts
from lorakit.methods.experts import GroupedLoRAFunction, groups
from lorakit.moe_format import from_peft, to_peft
from lorakit.profile import count_saved

EXPERTS = ["all-linear", "experts.gate_up_proj", "experts.down_proj"]
MOE = ("mixtral", "qwen3_moe", "gpt_oss")


def _perturb(model, seed=3, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _adapted(family, method="lora", targets=EXPERTS, **kw):
    model = zoo.build(family)
    return lk.inject(model, lk.LoRAConfig(method=method, rank=2, alpha=4, targets=targets, **kw))


def _experts(model):
    return [m for m in model.modules() if isinstance(m, AdaptedExperts)]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("keep", ["x", "h", "none"])
def test_gradcheck_grouped_function(transposed, keep):
    g = torch.Generator().manual_seed(0)
    e, n_in, n_out, r, counts = 3, 5, 4, 2, [2, 0, 3]
    shape = (e, n_in, n_out) if transposed else (e, n_out, n_in)
    x = torch.randn(sum(counts), n_in, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(shape, dtype=torch.float64, generator=g)
    b = torch.randn(e, n_out, dtype=torch.float64, generator=g)
    A = torch.randn(e, r, n_in, dtype=torch.float64, generator=g, requires_grad=keep == "x")
    B = torch.randn(e, n_out, r, dtype=torch.float64, generator=g, requires_grad=True)

    if keep == "none":
        A, B = torch.zeros_like(A), torch.zeros_like(B)

    def run(x, *ab):
        if keep == "none":
            return GroupedLoRAFunction.apply(
                x, w, b, None, None, groups(counts), 1.0, transposed, keep
            )
        a = ab[0] if keep == "x" else A
        return GroupedLoRAFunction.apply(x, w, b, a, ab[-1], groups(counts), 0.7, transposed, keep)

    inputs = {"x": (x, A, B), "h": (x, B), "none": (x,)}[keep]
    assert torch.autograd.gradcheck(run, inputs)
    # plain autograd, expert by expert
    want, lo = [], 0
    for i, n in enumerate(counts):
        we = w[i] if transposed else w[i].t()
        xe = x[lo : lo + n]
        want.append(xe @ we + b[i] + 0.7 * (xe @ A[i].t()) @ B[i].t())
        lo += n
    want = torch.cat(want)
    got = run(*inputs)
    torch.testing.assert_close(got, want)
    gw = torch.autograd.grad(want.square().sum(), inputs)
    gg = torch.autograd.grad(got.square().sum(), inputs)
    for a, c in zip(gw, gg, strict=True):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_same_loss_and_grads_as_plain_autograd(family, method):
    """Against the experts' own forward with W_e + s·B_e A_e written into each slice."""
    batch = zoo.batch()
    model = _adapted(family, method)
    _perturb(model)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    ref = zoo.build(family)
    ref.train()
    mods = dict(ref.named_modules())
    deltas = {}
    for path, exp in model.named_modules():
        if not isinstance(exp, AdaptedExperts):
            continue
        for t, a in exp.adapters["default"].items():
            B = a.lora_B.detach().clone().requires_grad_(True)
            delta = torch.bmm(B, a.lora_A.detach()) * a.scaling
            delta = delta.transpose(1, 2) if exp.is_transposed else delta
            param = getattr(mods[path], t)
            del mods[path]._parameters[t]
            setattr(mods[path], t, param.detach() + delta)
            deltas[f"{path}.{t}"] = (B, a.lora_B)
    # the attention adapters, as plain linear LoRA
    plain = copy.deepcopy(model)
    for path, exp in list(plain.named_modules()):
        if isinstance(exp, AdaptedExperts):
            parent, _, leaf = path.rpartition(".")
            setattr(plain.get_submodule(parent), leaf, mods[path])
    ref_loss = plain(**batch).loss
    torch.testing.assert_close(ref_loss, loss, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(ref_loss, [b for b, _ in deltas.values()])
    for g, (_, ours) in zip(grads, deltas.values(), strict=True):
        torch.testing.assert_close(ours.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_peft_both_ways_and_merge(family, method, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    batch = zoo.batch()
    model = _adapted(family, method)
    _perturb(model)
    ours = model(**batch).logits
    lk.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    peft = PeftModel.from_pretrained(zoo.build(family), tmp_path / "ours")
    torch.testing.assert_close(peft(**batch).logits, ours, rtol=0, atol=1e-5)
    back = lk.load_adapter(zoo.build(family), tmp_path / "ours")
    assert torch.equal(back(**batch).logits, ours)

    theirs = get_peft_model(
        zoo.build(family),
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        ),
    )
    _perturb(theirs, seed=5)
    want = theirs(**batch).logits
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lk.load_adapter(zoo.build(family), tmp_path / "peft")
    torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=1e-5)
    merged = lk.merge(loaded)
    assert not _experts(merged)
    torch.testing.assert_close(merged(**batch).logits, want, rtol=0, atol=1e-5)


def test_layouts_round_trip():
    model = _adapted("mixtral")
    lora = _experts(model)[0].adapters["default"]["gate_up_proj"]
    _perturb(model)
    A, B = to_peft(lora)
    e, out, r = lora.lora_B.shape
    assert A.shape == (e * r, lora.lora_A.shape[2]) and B.shape == (out, r * e)
    # PEFT's column k·E + e holds expert e's k-th column of B
    assert torch.equal(B[:, 1 * e + 2], lora.lora_B[2, :, 1])
    A2, B2 = from_peft(A, B, e)
    assert torch.equal(A2, lora.lora_A) and torch.equal(B2, lora.lora_B)


def test_all_linear_warns_and_skips_experts_and_gates():
    with pytest.warns(UserWarning, match=r"skipped 4 MoE expert tensors.*experts\.gate_up_proj"):
        model = _adapted("qwen2_moe", targets="all-linear")
    assert not _experts(model)
    names = {n for n, _ in lk.adapted_layers(model)}
    assert not any(n.endswith(("shared_expert_gate", ".gate")) for n in names)
    assert any(n.endswith("shared_expert.gate_proj") for n in names)


def test_router_never_adapted_and_experts_by_module_name():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _adapted("mixtral", targets=["experts"])
    (first, second) = _experts(model)
    assert list(first.adapters["default"]) == ["gate_up_proj", "down_proj"]
    assert not list(lk.adapted_layers(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_identity_at_init_and_only_routed_tokens_matter():
    batch = zoo.batch()
    base = zoo.build("qwen3_moe")(**batch).logits
    model = _adapted("qwen3_moe", "lora_fa", targets=["experts.down_proj"])
    assert torch.equal(model(**batch).logits, base)
    # an expert no token is routed to changes nothing
    exp = _experts(model)[0]
    captured = {}
    hook = exp.register_forward_hook(lambda m, a, o: captured.update(index=a[1]))
    model(**batch)
    hook.remove()
    unused = sorted(set(range(exp.num_experts)) - set(captured["index"].unique().tolist()))
    if unused:
        with torch.no_grad():
            exp.adapters["default"]["down_proj"].lora_B[unused[0]].fill_(1.0)
        assert torch.equal(model(**batch).logits, base)


def test_lora_fa_keeps_h_not_x():
    batch = zoo.batch(b=2, s=16)

    def saved(method):
        model = _adapted("mixtral", method, targets=["experts"])
        _perturb(model)
        model.train()
        return count_saved(model, lambda: model(**batch).loss)[1]

    lora, fa = saved("lora"), saved("lora_fa")
    # per layer, LoRA keeps the routed inputs of both projections (N·(H + I) fp32 numbers) where
    # LoRA-FA keeps N·r for each; N = tokens x 2 experts per token; 2 layers
    n, hidden, inter, r, layers = 2 * 16 * 2, 32, 48, 2, 2
    assert lora - fa == layers * 4 * n * (hidden + inter - 2 * r)


def test_merge_and_unmerge_exact():
    batch = zoo.batch()
    model = _adapted("gpt_oss")
    _perturb(model)
    before = model(**batch).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "proj" in n}
    for exp in _experts(model):
        exp.merge()
        exp.merge()  # idempotent
    torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-5)
    for exp in _experts(model):
        exp.unmerge()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r"'lors' cannot adapt the MoE expert tensor"):
        _adapted("mixtral", "lors", targets=["experts"])
    with pytest.raises(ValueError, match=r"dropout is not supported on MoE expert tensors"):
        _adapted("mixtral", targets=["experts"], dropout=0.1)
    with pytest.raises(ValueError, match=r"rank must be a positive int <= min\(in, out\)"):
        zoo_model = zoo.build("mixtral")
        lk.inject(zoo_model, lk.LoRAConfig(rank=40, targets=["experts.down_proj"]))
    assert not _experts(zoo_model)


def test_load_refuses_target_parameters_the_model_lacks(tmp_path):
    model = _adapted("mixtral")
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_parameters"] = ["experts.w13"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'experts.w13' selects no MoE expert tensor"):
        lk.load_adapter(zoo.build("mixtral"), tmp_path)


@pytest.mark.parametrize("family", zoo.MOE)
def test_grouped_routing_reproduces_the_experts_forward(family):
    from lorakit.experts import group_routing

    batch = zoo.batch(b=3, s=16)
    want = zoo.build(family)(**batch).logits
    model = zoo.build(family)
    assert group_routing(model) == 2
    # the same function; GEMMs on row slices of one buffer may round differently (~1e-9)
    torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=1e-6)
    assert not list(lk.adapted_layers(model))
    assert set(dict(model.state_dict())) == set(dict(zoo.build(family).state_dict()))


@pytest.mark.parametrize(
    "family,method,router",
    [("mixtral", "lora", "gate"), ("mixtral", "lora_fa", "gate"), ("gpt_oss", "lora", "router")],
)
def test_router_adapted_only_when_named_and_peft_reads_it(family, method, router, tmp_path):
    from peft import PeftModel

    from lorakit.routers import AdaptedRouter

    batch = zoo.batch()
    base = zoo.build(family)(**batch).logits
    model = _adapted(family, method, targets=["q_proj", f"{router}.weight"])
    routers = [m for m in model.modules() if isinstance(m, AdaptedRouter)]
    assert len(routers) == 2 and not _experts(model)
    assert torch.equal(model(**batch).logits, base)
    _perturb(model)
    ours = model(**batch).logits
    assert not torch.allclose(ours, base)
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"{router}.weight"]
    peft = PeftModel.from_pretrained(zoo.build(family), tmp_path)
    torch.testing.assert_close(peft(**batch).logits, ours, rtol=0, atol=1e-5)
    model.train()
    model(**batch).loss.backward()
    assert all(r.adapters["default"].lora_B.grad.abs().sum() > 0 for r in routers)
    merged = lk.merge(model)
    assert not [m for m in merged.modules() if isinstance(m, AdaptedRouter)]
    torch.testing.assert_close(merged(**batch).logits, ours, rtol=0, atol=1e-5)

"""A 4-bit frozen base (QLoRA): the contract of every method on bitsandbytes Linear4bit layers."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import METHODS, build, logits, perturb, tiny_llama

import lorakit as lk
from lorakit import quant
from lorakit.bitmask import pack_mask

bnb = pytest.importorskip("bitsandbytes")


def quantized(method: str = "lora", quant_type: str = "nf4", double_quant: bool = True):
    """(full-precision model, its 4-bit copy quantized by lorakit) of a tiny LLaMA; pruned 50 %
    first for LoRS. Widths are multiples of 64 (bitsandbytes' block), where bitsandbytes' own
    CPU kernels are right on every CPU (see test_dense_is_bitsandbytes_dequantization)."""
    torch.manual_seed(0)
    full = tiny_llama(hidden_size=64, intermediate_size=128).eval()
    if lk.LoRAConfig(method=method).capabilities.sparse_base:
        lk.prune(full, "magnitude", 0.5, progress=False)
    return full, lk.quantize(copy.deepcopy(full), quant_type, double_quant=double_quant)


def packed(model) -> dict[str, torch.Tensor]:
    """Every 4-bit weight's bytes and block scales (what must never change in training)."""
    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if quant.is_quantized(w):
            out[n] = w.data.clone()
            out[n + ".absmax"] = w.quant_state.absmax.clone()
    return out


def table_dequantization(p) -> torch.Tensor:
    """A 4-bit weight dequantized from first principles: each 4-bit code (high nibble first)
    looked up in the data type's 16 values, times its block's absmax."""
    qs = p.quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    codes = p.data.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack((codes // 16, codes % 16), dim=1).reshape(-1)[: qs.shape.numel()]
    values = bnb.functional.get_4bit_type(qs.quant_type, device="cpu")[nibbles]
    blocks = torch.arange(qs.shape.numel()) // qs.blocksize
    return (values * absmax.float()[blocks]).view(qs.shape)


@pytest.mark.parametrize("shape", [(48, 128), (48, 32), (16, 96), (7, 200)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dense_is_bitsandbytes_dequantization(shape, quant_type, double_quant):
    """Exact on every shape, blocks of 64 straddling rows included: bitsandbytes 0.50's AVX-512
    CPU kernel scales those wrongly ((48, 32): 40 % of the largest weight), so lorakit dequantizes
    them by table; where rows hold whole blocks the kernel is used and is exact."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    p = bnb.nn.Params4bit(
        w, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
    ).to("cpu")
    expected = table_dequantization(p)
    assert torch.equal(quant.dense(p, torch.float32), expected)
    if shape[1] % 64 == 0:
        assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), expected)
    assert quant.dense_shape(p) == w.shape and quant.dense_dtype(p) == torch.float32
    assert (expected - w).abs().max() < 0.2 * w.abs().max()  # it is a 4-bit approximation


def test_straddling_blocks_warn_only_where_the_kernels_are_wrong():
    """A 32-wide model straddles blocks of 64: on an AVX-512 CPU bitsandbytes' own forward is
    wrong there (a warning says so), and lorakit's adapted layers compute it exactly anyway."""
    import warnings

    torch.manual_seed(0)
    model = tiny_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.quantize(model)
    ours = [w for w in caught if "not a multiple of the 4-bit block" in str(w.message)]
    assert len(ours) == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    lk.inject(model, lk.LoRAConfig(rank=4))
    layer = model.model.layers[0].mlp.down_proj  # (32, 48): blocks straddle its rows
    x = torch.randn(3, 48)
    with torch.no_grad():  # B = 0: the base alone, from its table dequantization
        torch.testing.assert_close(layer(x), x @ table_dequantization(layer.weight).t())


def test_quantize_matches_transformers_loading(tiny, ids):
    """lk.quantize and BitsAndBytesConfig(load_in_4bit=True) give the same 4-bit model."""
    ours, _ = lk.load_model(tiny)
    lk.quantize(ours, "nf4")
    theirs, _ = lk.load_model(tiny, quantize="nf4")
    a, b = packed(ours), packed(theirs)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # 7 projections x 2 blocks, no head
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert lk.count_parameters(ours)[1] == lk.count_parameters(lk.load_model(tiny)[0])[1]
    assert type(ours.lm_head) is torch.nn.Linear and type(theirs.lm_head) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_and_merge(method, ids):
    full, model = quantized(method)
    with torch.no_grad():
        base = logits(model, ids)
    lk.inject(model, lk.LoRAConfig(method=method, rank=4))
    with torch.no_grad():
        assert torch.equal(logits(model, ids), base)  # B = 0: exactly the 4-bit model
    perturb(model, scale=0.1)
    with torch.no_grad():
        unmerged = logits(model, ids)
        assert (unmerged - base).abs().max() > 1e-2
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="cannot merge an adapter into a 4-bit weight in place"):
        layer.merge()
    lk.merge(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not packed(model)  # every adapted layer became a plain layer
    with torch.no_grad():
        merged = logits(model, ids)
    # Documented tolerance: the same function, dequantize(W) + s·B A folded into one weight.
    err = (merged - unmerged).abs().max().item()
    assert err < 1e-5, err


@pytest.mark.parametrize("method", METHODS)
def test_saved_bytes_and_grads_equal_the_dequantized_model(method, ids):
    """The 4-bit base saves exactly what the same model in full precision saves (LoRA: x;
    LoRA-FA: H; LoRS: x; never a weight), and gets the same gradients from plain autograd."""
    _, model = quantized(method)
    dense = lk.dequantize(copy.deepcopy(model))
    assert packed(model) and not packed(dense)
    for m in (model, dense):
        lk.inject(m, lk.LoRAConfig(method=method, rank=4))
        perturb(m, scale=0.1)  # the same values in both
    for (_, q), (_, d) in zip(lk.adapted_layers(model), lk.adapted_layers(dense), strict=True):
        if method == "lors":  # the pruned M, not the dequantized weight's zeros
            d.adapters["default"].mask_bits = q.adapters["default"].mask_bits
    model.train(), dense.train()
    loss4, saved4 = lk.count_saved(model, lambda: logits(model, ids).square().mean())
    lossd, savedd = lk.count_saved(dense, lambda: logits(dense, ids).square().mean())
    assert saved4 == savedd
    torch.testing.assert_close(loss4, lossd, rtol=1e-6, atol=1e-6)
    loss4.backward(), lossd.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    dgrads = {n: p.grad for n, p in dense.named_parameters() if p.grad is not None}
    assert grads.keys() == dgrads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], dgrads[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, keeps", [("lora", "x"), ("lora_fa", "H")])
def test_one_layer_keeps_x_or_h_only(method, keeps):
    lin = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False))
    lk.quantize(lin, "nf4")
    lk.inject(lin, lk.LoRAConfig(method=method, rank=4, targets=["0"]))
    x = torch.randn(10, 64, requires_grad=True)
    _, saved = lk.count_saved(lin, lambda: lin(x).sum())
    assert saved == (10 * 64 * 4 if keeps == "x" else 10 * 4 * 4)


@pytest.mark.parametrize("method", METHODS)
def test_base_bytes_unchanged_by_training(method, ids):
    _, model = quantized(method)
    before = packed(model)
    lk.inject(model, lk.LoRAConfig(method=method, rank=4))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        logits(model, ids).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    after = packed(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lors_keeps_the_pruned_pattern_not_the_quantized_zeros(ids, tmp_path):
    full = build("llama", method="lors")
    with torch.no_grad():  # kept weights small enough to round to 0 in 4 bits
        w = full.model.layers[0].self_attn.q_proj.weight
        rows, cols = (w != 0).nonzero()[:5].t()
        w[rows, cols] = 1e-6
    model = lk.quantize(copy.deepcopy(full))
    lk.inject(model, lk.LoRAConfig(method="lors", rank=4))
    perturb(model, scale=0.1)
    extra = 0
    for path, layer in lk.adapted_layers(model):
        fp = full.get_submodule(path).weight
        assert torch.equal(layer.adapters["default"].mask_bits, pack_mask(fp))
        extra += int(((quant.dense(layer.weight, torch.float32) == 0) & (fp != 0)).sum())
    assert extra == 5  # rounding made zeros the pattern does not contain
    lk.save_adapter(model, tmp_path)
    # Merged onto the full-precision pruned base: still exactly its zeros.
    merged = lk.merge(lk.load_adapter(copy.deepcopy(full), tmp_path))
    for path, _ in lk.adapted_layers(model):
        fp, w = full.get_submodule(path).weight, merged.get_submodule(path).weight
        assert torch.equal(w == 0, fp == 0)
    # lk.merge on the 4-bit model: dequantized weights, the pruned zeros kept.
    with torch.no_grad():
        unmerged = logits(model, ids)
    lk.merge(model)
    for path in [p for p, m in full.named_modules() if type(m) is torch.nn.Linear][:-1]:
        assert bool(
            (model.get_submodule(path).weight[full.get_submodule(path).weight == 0] == 0).all()
        )
    with torch.no_grad():
        assert (logits(model, ids) - unmerged).abs().max() < 1e-5


def test_lors_refuses_a_4bit_base_without_its_pattern(tiny, tmp_path):
    pruned, tok = lk.load_model(tiny)
    lk.prune(pruned, "magnitude", 0.5, progress=False)
    pruned.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = lk.load_model(tmp_path, quantize="nf4")
    with pytest.raises(ValueError, match="LoRS needs the pruned model's zero pattern"):
        lk.inject(model, lk.LoRAConfig(method="lors"))
    unpruned = lk.quantize(tiny_llama(64, 128))
    with pytest.raises(ValueError, match="none of the .* target layers has a zero weight"):
        lk.inject(unpruned, lk.LoRAConfig(method="lors"))


def test_bad_quantize_requests(tiny, monkeypatch):
    with pytest.raises(ValueError, match=r"quantize must be one of \['nf4', 'fp4'\], got 'nf3'"):
        lk.quantize(tiny_llama(), "nf3")
    with pytest.raises(ValueError, match="8-bit bases are not supported"):
        lk.load_model(tiny, quantize="int8")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model8 = AutoModelForCausalLM.from_pretrained(
        tiny, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    with pytest.raises(ValueError, match="8-bit bases are not supported.*LLM.int8"):
        lk.inject(model8, lk.LoRAConfig())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes==0.50.2"):
        lk.quantize(tiny_llama())


def test_peft_qlora_adapters_load_both_ways(tiny, ids, tmp_path):
    peft = pytest.importorskip("peft")
    ids = ids % 1000
    model, _ = lk.load_model(tiny, quantize="nf4")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    theirs = peft.get_peft_model(model, cfg).eval()
    with torch.no_grad():
        expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(lk.load_model(tiny, quantize="nf4")[0], tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)

    ours = lk.inject(lk.load_model(tiny, quantize="nf4")[0], lk.LoRAConfig(method="lora_fa"))
    perturb(ours, scale=0.1)
    with torch.no_grad():
        expected = logits(ours, ids)
    lk.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(lk.load_model(tiny, quantize="nf4")[0], tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(logits(back.eval(), ids), expected, rtol=0, atol=1e-5)


def _train(tiny, data, out, *extra):
    from lorakit.cli import main

    common = ["--model", str(tiny), "--data", str(data), "--max-len", "32", "--no-progress"]
    args = ["train", *common, "--rank", "4", "--max-steps", "2", "--batch-size", "4"]
    return main([*args, "--output", str(out), "--quantize", "nf4", *extra])


def test_cli_trains_evaluates_and_merges_on_a_4bit_base(tiny, tmp_path, capsys):
    import json

    from lorakit.cli import main

    data = tmp_path / "text.txt"
    data.write_text("to be or not to be, that is the question. " * 200)
    assert _train(tiny, data, tmp_path / "run", "--method", "lora_fa") == 0
    import yaml

    run = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run["quantize"] == "nf4" and run["double_quant"] is True
    capsys.readouterr()
    evaluate = ["eval", "--model", str(tiny), "--data", str(data), "--perplexity"]
    assert main([*evaluate, "--adapter", str(tmp_path / "run" / "adapter")]) == 0
    full = json.loads(capsys.readouterr().out)["perplexity"]
    assert (
        main([*evaluate, "--adapter", str(tmp_path / "run" / "adapter"), "--quantize", "nf4"]) == 0
    )
    four = json.loads(capsys.readouterr().out)["perplexity"]
    assert abs(four / full - 1) < 0.05  # the same adapter on the 4-bit and the 16/32-bit base
    merged = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--model",
                str(tiny),
                "--adapter",
                str(tmp_path / "run" / "adapter"),
                "--output",
                str(merged),
            ]
        )
        == 0
    )
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    # A merged 4-bit model saves as a plain model too.
    model, tok = lk.load_model(tiny, quantize="nf4")
    lk.merge(lk.load_adapter(model, tmp_path / "run" / "adapter"))
    model.save_pretrained(tmp_path / "merged4")
    assert "quantization_config" not in json.loads(
        (tmp_path / "merged4" / "config.json").read_text()
    )


def test_cli_lors_on_a_4bit_pruned_base(tiny, tmp_path):
    from lorakit.cli import main

    pruned = tmp_path / "pruned"
    assert (
        main(["prune", "--model", str(tiny), "--method", "magnitude", "--output", str(pruned)]) == 0
    )
    data = tmp_path / "text.txt"
    data.write_text("to be or not to be, that is the question. " * 200)
    assert _train(pruned, data, tmp_path / "run", "--method", "lors") == 0
    model, _ = lk.load_model(pruned)
    zeros = {
        p: model.get_submodule(p).weight == 0
        for p, _ in lk.adapted_layers(lk.load_adapter(model, tmp_path / "run" / "adapter"))
    }
    lk.merge(model)
    assert zeros and all(
        torch.equal(model.get_submodule(p).weight == 0, z) for p, z in zeros.items()
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--method", "full"], "a 4-bit weight has no gradient"),
        (["--strategy", "fsdp"], "FSDP2 cannot shard bitsandbytes' 4-bit weights.*strategy=ddp"),
    ],
)
def test_cli_refuses_what_a_4bit_base_cannot_do(tiny, tmp_path, capsys, extra, match):
    import re

    data = tmp_path / "text.txt"
    data.write_text("to be or not to be " * 100)
    assert _train(tiny, data, tmp_path / "run", *extra) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_adapter_dtype_is_peft_qlora_s(tiny, dtype):
    """On a 4-bit base the adapters follow the dtype the weights had before quantization: fp32
    on a bf16 or fp32 model, as PEFT's QLoRA keeps them; an explicit dtype still wins."""
    peft = pytest.importorskip("peft")

    def adapter_dtypes(model):
        return {
            t.dtype for _, layer in lk.adapted_layers(model) for t in layer.adapters.parameters()
        }

    model, _ = lk.load_model(tiny, quantize="nf4", dtype=dtype)
    assert quant.dense_dtype(model.model.layers[0].self_attn.q_proj.weight) == dtype
    ours = lk.inject(model, lk.LoRAConfig(rank=4))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    theirs = peft.get_peft_model(lk.load_model(tiny, quantize="nf4", dtype=dtype)[0], cfg)
    assert adapter_dtypes(ours) == {p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert adapter_dtypes(ours) == {torch.float32}
    # A model quantized in memory (lk.quantize) the same; trained, its gradients are fp32.
    torch.manual_seed(0)
    mem = lk.quantize(tiny_llama(hidden_size=64, intermediate_size=128).to(dtype))
    lk.inject(mem, lk.LoRAConfig(rank=4))
    assert adapter_dtypes(mem) == {torch.float32}
    ids = torch.randint(0, 128, (2, 8))
    mem.train()
    mem(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in mem.parameters() if p.requires_grad]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    explicit = lk.inject(
        lk.quantize(tiny_llama(64, 128).to(dtype)), lk.LoRAConfig(rank=4, adapter_dtype="bfloat16")
    )
    assert adapter_dtypes(explicit) == {torch.bfloat16}

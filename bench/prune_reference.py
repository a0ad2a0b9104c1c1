"""Driver for the reference pruning code, locuslab/wanda (``lib/prune.py``, ``lib/sparsegpt.py``),
run locally as a peer of ``lorakit.prune``. Its code is not vendored: :func:`checkout` extracts
``lib/`` at a pinned commit from a git copy of the repository into a /tmp folder (recreated when
missing) and it is imported from there, unmodified. Only its surroundings are adapted:

- ``lib.data`` (a C4 loader that downloads from a hub) is replaced by a module whose
  ``get_loaders`` hands back the given local calibration windows, one (input, target) pair per
  window as its own loader does.
- It was written for older transformers: its ``Catcher`` keeps only ``attention_mask`` and
  ``position_ids`` and calls each layer with those two, but current LLaMA decoder layers also need
  ``position_embeddings`` (and take more keywords). The driver captures every keyword argument
  the model passes to the first layer and fills in the missing ones on every layer call.
- ``.cuda()`` and ``torch.cuda.synchronize()`` are no-ops on a machine without CUDA.
- ``model.seqlen`` and ``model.hf_device_map``, which its ``main.py`` sets, are set.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

REPO = "locuslab/wanda"
COMMIT = "8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6"
# A bare git copy of the repository (what the session's fetch tool leaves), else a clone.
GIT_DIR = Path(os.environ.get("WANDA_GIT", "/work/.mirror/locuslab+wanda/repo"))
ROOT = Path("/tmp/lorakit-wanda-ref") / COMMIT[:12]
PACKAGE = "wanda_ref"  # its lib/, under a name that cannot clash with anything installed


def checkout() -> Path:
    """Extract the reference's lib/ at COMMIT into ROOT/wanda_ref (once); return ROOT."""
    target = ROOT / PACKAGE
    if (target / "prune.py").exists():
        return ROOT
    git_dir = GIT_DIR
    if not git_dir.exists():  # no local copy: clone it (needs the network)
        git_dir = ROOT.parent / "wanda.git"
        if not git_dir.exists():
            subprocess.run(
                ["git", "clone", "--bare", f"https://github.com/{REPO}", str(git_dir)], check=True
            )
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", f"--git-dir={git_dir}", "archive", COMMIT, "lib"], check=True, capture_output=True
    ).stdout
    subprocess.run(
        ["tar", "-x", "-C", str(target), "--strip-components=1"], input=archive, check=True
    )
    return ROOT


def _local_loaders(windows: torch.Tensor) -> types.ModuleType:
    """Stand-in for the reference's lib/data.py: get_loaders returns the given windows."""
    module = types.ModuleType(f"{PACKAGE}.data")

    def get_loaders(name, nsamples=128, seed=0, seqlen=2048, tokenizer=None):
        loader = []
        for w in windows[:nsamples]:
            inp = w[None].clone()  # (1, seqlen)
            tar = inp.clone()
            tar[:, :-1] = -100
            loader.append((inp, tar))
        return loader, None

    module.get_loaders = get_loaders
    return module


def reference(windows: torch.Tensor) -> types.ModuleType:
    """The reference's ``prune`` module, its calibration loader serving ``windows``."""
    sys.path.insert(0, str(checkout()))
    sys.modules[f"{PACKAGE}.data"] = _local_loaders(windows)
    for name in ("prune", "sparsegpt", "layerwrapper", "ablate"):
        sys.modules.pop(f"{PACKAGE}.{name}", None)
    return importlib.import_module(f"{PACKAGE}.prune")


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _modern_layers(model: nn.Module, windows: torch.Tensor):
    """Fill the keyword arguments the reference does not pass (position_embeddings, ...) into
    every decoder-layer call, from those the model itself passes to its first layer."""
    layers = model.model.layers
    captured: dict = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    with contextlib.suppress(_Stop), torch.no_grad():
        model(input_ids=windows[:1].to(device), use_cache=False)
    handle.remove()
    captured.pop("hidden_states", None)

    def fill(module, args, kwargs):
        return args, {**captured, **kwargs}

    handles = [layer.register_forward_pre_hook(fill, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _without_cuda():
    """``.cuda()`` and ``torch.cuda.synchronize()`` as no-ops when there is no CUDA device."""
    if torch.cuda.is_available():
        yield
        return
    cuda, sync = torch.Tensor.cuda, torch.cuda.synchronize
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.synchronize = cuda, sync


def prune(model: nn.Module, method: str, sparsity: float | str, windows: torch.Tensor) -> None:
    """Prune ``model`` in place with the reference's prune_magnitude / prune_wanda /
    prune_sparsegpt, calibrated on ``windows`` (n, seq) token ids. ``sparsity``: 0.5 or "N:M"."""
    ref = reference(windows)
    if isinstance(sparsity, str):
        n, m = map(int, sparsity.split(":"))
        ratio, prune_n, prune_m = 1 - n / m, m - n, m  # its prune_n counts the pruned weights
    else:
        ratio, prune_n, prune_m = float(sparsity), 0, 0
    args = types.SimpleNamespace(
        sparsity_ratio=ratio,
        nsamples=len(windows),
        seed=0,
        use_variant=False,
        prune_method=method,
    )
    model.seqlen = windows.shape[1]
    model.hf_device_map = {}
    device = next(model.parameters()).device
    fn = {
        "magnitude": ref.prune_magnitude,
        "wanda": ref.prune_wanda,
        "sparsegpt": ref.prune_sparsegpt,
    }[method]
    with _without_cuda(), _modern_layers(model, windows), contextlib.redirect_stdout(None):
        fn(args, model, None, device, prune_n=prune_n, prune_m=prune_m)

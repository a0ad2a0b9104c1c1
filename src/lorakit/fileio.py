"""Writing files so that neither a crash nor a power loss leaves a half-written one behind.

A file is written to a temp file in its folder, flushed to disk (fsync), given the mode a plain
``open(path, "w")`` would give it under the user's umask (temp files are created 0600, which
would make an adapter on shared storage unreadable to teammates), renamed into place, and the
folder is fsynced so the rename itself survives a power loss.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync(path: Path | str) -> None:
    """Flush a file, or a folder's entries, to disk (folders: POSIX only)."""
    if os.path.isdir(path) and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp file in ``path``'s folder, then make it durable and
    ``os.replace`` it into place with the mode of a plainly created file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces ``folder`` durably.

    Every file in it is fsynced, the folder gets a plain ``mkdir``'s mode, and the swap goes
    through ``<folder>.old`` (kept until the new folder is in place): at every instant one
    complete copy exists, ``folder`` or ``folder.old``. On an error nothing is replaced.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync(f)
        os.chmod(tmp, 0o777 & ~_umask())
        fsync(tmp)
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stale_weights(folder: Path, written: set[str]) -> list[Path]:
    """Weight files (shards, their index) of an earlier save that this one did not rewrite."""
    prefixes, suffixes = ("model", "pytorch_model"), (".safetensors", ".bin", ".index.json")
    names = [f.name for f in folder.iterdir() if f.is_file() and f.name not in written]
    return [folder / n for n in names if n.startswith(prefixes) and n.endswith(suffixes)]


def save_pretrained(folder: Path, model: Any, tokenizer: Any = None, **kwargs: Any) -> None:
    """``model.save_pretrained(folder, **kwargs)`` (and the tokenizer's), each file moved into
    place whole, fsynced, with the mode of a plainly created file: transformers writes weights
    through a 0600 temp file, which would make a merged or pruned model on shared storage
    unreadable to teammates. Weight shards of an earlier save that this one did not rewrite
    are removed, as ``save_pretrained`` itself does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".saving-"))
    try:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        top = {f.name for f in files if f.parent == tmp}
        if any(n.endswith((".safetensors", ".bin")) for n in top):
            for f in _stale_weights(folder, top):
                f.unlink()
        for f in files:
            os.chmod(f, 0o666 & ~_umask())
            fsync(f)
            dest = folder / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
        fsync(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

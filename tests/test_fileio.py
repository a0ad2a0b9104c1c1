"""Written files: the mode of a plain open() under the umask, and flushed to disk before the rename."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import build

import lorakit as lk
from lorakit.fileio import atomic_folder, atomic_write


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_adapter_files_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    out = lk.save_adapter(lk.inject(build("mlp"), lk.LoRAConfig(rank=2)), tmp_path / "a")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert _mode(out / f) == 0o666 & ~mask, f


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_atomic_folder_gets_the_mkdir_mode(tmp_path, umask, mask):
    umask(mask)
    with atomic_folder(tmp_path / "ck") as tmp:
        (tmp / "state.json").write_text("{}")
    assert _mode(tmp_path / "ck") == 0o777 & ~mask
    assert _mode(tmp_path / "ck" / "state.json") == 0o666 & ~mask


def test_files_and_folders_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic_write(tmp_path / "f.txt", lambda t: Path(t).write_text("x"))
    assert Path(synced[0]).name.startswith(".f.txt.")  # the temp file, before the rename
    assert synced[1] == str(tmp_path)  # the folder, after it
    synced.clear()
    with atomic_folder(tmp_path / "ck") as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    assert [Path(p).name for p in synced[:2]] == ["a.bin", tmp.name]
    assert synced[-1] == str(tmp_path)


def test_failed_folder_write_replaces_nothing(tmp_path):
    with atomic_folder(tmp_path / "ck") as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "ck") as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("killed")
    assert (tmp_path / "ck" / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]

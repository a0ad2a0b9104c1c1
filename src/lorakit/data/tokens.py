"""The one rule by which text becomes token ids, for training, validation, ``lorakit eval`` and
``lorakit generate``: tokenized without the tokenizer's own special tokens (so a chat template's
rendered special tokens are read as such), then the bos token put first exactly when the
tokenizer's default encoding would put it there and the text does not already start with it.
No lorakit imports: both :mod:`.encode` and :mod:`.chat` build on it.
"""

from __future__ import annotations

from typing import Any


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: long documents are meant to exceed model_max_length here (they are cut later).
    return [list(x) for x in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own default encoding puts its bos token first (LLaMA-2, Phi-3,
    Mistral, Gemma do; SmolLM2, Qwen and GPT-2 do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return list(tokenizer("a")["input_ids"][:1]) == [bos]


def leading_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """``ids``' own leading bos token, as a list (empty when there is none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids[:1] if bos is not None and ids[:1] == [bos] else []


def with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """``ids`` with the bos token first when the tokenizer's own encoding adds one and ``ids``
    does not already start with it (a chat template that renders ``<s>`` itself, as Phi-3's
    does): the bos token once, never twice, never missing."""
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        return [tokenizer.bos_token_id, *ids]
    return ids


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: tokenized without the tokenizer's special tokens (a chat template's
    rendered special tokens are parsed as such), then the bos token as :func:`with_bos` puts it.
    Training, validation, ``lorakit eval`` and ``lorakit generate`` all encode text this way."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    return [ids if not bos or ids[:1] == bos else bos + ids for ids in _tokenize(tokenizer, texts)]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """:func:`encode_texts` of one text."""
    return encode_texts(tokenizer, [text])[0]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n

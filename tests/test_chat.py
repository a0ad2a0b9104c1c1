"""Conversations (assistant-only labels on real and marker-less templates), packing (packed loss
equals unpacked loss, no attention across examples), and their bad inputs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import METHODS, build, perturb

import lorakit as lk
from lorakit.config import TrainConfig
from lorakit.constants import IGNORE_INDEX
from lorakit.data import encode_chats, load_records
from lorakit.data.chat import encode_conversation
from lorakit.data.packing import best_fit_decreasing, collate_packed
from lorakit.data.schema import validate_record
from lorakit.tasks import batch_loss, check_packing, collate

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]
# A template without generation markers and without special tokens: turns are "role: text\n".
PLAIN = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# ChatML with {% generation %} markers around what the assistant writes.
MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from lorakit.models import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


def targets(tok, example) -> str:
    return tok.decode(
        [
            t
            for t, y in zip(example["input_ids"], example["labels"], strict=True)
            if y != IGNORE_INDEX
        ]
    )


def test_smollm2_template_labels_exactly_the_assistant_turns(tok):
    ex = encode_conversation(tok, tok.chat_template, CHAT)
    assert targets(tok, ex) == "Hi! How can I help?<|im_end|>\nBlue.<|im_end|>\n"
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    # Labels are the ids themselves where they are targets.
    assert all(y in (IGNORE_INDEX, t) for t, y in zip(ex["input_ids"], ex["labels"], strict=True))


def test_markerless_template_labels_exactly_the_assistant_turns(tok):
    ex = encode_conversation(tok, PLAIN, CHAT)
    assert targets(tok, ex) == " Hi! How can I help?\n Blue.\n"


def test_generation_markers_agree_with_rendered_spans(tok):
    marked = encode_conversation(tok, MARKED, CHAT)
    assert targets(tok, marked) == "Hi! How can I help?<|im_end|>\nBlue.<|im_end|>\n"
    spans = encode_conversation(
        tok, MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", ""), CHAT
    )
    assert marked == spans


def test_conversational_prompt_completion_trains_the_completion_only(tok):
    record, form = validate_record({"prompt": CHAT[:3] + CHAT[3:4], "completion": CHAT[4:]}, "r")
    assert form == "chat" and record["prompt_turns"] == 4
    (ex,) = encode_chats([record], tok, 512)
    assert targets(tok, ex) == "Blue.<|im_end|>\n"


def test_long_conversations_keep_whole_turns(tok):
    full = encode_conversation(tok, tok.chat_template, CHAT)
    limit = len(full["input_ids"]) - 2  # the second answer no longer fits
    with pytest.warns(UserWarning, match="1 kept their whole turns"):
        (ex,) = encode_chats([{"messages": CHAT}], tok, limit)
    assert targets(tok, ex) == "Hi! How can I help?<|im_end|>\n"
    assert ex["input_ids"] == full["input_ids"][: len(ex["input_ids"])]
    with (
        pytest.warns(UserWarning, match="1 were skipped"),
        pytest.raises(ValueError, match="no conversation gave a training example"),
    ):
        encode_chats([{"messages": CHAT}], tok, 8)


@pytest.mark.parametrize(
    "messages,match",
    [
        ("hello", "must be a non-empty list"),
        ([{"role": "user"}], "must be an object with 'role' and 'content'"),
        ([{"role": "robot", "content": "x"}], "allowed roles: system, user, assistant"),
        ([{"role": "user", "content": "  "}], "empty or non-string content"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        validate_record({"messages": messages}, "line 3")


def test_conversations_without_an_answer_are_skipped_and_counted(tok):
    records = [{"messages": CHAT[:2]}, {"messages": CHAT}]
    with pytest.warns(UserWarning, match="1 of 2 conversations have no assistant turn"):
        assert len(encode_chats(records, tok, 512)) == 1


def test_no_chat_template(tok):
    from transformers import AutoTokenizer

    from lorakit.models import smollm2_dir

    bare = AutoTokenizer.from_pretrained(smollm2_dir())
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; pass one with --chat-template"):
        encode_chats([{"messages": CHAT}], bare, 512)
    assert len(encode_chats([{"messages": CHAT}], bare, 512, template=PLAIN)) == 1


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    last_only = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(ValueError, match="does not render a conversation incrementally"):
        encode_conversation(tok, last_only, CHAT)


def test_shakespeare_dialogue_splits_do_not_share_text():
    splits = {s: load_records("shakespeare-dialogue", s) for s in ("train", "validation", "test")}
    assert all(len(r) > 300 for r in splits.values())
    for records in splits.values():
        for r in records[:50]:
            roles = [m["role"] for m in r["messages"]]
            assert roles[0] == "system" and roles[-1] == "assistant"
            assert roles[1:] == ["user", "assistant"] * (len(roles) // 2)
    seen = {
        m["content"] for r in splits["train"] for m in r["messages"][1:] if len(m["content"]) > 200
    }
    for s in ("validation", "test"):
        assert not seen & {m["content"] for r in splits[s] for m in r["messages"][1:]}


# -- packing ----------------------------------------------------------------------------------


def test_best_fit_decreasing_fills_rows_and_keeps_every_example():
    lengths = [7, 3, 9, 1, 4, 6, 2, 8, 5, 5]
    rows = best_fit_decreasing(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 5  # 50 tokens in rows of 10: perfectly filled
    with pytest.raises(ValueError, match="does not fit a packed row of 10"):
        best_fit_decreasing([11], 10)


def examples(seed: int = 0, n: int = 6) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(0, 128, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX if j < length // 3 else t for j, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_packed_loss_and_gradients_equal_unpacked(method, reduce):
    model = build("llama", torch.float64, method=method)
    lk.inject(model, lk.LoRAConfig(method=method, rank=4))
    perturb(model)
    if reduce:
        lk.reduce_activation_memory(model)
    model.train()
    exs = examples()
    packed = collate_packed(exs, 24, 0)
    assert packed["input_ids"].shape[0] < len(exs)  # several examples share a row

    def run(batch):
        model.zero_grad()
        loss = batch_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss_p, grads_p = run(packed)
    loss_u, grads_u = run(collate(exs, 0))
    # float64 model; the loss is summed in float32 (as token_losses always does)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-6, atol=0)
    for a, b in zip(grads_p, grads_u, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_packed_examples_never_attend_across(ids):
    """Each packed example's logits equal its logits alone: with attention crossing a boundary
    (the same row without position_ids restarting) they do not."""
    from lorakit.evaluate import forward_logits

    model = build("llama", torch.float64)
    exs = examples(1, 3)
    packed = collate_packed(exs, 64, 0)
    assert packed["input_ids"].shape[0] == 1
    row, pos = packed["input_ids"], packed["position_ids"]
    with torch.no_grad():
        out = forward_logits(model, row, None, row.shape[1], pos)
        crossing = forward_logits(model, row, None, row.shape[1])
        at = 0
        (order,) = best_fit_decreasing([len(e["input_ids"]) for e in exs], 64)
        for e in (exs[i] for i in order):  # the row holds them longest first
            n = len(e["input_ids"])
            alone = forward_logits(model, torch.tensor([e["input_ids"]]), None, n)
            torch.testing.assert_close(out[:, at : at + n], alone)
            if at:
                assert not torch.allclose(crossing[:, at : at + n], alone, atol=1e-3)
            at += n
    check_packing(model)  # the same probe training runs before it packs


def test_packing_refused_for_a_model_without_positions():
    model = build("mlp")
    with pytest.raises(ValueError, match="--packing needs a model that takes position_ids .* MLP"):
        check_packing(model)


def test_packing_refused_for_a_model_that_attends_across():
    """A model that drops position_ids sees one causal row: the probe catches it by name."""
    model = build("llama")
    forward = model.forward
    model.forward = lambda *a, position_ids=None, **k: forward(*a, **k)
    with pytest.raises(ValueError, match="LlamaForCausalLM .* attends across packed examples"):
        check_packing(model)


def test_train_chat_packed_matches_padded_loss(tiny, tmp_path):
    """The same conversations, packed or padded, give the same first-step loss (normalised over
    the global batch's targets, with accumulation)."""
    from lorakit.train import train

    data = tmp_path / "chat.jsonl"
    convs = [{"messages": CHAT}, {"messages": CHAT[:3]}, {"messages": [CHAT[1], CHAT[2]]}] * 3
    data.write_text("\n".join(json.dumps(c) for c in convs))
    for packing in (False, True):
        cfg = TrainConfig.from_flat(
            {"model": str(tiny), "data": str(data), "val_data": str(data), "max_steps": 1}
            | {"batch_size": 6, "micro_batch_size": 3, "max_len": 128, "packing": packing}
            | {"output": str(tmp_path / f"run{packing}"), "progress": False, "save_every": 0}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(cfg)
    rows = [
        json.loads((tmp_path / f"run{p}" / "metrics.jsonl").read_text().splitlines()[0])
        for p in (False, True)
    ]
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)
    assert rows[1]["padding"] < rows[0]["padding"]


# -- generate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_generate_cli_streams_what_the_unmerged_adapter_answers(tiny, tmp_path, method, capsys):
    """`lorakit generate --adapter` (merged) answers greedily what the adapted model answers."""
    from lorakit.cli import main
    from lorakit.generate import reply
    from lorakit.models import load_model

    model, tok = load_model(tiny)
    if method == "lors":
        lk.prune(model, "magnitude", 0.5, progress=False)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    lk.inject(model, lk.LoRAConfig(method=method, rank=4))
    perturb(model, scale=0.05)
    lk.save_adapter(model, tmp_path / "adapter")
    chat = [{"role": "user", "content": "Hello there"}]
    want = reply(model, tok, chat, max_new_tokens=6, temperature=0, stream=False)
    assert want.strip()
    capsys.readouterr()
    args = ["generate", "--model", str(base), "--adapter", str(tmp_path / "adapter")]
    args += ["--prompt", "Hello there", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == want.strip()


def test_generate_bad_input(tiny, capsys):
    from lorakit.cli import main

    assert main(["generate", "--model", str(tiny)]) == 2
    assert "give --prompt TEXT, or --interactive" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p in (0, 1]" in capsys.readouterr().err


def test_eval_reports_the_assistant_token_loss(tiny, tok, tmp_path, capsys):
    from lorakit.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    assert main(["eval", "--model", str(tiny), "--data", str(data), "--max-len", "128"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = encode_conversation(tok, tok.chat_template, CHAT)["labels"]
    assert out["assistant_tokens"] == sum(y != IGNORE_INDEX for y in want) == 13
    assert out["loss"] > 0

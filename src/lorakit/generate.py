"""Answers from a (fine-tuned) model, streamed as they are sampled: ``lorakit generate``.

A chat model answers a conversation rendered with its chat template (:func:`reply`); a model
fine-tuned on prompt / completion pairs continues a plain prompt (:func:`complete`), encoded as
its training encoded prompts, and stops at the eos token its training appended.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data.chat import chat_template, check_messages

FORMATS = ("auto", "chat", "plain")


def prompt_format(tokenizer: Any, spec: dict[str, Any], asked: str = "auto") -> str:
    """``chat`` or ``plain``: what was asked, else what the adapter was trained on (a chat run:
    chat; prompt / completion, text or classification: plain), else chat when the tokenizer has
    a chat template."""
    if asked not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {asked!r}")
    if asked != "auto":
        return asked
    if spec.get("task") in ("sft", "lm", "classify"):
        return "plain"
    if spec.get("task") == "chat" or getattr(tokenizer, "chat_template", None):
        return "chat"
    return "plain"


@torch.no_grad()
def reply(
    model: nn.Module,
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    template: str | None = None,
    **options: Any,
) -> str:
    """The assistant's next turn after ``messages``, rendered with the chat template.

    Args:
        model: a causal LM (adapted, merged or plain).
        tokenizer: its tokenizer.
        messages: the conversation so far (``role`` / ``content`` dicts).
        template: a chat template file or text instead of the tokenizer's own.
        options: :func:`complete`'s sampling options.

    Returns:
        The answer's text, special tokens removed.
    """
    jinja = chat_template(tokenizer, template)
    messages = check_messages(messages, "the conversation")
    text = tokenizer.apply_chat_template(
        messages, chat_template=jinja, add_generation_prompt=True, tokenize=False
    )
    return complete(model, tokenizer, text, **options)


@torch.no_grad()
def complete(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    stream: bool = True,
) -> str:
    """The continuation of ``prompt`` (plain text, encoded as training encodes it: the bos token
    once, :func:`lorakit.data.tokens.encode_text`), up to the eos token or ``max_new_tokens``.

    Args:
        model: a causal LM (adapted, merged or plain).
        tokenizer: its tokenizer.
        prompt: the text to continue (a rendered chat template, or a prompt as trained).
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 for greedy decoding, else sampling at this temperature.
        top_p: nucleus sampling threshold (with temperature > 0).
        seed: the sampling seed.
        stream: print the answer to stdout as it is generated.

    Returns:
        The continuation's text, special tokens removed.
    """
    from transformers import TextStreamer

    from .data.tokens import encode_text
    from .tasks import pad_token_id

    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            "max_new_tokens must be >= 1, temperature >= 0 and top_p in (0, 1]; got "
            f"{max_new_tokens}, {temperature}, {top_p}"
        )
    device = next(model.parameters()).device
    ids = torch.tensor([encode_text(tokenizer, prompt)], device=device)
    sampling: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling |= {"temperature": temperature, "top_p": top_p}
    streamer = (
        TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    )
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=pad_token_id(tokenizer),
            **sampling,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def session(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | None,
    *,
    chat: bool,
    template: str | None = None,
    wrap: str = "{text}",
    system: str | None = None,
    interactive: bool = False,
    **options: Any,
) -> None:
    """Answer ``prompt`` (streamed), then, ``interactive``, each line read from stdin until an
    empty one. ``chat``: one conversation (with ``system`` first); otherwise each prompt on its
    own, put into ``wrap``'s ``{text}`` (a classification run's prompt)."""
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        if prompt is None:
            try:
                prompt = input("you> ").strip()
            except EOFError:
                prompt = ""
            if not prompt:
                return
        if chat:
            messages.append({"role": "user", "content": prompt})
            answer = reply(model, tokenizer, messages, template=template, **options)
            messages.append({"role": "assistant", "content": answer})
        else:
            complete(model, tokenizer, wrap.replace("{text}", prompt), **options)
        if not interactive:
            return
        prompt = None

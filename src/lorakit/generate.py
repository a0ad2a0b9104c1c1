"""Answers from a (fine-tuned) chat model, streamed as they are sampled: ``lorakit generate``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data.chat import chat_template, check_messages


@torch.no_grad()
def reply(
    model: nn.Module,
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    template: str | None = None,
    stream: bool = True,
) -> str:
    """The assistant's next turn after ``messages``, rendered with the chat template.

    Args:
        model: a causal LM (adapted, merged or plain).
        tokenizer: its tokenizer.
        messages: the conversation so far (``role`` / ``content`` dicts).
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 for greedy decoding, else sampling at this temperature.
        top_p: nucleus sampling threshold (with temperature > 0).
        seed: the sampling seed.
        template: a chat template file or text instead of the tokenizer's own.
        stream: print the answer to stdout as it is generated.

    Returns:
        The answer's text, special tokens removed.
    """
    from transformers import TextStreamer

    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            "max_new_tokens must be >= 1, temperature >= 0 and top_p in (0, 1]; got "
            f"{max_new_tokens}, {temperature}, {top_p}"
        )
    jinja = chat_template(tokenizer, template)
    messages = check_messages(messages, "the conversation")
    enc = tokenizer.apply_chat_template(
        messages,
        chat_template=jinja,
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    sampling = {"do_sample": temperature > 0}
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
            **enc,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **sampling,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

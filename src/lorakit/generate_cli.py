"""``lorakit generate``: its flags and its command (the sampling is :mod:`lorakit.generate`)."""

from __future__ import annotations

import argparse

from .flags import add_config_flags, load_options


def cmd_generate(a: argparse.Namespace) -> int:
    from .adapters import load_adapter
    from .generate import prompt_format, session
    from .inject import merge
    from .models import load_model
    from .scoring import saved_spec

    if not a.interactive and a.prompt is None:
        raise ValueError("give --prompt TEXT, or --interactive for a conversation")
    spec = saved_spec(a.adapter)
    model, tok = load_model(a.model, **load_options(a))
    if a.adapter:
        model = load_adapter(model, a.adapter)
        if a.quantize == "none":  # merged: answers cost what the base costs (LoRS stays sparse)
            model = merge(model)  # (on a 4-bit base merging would dequantize the adapted layers)
    session(
        model,
        tok,
        a.prompt,
        chat=prompt_format(tok, spec, a.format) == "chat",
        template=a.chat_template or spec.get("chat_template"),
        wrap=spec.get("classes", {}).get("template") or "{text}",
        system=a.system,
        interactive=a.interactive,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        seed=a.seed,
    )
    return 0


def add_command(sub) -> None:
    """Add ``generate`` to the ``lorakit`` subcommands ``sub``."""
    from .config import TrainConfig

    p = sub.add_parser(
        "generate",
        help="chat with a model (and an adapter), the answer streamed",
        description="Render the conversation with the model's chat template and stream the answer.",
    )
    p.add_argument("--model", default="smollm2-135m", help="base model (or a merged one)")
    p.add_argument(
        "--adapter",
        default=None,
        help="adapter folder (lorakit or PEFT), merged first (on a --quantize base: kept apart)",
    )
    p.add_argument("--prompt", default=None, help="the user's message")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--interactive", action="store_true", help="a multi-turn session on stdin")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (tokens)")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "chat", "plain"],
        help="chat: render the chat template; plain: continue the prompt as given (a "
        "classification adapter's prompt filled with it); auto: what the adapter was trained "
        "on, else chat if the tokenizer has a template",
    )
    # --dtype, --quantize nf4|fp4 (the base loaded 4-bit as lorakit train loads it),
    # --double-quant, --attn-implementation: the same flags as train's.
    only = ("dtype", "quantize", "double_quant", "attn_implementation")
    add_config_flags(p, TrainConfig, only=only, suppress=False)
    p.set_defaults(func=cmd_generate)

"""The training loop: AdamW, warmup + schedule, accumulation, clipping, evaluation, checkpoints.

A run is a pure function of its :class:`TrainConfig`: the data order at step k depends only on the
seed and k, and a checkpoint holds the adapter (or full weights), the optimizer and scheduler state
and the RNG state, so ``resume`` continues a killed run to the same weights as an uninterrupted
one (bit-identical on CPU). Checkpoints are written into a temporary folder and swapped in with
renames: a crash mid-save leaves the previous checkpoint readable.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .adapters import copy_adapter_weights, read_adapter
from .config import DTYPES, LoRAConfig
from .distributed import SINGLE, Context
from .evaluate import (
    IGNORE,
    accuracy,
    classify,
    label_token_ids,
    left_pad,
    nll,
    shared_prefix,
    to_device,
    token_losses,
)
from .fileio import atomic_folder
from .inject import count_parameters, inject

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Task = Literal["auto", "lm", "classify", "sft", "seq-cls"]
# Classification heads that a sequence-classification model trains fully next to the adapter.
HEADS = ("classifier", "score")
# Fields that may change between a run and its resumption (they do not change the math).
RESUMABLE_CHANGES = (
    "eval_every",
    "save_every",
    "eval_examples",
    "progress",
    "output",
    "device",
    "strategy",  # DDP and FSDP compute the same thing; so does any world size dividing the batch
)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` is the global batch (micro-batches are accumulated)."""

    model: str = "smollm2-135m"  # embedded name, local HF folder or hub id
    data: str = "rotten-tomatoes"  # built-in name, local file or `datasets` name
    val_data: str | None = None  # validation source; default: data's validation split (built-ins)
    method: str = "lora"  # "lora" | "lora_fa" | "lors" | "full"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "all-linear"
    grad_correction: bool = False  # lora_fa: LoRA-FA v2 gradient correction
    reduce_memory: bool = False  # apply reduce_activation_memory (causal LMs)
    checkpointing: bool = False  # activation checkpointing per transformer block (HF models)
    init: str = "kaiming"  # A's init: "kaiming" | "gaussian" | "gradient_svd" (LoRS / LoRA-GA)
    init_samples: int = 128  # training examples whose mean gradient gradient_svd uses
    task: Task = "auto"  # auto: labels -> classify (causal LM) / seq-cls (encoder); sft; lm
    prompt: str = "auto"  # classify: "chat" template, "plain" prompt, or "auto" (chat if any)
    max_steps: int = 100
    batch_size: int = 16  # global batch, in examples (lm: windows of max_len tokens)
    micro_batch_size: int = 0  # 0: no accumulation
    lr: float = 1e-3
    warmup: float = 0.06  # fraction of max_steps (the LoRA paper's GLUE setting)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    dtype: str = "float32"  # model dtype: "float32" | "bfloat16"
    seed: int = 0
    max_len: int = 256  # tokens per example (lm: window length)
    eval_every: int = 0  # 0: evaluate at the end only
    eval_examples: int = 0  # 0: the whole validation split
    save_every: int = 50  # checkpoint interval in steps (0: only at the end)
    output: str = "runs/lorakit"
    progress: bool = True
    device: str = "auto"  # "auto": cuda if available (torchrun: cuda:LOCAL_RANK), else cpu
    strategy: str = "ddp"  # under torchrun: "ddp" | "fsdp" (ignored in a single process)

    def __post_init__(self) -> None:
        if self.method not in ("lora", "lora_fa", "lors", "full"):
            raise ValueError(
                f"method must be one of lora, lora_fa, lors, full; got {self.method!r}"
            )
        if self.task not in ("auto", "lm", "classify", "sft", "seq-cls"):
            raise ValueError(f"task must be auto, lm, classify, sft or seq-cls; got {self.task!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        for name in ("max_steps", "batch_size", "max_len", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "micro_batch_size",
            "max_grad_norm",
            "eval_every",
            "eval_examples",
            "save_every",
            "weight_decay",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ValueError(
                f"micro_batch_size {micro} must divide batch_size {self.batch_size}; "
                f"valid choices: {[d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]}"
            )
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of max_steps in [0, 1), got {self.warmup}")
        try:
            torch.device(self.device if self.device != "auto" else "cpu")
        except RuntimeError as e:
            raise ValueError(
                f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}"
            ) from e
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.init not in ("kaiming", "gaussian", "gradient_svd"):
            raise ValueError(f"init must be kaiming, gaussian or gradient_svd, got {self.init!r}")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.method != "full":
            self.lora_config()  # validate rank/alpha/targets early

    def lora_config(self, modules_to_save: tuple[str, ...] = ()) -> LoRAConfig:
        """The adapter config this run injects (``modules_to_save`` e.g. a new classifier)."""
        return LoRAConfig(
            method=self.method,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=self.targets,
            modules_to_save=modules_to_save,
            grad_correction=self.grad_correction,
            init="gaussian" if self.init == "gaussian" else "kaiming",
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(d["targets"]) if isinstance(d["targets"], tuple) else d["targets"]
        return d


# -- data ---------------------------------------------------------------------------------------


def classification_prompt(
    tokenizer: PreTrainedTokenizerBase, label_names: list[str], style: str = "auto"
) -> tuple[str, list[str]]:
    """A prompt template with a ``{text}`` slot and the label words that answer it.

    ``style="chat"`` (``"auto"`` when the tokenizer has a chat template) wraps the question in the
    chat template (label words without a leading space: the assistant turn starts a fresh line);
    ``"plain"`` is a short ``... Answer:`` prompt with " word" labels (about 40 % fewer tokens for
    SmolLM2, whose chat template adds a system prompt).
    """
    if style not in ("auto", "chat", "plain"):
        raise ValueError(f"prompt style must be auto, chat or plain, got {style!r}")
    question = (
        f"Is this review {' or '.join(label_names)}? Answer with one word.\n\nReview: {{text}}"
    )
    chat = bool(getattr(tokenizer, "chat_template", None)) if style == "auto" else style == "chat"
    if chat:
        template = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return template, list(label_names)
    return question + "\nAnswer:", [" " + n for n in label_names]


@dataclass
class Prepared:
    """Tokenised training data and what evaluation needs."""

    task: str
    train: list[dict[str, list[int]]]
    val_records: list[dict[str, Any]]
    val_blocks: torch.Tensor | None = None
    template: str | None = None
    label_words: list[str] | None = None


def is_causal_lm(model_name: str) -> bool:
    """Whether a model folder / embedded name is a causal LM (from its config, without weights)."""
    from transformers import AutoConfig

    from .models import resolve

    archs = AutoConfig.from_pretrained(resolve(model_name)).architectures or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def resolve_task(cfg: TrainConfig, first: dict[str, Any]) -> str:
    if cfg.task != "auto":
        return cfg.task
    if "label" in first:
        return "classify" if is_causal_lm(cfg.model) else "seq-cls"
    return "sft" if "prompt" in first else "lm"


def load_splits(cfg: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train records, and validation records: ``val_data`` if given, else the data's own
    validation split for built-in / hub datasets. A local file has no split of its own (every
    split is the whole file), so it gets no validation unless ``val_data`` names one."""
    from . import data

    train = data.load_records(cfg.data, "train")
    if cfg.val_data is not None:
        return train, data.load_records(cfg.val_data, "validation")
    if Path(cfg.data).expanduser().exists():
        return train, []
    try:
        val = data.load_records(cfg.data, "validation")
    except (ValueError, KeyError):
        val = []
    return train, val


def label_names(cfg: TrainConfig, records: list[dict[str, Any]]) -> list[str]:
    from . import data

    return data.label_names(cfg.data) or [str(v) for v in sorted({r["label"] for r in records})]


def prepare_data(cfg: TrainConfig, tokenizer, task: str, train, val) -> Prepared:
    from . import data

    if task == "seq-cls":
        enc = tokenizer([r["text"] for r in train], truncation=True, max_length=cfg.max_len)
        examples = [
            {"input_ids": ids, "label": int(r["label"])}
            for ids, r in zip(enc["input_ids"], train, strict=True)
        ]
        return Prepared(task, examples, val)
    if task == "classify":
        template, words = classification_prompt(tokenizer, label_names(cfg, train), cfg.prompt)
        label_token_ids(tokenizer, words)  # fail now, not after training, on multi-token words
        examples = data.encode_examples(
            train, tokenizer, cfg.max_len, template=template, label_words=words
        )
        return Prepared(task, examples, val, template=template, label_words=words)
    if task == "sft":
        return Prepared(task, data.encode_examples(train, tokenizer, cfg.max_len), val)
    blocks = data.lm_blocks(train, tokenizer, cfg.max_len)
    examples = [{"input_ids": b.tolist(), "labels": b.tolist()} for b in blocks]
    val_blocks = data.lm_blocks(val, tokenizer, cfg.max_len) if val else None
    return Prepared(task, examples, val, val_blocks=val_blocks)


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    ).tolist()


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: a seeded permutation per epoch, nothing else."""
    return [
        _epoch_order(n, seed, pos // n)[pos % n]
        for pos in range(step * batch_size, (step + 1) * batch_size)
    ]


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad, so completions end in the last column and only their logits are computed.

    Sequence-classification examples (a ``label`` int) are right-padded, as encoders expect.
    """
    if "label" in examples[0]:
        ids, mask = left_pad([e["input_ids"][::-1] for e in examples], pad_id)
        labels = torch.tensor([e["label"] for e in examples])
        return {"input_ids": ids.flip(1), "attention_mask": mask.flip(1), "labels": labels}
    ids, mask = left_pad([e["input_ids"] for e in examples], pad_id)
    # A row's first token is predicted by nothing (a pad position, after left padding).
    labels, _ = left_pad([[IGNORE, *e["labels"][1:]] for e in examples], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed loss of a micro-batch (token losses for LMs, example losses for classifiers)."""
    if batch["labels"].dim() == 1:
        batch = to_device(batch, model)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    return token_losses(model, batch)[0]


def n_targets(examples: list[dict[str, Any]]) -> int:
    """How many loss terms a global batch has: examples, or label tokens after the shift."""
    if "label" in examples[0]:
        return len(examples)
    return sum(sum(1 for y in e["labels"][1:] if y != IGNORE) for e in examples)


# -- optimisation -------------------------------------------------------------------------------


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warmup, then cosine / linear decay or constant."""
    warm = int(cfg.warmup * cfg.max_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, cfg.max_steps - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


# -- checkpoints --------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(
    folder: Path, model, optimizer, scheduler, cfg: TrainConfig, step: int, ctx: Context = SINGLE
) -> None:
    """Write a checkpoint to ``folder`` atomically (temp folder, then renames).

    Distributed: every rank calls this (sharded tensors are gathered whole, every rank's RNG
    state is collected); rank 0 alone writes.
    """
    from safetensors.torch import save_file

    from .adapters import adapter_payload, write_adapter
    from .distributed import all_gather, full

    if cfg.method == "full":
        weights = {n: full(p.detach()).cpu().contiguous() for n, p in _trainable(model)}
    else:
        adapter = adapter_payload(model)
    state = optimizer.state_dict()
    tensors = {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            v = full(v.detach()).cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = v
    rngs = all_gather(rng_states(model.parameters()), ctx)
    if not ctx.is_main:
        return
    for r, states in enumerate(rngs):
        for k, v in states.items():
            tensors[f"rng.{k}" + (f".rank{r}" if r else "")] = v
    with atomic_folder(folder) as tmp:
        if cfg.method == "full":
            save_file(weights, tmp / "weights.safetensors")
        else:
            write_adapter(tmp / "adapter", adapter)
        save_file(tensors, tmp / "trainer_state.safetensors")
        meta = {
            "step": step,
            "world_size": ctx.world,
            "config": cfg.to_dict(),
            "param_groups": state["param_groups"],
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        }
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))


def find_checkpoint(output: Path) -> Path | None:
    """The last complete checkpoint (``checkpoint``, or ``checkpoint.old`` if a swap was cut)."""
    for name in ("checkpoint", "checkpoint.old"):
        if (output / name / "trainer_state.json").exists():
            return output / name
    return None


def check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    saved = {**TrainConfig().to_dict(), **saved}  # fields added since the checkpoint: defaults
    diff = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise ValueError(
            f"cannot resume: the config differs from the checkpoint's in {diff} ({detail})"
        )


def load_weights(folder: Path, model, cfg: TrainConfig) -> dict[str, Any]:
    """Check the checkpoint's config and copy its trained weights into the (unwrapped) model."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "trainer_state.json").read_text())
    check_resumable(meta["config"], cfg)
    with torch.no_grad():
        if cfg.method == "full":
            weights = load_file(folder / "weights.safetensors")
            for n, p in _trainable(model):
                p.copy_(weights[n])
        else:
            saved = read_adapter(folder / "adapter")
            copy_adapter_weights(model, saved.weights, "default")
            params = dict(model.named_parameters(remove_duplicate=False))
            for key, t in saved.saved_params.items():  # modules_to_save (e.g. a classifier head)
                params[key].copy_(t)
    return meta


def load_trainer_state(
    folder: Path,
    meta: dict[str, Any],
    optimizer,
    scheduler,
    cfg: TrainConfig,
    ctx: Context = SINGLE,
) -> int:
    """Optimizer, scheduler and RNG state (after the model is wrapped); returns the step.

    Optimizer states are stored whole and re-sharded like their parameters, so a run may resume
    with another world size. Each rank restores its own RNG state when the world size is the
    one saved; otherwise rank r reseeds with (seed, r, step): only dropout masks differ.
    """
    from safetensors.torch import load_file

    from .distributed import like

    tensors = load_file(folder / "trainer_state.safetensors")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state["state"].setdefault(int(idx), {})[k] = like(v, params[int(idx)])
    optimizer.load_state_dict(state)
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None]})
    step = int(meta["step"])
    suffix = f".rank{ctx.rank}" if ctx.rank else ""
    saved = {
        k[4 : len(k) - len(suffix)]: v
        for k, v in tensors.items()
        if k.startswith("rng.") and k.endswith(suffix) and (suffix or ".rank" not in k)
    }
    if meta.get("world_size", 1) != ctx.world or not set_rng_states(saved, params):
        torch.manual_seed(cfg.seed * 1_000_003 + ctx.rank * 7_919 + step)  # also seeds CUDA
    return step


def _cuda_devices(tensors) -> list[torch.device]:
    """The CUDA devices holding ``tensors``: their generators draw this process's dropout masks."""
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=lambda d: d.index)


def rng_states(params) -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator and that of every CUDA device in use."""
    states = {"torch": torch.get_rng_state()}
    for d in _cuda_devices(params):
        states[f"cuda{d.index}"] = torch.cuda.get_rng_state(d)
    return states


def set_rng_states(states: dict[str, torch.Tensor], params) -> bool:
    """Restore :func:`rng_states`; False (nothing restored) unless every generator now in use
    has a saved state."""
    devices = _cuda_devices(params)
    if "torch" not in states or any(f"cuda{d.index}" not in states for d in devices):
        return False
    torch.set_rng_state(states["torch"])
    for d in devices:
        torch.cuda.set_rng_state(states[f"cuda{d.index}"], d)
    return True


# -- the loop -----------------------------------------------------------------------------------


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def evaluate(
    model, tokenizer, prep: Prepared, cfg: TrainConfig, split_records=None, ctx: Context = SINGLE
) -> dict[str, float]:
    """Validation metrics. Distributed: each rank evaluates a strided share (padded so every rank
    runs the same forward passes) and the results are combined; every rank gets the metrics."""
    from .distributed import all_gather, all_sum, interleave, split_evenly

    records = split_records if split_records is not None else prep.val_records
    if cfg.eval_examples:
        records = records[: cfg.eval_examples]

    def predictions(fn) -> list[int]:
        mine, real = split_evenly(records, ctx)
        preds = fn(mine)[:real] if mine else []
        return interleave(all_gather(preds, ctx), len(records))

    labels = [r["label"] for r in records] if records and "label" in records[0] else []
    if prep.task == "seq-cls" and records:
        preds = predictions(lambda rs: predict_classes(model, tokenizer, rs, cfg.max_len))
        return {"accuracy": accuracy(preds, labels)}
    if prep.task == "classify" and records:

        def prompts(rs):
            return [prep.template.replace("{text}", r["text"]) for r in rs]

        # Every rank caches the whole set's shared prefix: the same forward passes everywhere.
        shared = shared_prefix(tokenizer, prompts(records)) if ctx.enabled else None
        preds = predictions(
            lambda rs: classify(
                model, tokenizer, prompts(rs), prep.label_words, shared_prefix=shared
            )
        )
        return {"accuracy": accuracy(preds, labels)}
    if prep.task == "lm" and prep.val_blocks is not None and split_records is None:
        blocks = list(prep.val_blocks[: cfg.eval_examples or None])
        mine, real = split_evenly(blocks, ctx)
        total, count = nll(model, torch.stack(mine), real=real) if mine else (0.0, 0)
        total, count = all_sum([total, count], ctx)
        return {"perplexity": math.exp(total / max(count, 1))}
    return {}


@torch.no_grad()
def predict_classes(model, tokenizer, records, max_len: int, batch_size: int = 64) -> list[int]:
    """Argmax class of a sequence-classification model for each record's text."""
    was_training = model.training
    model.eval()
    preds: list[int] = []
    for i in range(0, len(records), batch_size):
        texts = [r["text"] for r in records[i : i + batch_size]]
        enc = tokenizer(
            texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt"
        )
        preds.extend(model(**to_device(dict(enc), model)).logits.argmax(-1).tolist())
    model.train(was_training)
    return preds


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: nn.Module | None = None,
    tokenizer=None,
) -> dict[str, Any]:
    """Run training.

    Args:
        cfg: the run.
        resume: continue from the checkpoint in ``cfg.output`` (its config must match).
        overwrite: start afresh even if ``cfg.output`` holds a checkpoint.
        model, tokenizer: use these instead of loading ``cfg.model``.

    Returns:
        ``{"summary": ..., "model": ..., "tokenizer": ..., "prepared": ...}``; the summary is also
        written to ``<output>/summary.json``.
    """
    from tqdm.auto import tqdm

    from . import distributed as dist
    from .models import load_model

    ctx = dist.setup()
    if ctx.enabled:
        dist.check_batch(cfg.batch_size, cfg.micro_batch_size, ctx.world)
    out = Path(cfg.output)
    checkpoint = find_checkpoint(out)
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out}")
    if not resume and checkpoint is not None and not overwrite:
        raise FileExistsError(
            f"{out} already holds a checkpoint; pass --resume to continue or --overwrite to start over"
        )
    if not resume:  # starting over: an older run's checkpoint must not be resumed by mistake
        dist.barrier(ctx)  # every rank has looked for a checkpoint before rank 0 removes it
        if ctx.is_main:
            for name in ("checkpoint", "checkpoint.old"):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        checkpoint = None
    torch.manual_seed(cfg.seed)
    train_records, val_records = load_splits(cfg)
    task = resolve_task(cfg, train_records[0])
    if model is None:
        if task == "seq-cls":
            names = label_names(cfg, train_records)
            model, tokenizer = load_model(
                cfg.model,
                task="sequence-classification",
                dtype=DTYPES[cfg.dtype],
                num_labels=len(names),
            )
        else:
            model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
    prep = prepare_data(cfg, tokenizer, task, train_records, val_records)
    if cfg.reduce_memory:
        from .memory import reduce_activation_memory

        reduce_activation_memory(model, checkpointing=cfg.checkpointing)
    elif cfg.checkpointing:
        from .memory import enable_checkpointing

        enable_checkpointing(model)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        heads = tuple(h for h in HEADS if task == "seq-cls" and hasattr(model, h))
        inject(model, cfg.lora_config(modules_to_save=heads))
    if cfg.device != "auto":
        model.to(cfg.device)
    elif ctx.enabled or torch.cuda.is_available():
        model.to(ctx.device if ctx.enabled else "cuda")
    if cfg.init == "gradient_svd" and cfg.method != "full" and checkpoint is None:
        from .methods.lors import gradient_svd_init

        micro = cfg.micro_batch_size or cfg.batch_size
        first = prep.train[: cfg.init_samples]
        batches = [
            collate(first[i : i + micro], _pad_id(tokenizer)) for i in range(0, len(first), micro)
        ]
        gradient_svd_init(model, lambda m, b: batch_loss(m, b) / n_targets(first), batches)
    meta = load_weights(checkpoint, model, cfg) if checkpoint else None
    trainable, total = count_parameters(model)
    base_model = model
    if ctx.enabled:
        model = dist.wrap(model, cfg.strategy, ctx)  # after loading: FSDP shards in place
        torch.manual_seed(cfg.seed + ctx.rank)  # per-rank dropout masks
    params = [p for _, p in _trainable(model)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step = 0
    if checkpoint:
        step = load_trainer_state(checkpoint, meta, optimizer, scheduler, cfg, ctx)

    main = ctx.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "metrics.jsonl"
    rows = _read_metrics(metrics_file, up_to=step) if main else []
    pad = _pad_id(tokenizer)
    per_rank = cfg.batch_size // ctx.world
    micro = cfg.micro_batch_size or per_rank
    model.train()
    t_start, tokens_seen = time.perf_counter(), 0
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (cfg.progress and main),
        desc=f"{cfg.method} train",
    )
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        idx = batch_indices(step, cfg.batch_size, len(prep.train), cfg.seed)
        batch = [prep.train[i] for i in idx]
        count = n_targets(batch)  # of the global batch: every rank divides by the same number
        mine = dist.shard(batch, ctx)
        loss_sum, tokens = 0.0, 0
        for j in range(0, len(mine), micro):
            mb = collate(mine[j : j + micro], pad)
            with dist.no_sync(model, skip=j + micro < len(mine)):
                loss = batch_loss(model, mb)
                # x world: DDP / FSDP average the ranks' gradients, the global loss is their sum.
                (loss * ctx.world / max(count, 1)).backward()
            loss_sum += loss.detach().item()
            tokens += int(mb["attention_mask"].sum())
        loss_sum, tokens = dist.all_sum([loss_sum, tokens], ctx)
        tokens_seen += int(tokens)
        loss_value = loss_sum / max(count, 1)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        norm = dist.full(norm)
        if not math.isfinite(loss_value) or not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            last = find_checkpoint(out)
            what = (
                f"loss is {loss_value}"
                if not math.isfinite(loss_value)
                else f"gradient norm is {float(norm)}"
            )
            raise FloatingPointError(
                f"{what} at step {step + 1}; stopping before the optimizer step. "
                + (
                    f"The last good checkpoint is {last}."
                    if last
                    else "No checkpoint was written yet."
                )
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        row = {
            "step": step,
            "loss": loss_value,
            "lr": scheduler.get_last_lr()[0],
            "step_s": dt,
            "tok_per_s": sum(len(e["input_ids"]) for e in batch) / dt,
        }
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics = evaluate(dist.unwrap(model), tokenizer, prep, cfg, ctx=ctx)
            row.update({f"val_{k}": v for k, v in metrics.items()})
        rows.append(row)
        if main:
            _append_metric(metrics_file, row)
        bar.set_postfix(
            loss=f"{loss_value:.4f}",
            tok_s=f"{row['tok_per_s']:.0f}",
            mem=f"{peak_memory_mib():.0f}MiB",
        )
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save_checkpoint(out / "checkpoint", base_model, optimizer, scheduler, cfg, step, ctx)
    bar.close()
    save_checkpoint(out / "checkpoint", base_model, optimizer, scheduler, cfg, step, ctx)
    final = evaluate(dist.unwrap(model), tokenizer, prep, cfg, ctx=ctx)
    if rows:
        rows[-1].update({f"val_{k}": v for k, v in final.items()})
    _save_result(base_model, tokenizer, cfg, out, ctx)
    elapsed = time.perf_counter() - t_start
    summary = {
        "method": cfg.method,
        "steps": step,
        "trainable_params": trainable,
        "total_params": total,
        "time_s": elapsed,
        "tokens_per_s": tokens_seen / elapsed if elapsed else 0.0,
        "peak_memory_mib": peak_memory_mib(),
        "final_loss": rows[-1]["loss"] if rows else None,
        **{f"val_{k}": v for k, v in final.items()},
        "output": str(out),
    }
    if ctx.enabled:
        summary["world_size"], summary["strategy"] = ctx.world, cfg.strategy
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _write_metrics_csv(out / "metrics.csv", rows)
        plot_losses(rows, out / "loss.png", title=f"{cfg.method} on {cfg.data}")
    dist.barrier(ctx)  # no rank returns (and reads outputs) before rank 0 has written them
    return {"summary": summary, "model": base_model, "tokenizer": tokenizer, "prepared": prep}


def _save_result(model, tokenizer, cfg: TrainConfig, out: Path, ctx: Context) -> None:
    """The trained adapter (or full model) under ``out``; gathered on every rank, written once."""
    from .adapters import adapter_payload, write_adapter
    from .distributed import full

    if cfg.method != "full":
        payload = adapter_payload(model)
        if ctx.is_main:
            write_adapter(out / "adapter", payload)
        return
    if ctx.enabled:  # FSDP shards: gather each tensor whole into a state dict first
        state = {k: full(v).cpu() for k, v in model.state_dict().items()}
        if ctx.is_main:
            model.save_pretrained(out / "model", state_dict=state)
    else:
        model.save_pretrained(out / "model")
    if ctx.is_main:
        tokenizer.save_pretrained(out / "model")


def _read_metrics(file: Path, up_to: int) -> list[dict[str, Any]]:
    if not file.exists():
        return []
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] <= up_to]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))  # drop steps after the checkpoint
    return rows


def _append_metric(file: Path, row: dict[str, Any]) -> None:
    with file.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _write_metrics_csv(file: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    with file.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_losses(rows: list[dict[str, Any]], file: Path, title: str = "") -> Path | None:
    """Training loss per step (and any validation metric) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    evals = [(r["step"], k, v) for r in rows for k, v in r.items() if k.startswith("val_")]
    if evals:
        ax2 = ax.twinx()
        for key in sorted({k for _, k, _ in evals}):
            pts = [(s, v) for s, k, v in evals if k == key]
            ax2.plot(*zip(*pts, strict=True), "o-", color="tab:orange", label=key)
        ax2.set_ylabel("validation")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return file

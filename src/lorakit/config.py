"""LoRAConfig: what to adapt and how. A frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .constants import BUILTIN_DATA
from .precision import Attention, check_precision

Method = Literal["lora", "lora_fa", "lors"]


@dataclass(frozen=True)
class Capabilities:
    """What a method supports. Declared once per method in :data:`CAPABILITIES` and enforced
    where an adapter is configured (``LoRAConfig``), injected (``inject``, ``AdaptedLayer``)
    and saved (``save_adapter``); a new method adds one line there."""

    kinds: frozenset[str]  # what it adapts: "linear", "conv1d", "embedding", "experts" (MoE)
    dropout: bool  # implements LoRAConfig.dropout
    trainable_base: bool  # the base weight/bias may also train (its backward computes dW)
    peft_exact: bool  # PEFT's plain LoRA computes the same function from the saved A and B
    sparse_base: bool  # keeps the base's zero pattern, so it needs a pruned base


_ALL_KINDS = frozenset({"linear", "conv1d", "embedding", "experts"})
CAPABILITIES: dict[str, Capabilities] = {
    "lora": Capabilities(
        _ALL_KINDS, dropout=True, trainable_base=True, peft_exact=True, sparse_base=False
    ),
    "lora_fa": Capabilities(
        _ALL_KINDS, dropout=True, trainable_base=False, peft_exact=True, sparse_base=False
    ),
    # One GEMM with the masked W' = (W + s·B A) ⊙ M: no separate adapter input to drop, no dense
    # W (so no embeddings, which are not pruned), and PEFT would apply s·B A unmasked.
    "lors": Capabilities(
        frozenset({"linear", "conv1d"}),
        dropout=False,
        trainable_base=False,
        peft_exact=False,
        sparse_base=True,
    ),
}
METHODS: tuple[str, ...] = tuple(CAPABILITIES)
INITS: tuple[str, ...] = ("kaiming", "gaussian", "gradient_svd")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A config field: its default and its one-line help (the CLI flag's), side by side.

    ``parse`` in ``meta``: how the CLI turns the flag's text into the value.
    """
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def parse_list(value: str) -> tuple[str, ...]:
    """``a,b,c`` -> ``("a", "b", "c")``."""
    return tuple(t.strip() for t in value.split(",") if t.strip())


def parse_targets(value: str) -> str | tuple[str, ...]:
    """``all-linear``, a comma-separated list of module-name suffixes, or ``re:<regex>``."""
    if value == "all-linear":
        return value
    return value[3:] if value.startswith("re:") else parse_list(value)


def _checked_targets(targets: Any) -> str | tuple[str, ...]:
    ok = isinstance(targets, str) and targets
    if isinstance(targets, (list, tuple)):
        targets = tuple(targets)
        ok = targets and all(isinstance(t, str) and t for t in targets)
    if not ok:
        raise ValueError(
            f"targets must be 'all-linear', a regex string or a non-empty list of "
            f"module-name suffixes, got {targets!r}"
        )
    return targets


@dataclass(frozen=True)
class LoRAConfig:
    """Configuration of one low-rank adapter.

    Example:
        ``LoRAConfig(method="lora", rank=16, alpha=32, targets="all-linear")``
    """

    method: Method = opt("lora", "adapter method")
    rank: int = opt(8, "adapter rank r: the inner dimension of B A")
    alpha: float = opt(
        16.0, "scaling numerator: s = alpha / r, or alpha / sqrt(r) with use_rslora (lors default)"
    )
    dropout: float = opt(0.0, "dropout on the adapter input, in [0, 1) (lora, lora_fa)")
    targets: str | tuple[str, ...] = opt(
        "all-linear",
        "layers to adapt: all-linear | module-name suffixes (CLI: q_proj,v_proj) | a regex "
        "(CLI: re:<regex>)",
        parse=parse_targets,
    )
    init: Literal["kaiming", "gaussian", "gradient_svd"] = opt(
        "kaiming",
        "A's init (B starts at zero); gradient_svd: kaiming until lk.gradient_svd_init sets A "
        "from the data's mean dense gradient (lorakit train does it; LoRS / LoRA-GA)",
    )
    use_rslora: bool | None = opt(
        None, "s = alpha / sqrt(r) (rsLoRA); default: on for lors (its scripts), off otherwise"
    )
    bias: Literal["none"] = opt("none", "biases stay frozen (PEFT's bias='none')")
    adapter_dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = opt(
        None,
        "dtype of the adapter weights and their optimizer states; default: float32 on a 16-bit "
        "base (bfloat16 / float16: fp32 master weights, as PEFT), else the base layer's",
    )
    modules_to_save: tuple[str, ...] = opt(
        (), "module-name suffixes trained fully and saved with the adapter", parse=parse_list
    )
    grad_correction: bool = opt(
        False, "lora_fa: LoRA-FA v2 gradient correction g_B (A Aᵀ)⁻¹ / s² before the optimizer"
    )
    sparse_grad: Literal["exact", "straight_through"] = opt(
        "exact", "lors: exact masked adapter gradient, or the paper's straight-through one"
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.dropout and not self.capabilities.dropout:
            with_dropout = [m for m, c in CAPABILITIES.items() if c.dropout]
            raise ValueError(
                f"method {self.method!r} does not support dropout (got dropout={self.dropout}); "
                f"use dropout=0.0, or one of {with_dropout}"
            )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' (biases stay frozen), got {self.bias!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in DTYPES:
            raise ValueError(
                f"adapter_dtype must be None (float32 on a 16-bit base, else the base's dtype) "
                f"or one of {list(DTYPES)}, "
                f"got {self.adapter_dtype!r}"
            )
        if self.sparse_grad not in ("exact", "straight_through"):
            raise ValueError(
                f"sparse_grad must be 'exact' or 'straight_through', got {self.sparse_grad!r}"
            )
        if self.sparse_grad != "exact" and self.method != "lors":
            raise ValueError(f"sparse_grad is a LoRS option; method is {self.method!r}")
        if self.use_rslora is None:
            object.__setattr__(self, "use_rslora", self.method == "lors")
        if self.grad_correction and self.method != "lora_fa":
            raise ValueError(f"grad_correction is a LoRA-FA option; method is {self.method!r}")
        object.__setattr__(self, "targets", _checked_targets(self.targets))
        mts = self.modules_to_save
        if isinstance(mts, str) or not all(isinstance(m, str) and m for m in mts):
            raise ValueError(f"modules_to_save must be a list of module-name suffixes, got {mts!r}")
        object.__setattr__(self, "modules_to_save", tuple(mts))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def capabilities(self) -> Capabilities:
        """What this config's method supports."""
        return CAPABILITIES[self.method]

    @property
    def scaling(self) -> float:
        """s multiplying B A."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def dtype(self) -> torch.dtype | None:
        """The adapter dtype asked for explicitly, or None for the default (:meth:`dtype_for`)."""
        return None if self.adapter_dtype is None else DTYPES[self.adapter_dtype]

    def dtype_for(self, base: torch.dtype) -> torch.dtype:
        """The adapter parameters' dtype on a base layer whose (dense) weight is ``base``.

        ``adapter_dtype`` if given; else float32 for a 16-bit base: a bfloat16 master weight
        loses every update smaller than half its spacing (2^-9 to 2^-8 of its value, so an AdamW
        step of lr 1e-4 on |A| ~ 0.1 rounds away), while the fp32 copy is only r·(in + out)
        numbers per layer (PEFT's ``autocast_adapter_dtype`` does the same). Other floating
        bases keep their dtype (float32, float64); a non-float one gets float32.
        """
        if self.adapter_dtype is not None:
            return DTYPES[self.adapter_dtype]
        if base in (torch.bfloat16, torch.float16) or not base.is_floating_point:
            return torch.float32
        return base

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["targets"], tuple):
            d["targets"] = list(d["targets"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Build a config from a dict (a file, the CLI); unknown keys are an error."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown LoRAConfig keys {unknown}; allowed keys are {allowed}")
        return cls(**data)

    def replace(self, **changes: Any) -> LoRAConfig:
        """A copy with some fields changed (validated like a new config)."""
        return self.from_dict({**self.to_dict(), **changes})


# The adapter a training run injects unless told otherwise.
TRAIN_ADAPTER = LoRAConfig(rank=16, alpha=32.0)
FULL = "full"  # method name of full fine-tuning: no adapter, every weight trains
TASKS = ("auto", "lm", "classify", "sft", "chat", "seq-cls")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: everything that decides its result, and where it goes.

    ``adapter`` is the :class:`LoRAConfig` injected (None: full fine-tuning, ``method="full"``).
    Files and the CLI see one flat mapping of both (:meth:`to_flat` / :meth:`from_flat`): the
    adapter's fields sit next to the run's, ``method`` may also be ``"full"``.
    """

    model: str = opt("smollm2-135m", "embedded model (smollm2-135m, minilm), HF folder or hub id")
    data: str = opt(
        "rotten-tomatoes",
        f"built-in dataset ({', '.join(BUILTIN_DATA)}), .jsonl/.txt/.csv file or datasets name",
    )
    val_data: str | None = opt(
        None, "validation data; default: the dataset's validation split (none for a local file)"
    )
    adapter: LoRAConfig | None = opt(TRAIN_ADAPTER, "the adapter; None: full fine-tuning")
    reduce_memory: bool = opt(
        False, "reduce_activation_memory: chunked loss, norm/MLP recompute, sdpa (causal LMs)"
    )
    checkpointing: bool = opt(False, "activation checkpointing per transformer block")
    compile: bool = opt(False, "torch.compile the model (inductor): same loss, fused kernels")
    offload: bool = opt(
        False, "with checkpointing: keep the checkpointed block inputs in host memory"
    )
    fit: str | None = opt(
        None, "a memory budget (e.g. 24GiB): plan first, take the cheapest setting that fits"
    )
    mlp_tile: int | None = opt(
        None, "with reduce_memory: run each MLP over at most this many tokens at a time"
    )
    init_samples: int = opt(128, "init gradient_svd: training examples whose mean gradient it uses")
    task: Literal["auto", "lm", "classify", "sft", "chat", "seq-cls"] = opt(
        "auto",
        "auto: labelled data -> classify (causal LM, label words) or seq-cls (encoder + head); "
        "prompt/completion -> sft; messages -> chat (assistant-only loss); text -> lm",
    )
    chat_template: str | None = opt(
        None, "chat: a Jinja chat template file (default: the tokenizer's own)"
    )
    packing: bool = opt(
        False,
        "pack each micro-batch's examples into rows of max_len (best-fit decreasing); positions "
        "restart and attention stays inside every example",
    )
    prompt: Literal["auto", "chat", "plain"] = opt(
        "auto", "classification prompt: chat template, short plain prompt, or chat if there is one"
    )
    label_names: tuple[str, ...] = opt(
        (),
        "classification: the class names for labels 0, 1, ... (CLI: negative,positive), asked for "
        "in the prompt and answered; default: the data set's own names, else the label values",
        parse=parse_list,
    )
    max_steps: int = opt(100, "optimizer steps")
    epochs: float = opt(0.0, "passes over the training data; sets max_steps (0: max_steps decides)")
    batch_size: int = opt(16, "global batch, in examples (lm: windows of max_len tokens)")
    micro_batch_size: int = opt(0, "examples per forward pass (accumulation); 0: the whole batch")
    lr: float = opt(1e-3, "peak learning rate")
    warmup: float = opt(0.06, "warmup as a fraction of max_steps (the LoRA paper's GLUE setting)")
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "schedule after warmup")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping (0: off)")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "model dtype")
    attn_implementation: Attention = opt("auto", "attention kernel; auto: the model's default")
    quantize: Literal["none", "nf4", "fp4"] = opt(
        "none", "4-bit frozen base (QLoRA, bitsandbytes): nf4 | fp4; none: full precision"
    )
    double_quant: bool = opt(True, "with --quantize: quantize the block scales too (QLoRA's)")
    seed: int = opt(0, "random seed")
    max_len: int = opt(256, "tokens per example (lm: window length); prompts cut from the left")
    eval_every: int = opt(0, "evaluate every N steps (0: at the end only)")
    early_stopping_patience: int = opt(0, "stop after N evals without a better val metric (0: off)")
    eval_examples: int = opt(0, "validation examples per evaluation (0: all)")
    save_every: int = opt(50, "checkpoint every N steps (0: only at the end)")
    output: str = opt("runs/lorakit", "output folder: adapter, checkpoint, metrics, plot")
    progress: bool = opt(True, "progress bar")
    report_to: tuple[str, ...] = opt(
        (),
        "experiment trackers: tensorboard (<output>/tensorboard), wandb (honours WANDB_MODE, "
        "WANDB_PROJECT); CLI: tensorboard,wandb (default: none)",
        parse=parse_list,
    )
    device: str = opt("auto", "auto (cuda if available; torchrun: cuda:LOCAL_RANK), cpu, cuda:N")
    strategy: Literal["ddp", "fsdp"] = opt(
        "ddp",
        "under torchrun: ddp (replicated base, adapter gradients all-reduced) or fsdp (FSDP2, "
        "every transformer block sharded)",
    )

    def __post_init__(self) -> None:
        if self.adapter is not None and not isinstance(self.adapter, LoRAConfig):
            raise ValueError(f"adapter must be a LoRAConfig or None, got {self.adapter!r}")
        for name in ("task", "prompt", "schedule", "dtype", "strategy", "quantize"):
            _check_choice(self, name)
        check_precision(self)  # float16 (a loss scaler), attn_implementation
        if self.quantize != "none" and self.adapter is None:
            raise ValueError(
                "full fine-tuning trains every weight, but a 4-bit weight has no gradient; "
                "use an adapter method (lora, lora_fa, lors) with quantize, or quantize=none"
            )
        if (
            self.quantize != "none"
            and self.adapter is not None
            and self.adapter.init == "gradient_svd"
        ):
            raise ValueError(
                "init gradient_svd needs a dense base: it takes every adapted weight's gradient, "
                f"and a 4-bit weight has none; got quantize={self.quantize!r} (use init kaiming "
                "or gaussian with quantize, or quantize=none)"
            )
        if self.quantize != "none" and self.strategy == "fsdp":
            raise ValueError(
                "FSDP2 cannot shard bitsandbytes' 4-bit weights (packed uint8 whose quant "
                "state lives outside the tensor); use strategy=ddp (a 4-bit base is ~4.5 bits "
                "per weight, small enough to replicate), or fsdp on a full-precision base"
            )
        for name in ("max_steps", "batch_size", "max_len", "lr", "init_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        nonnegative = ("micro_batch_size", "max_grad_norm", "eval_every", "eval_examples", "epochs")
        for name in (*nonnegative, "save_every", "weight_decay", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_tile(self)
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            valid = [d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]
            raise ValueError(
                f"micro_batch_size {micro} must divide batch_size {self.batch_size}; "
                f"valid choices: {valid}"
            )
        names = self.label_names
        if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"label_names must be a list of non-empty class names, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"label_names must be distinct, got {list(names)}")
        object.__setattr__(self, "label_names", tuple(names))
        from .tracking import checked_trackers

        object.__setattr__(self, "report_to", checked_trackers(self.report_to))
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of max_steps in [0, 1), got {self.warmup}")
        try:
            torch.device(self.device if self.device != "auto" else "cpu")
        except RuntimeError as e:
            raise ValueError(
                f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}"
            ) from e

    @property
    def method(self) -> str:
        """The adapter's method, or ``"full"``."""
        return FULL if self.adapter is None else self.adapter.method

    def to_flat(self) -> dict[str, Any]:
        """One flat, JSON/YAML-ready mapping: the run's fields and the adapter's."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # the adapter's keys where the adapter field is
            if f.name != "adapter":
                value = getattr(self, f.name)
                flat[f.name] = list(value) if isinstance(value, tuple) else value
            else:
                flat.update({"method": FULL} if self.adapter is None else self.adapter.to_dict())
        return flat

    @classmethod
    def flat_keys(cls) -> list[str]:
        """The keys of :meth:`to_flat`, in its order."""
        lora = [f.name for f in dataclasses.fields(LoRAConfig)]
        fields = dataclasses.fields(cls)
        return [k for f in fields for k in (lora if f.name == "adapter" else [f.name])]

    @classmethod
    def from_flat(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a run from a flat mapping (a file, the CLI); unknown keys are an error.

        Missing keys take their defaults (the adapter's: :data:`TRAIN_ADAPTER`'s).
        """
        valid = cls.flat_keys()
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(valid)}")
        from .fieldtypes import coerce_fields  # "4e-3" (YAML 1.1), "0.004", 4e-3: one float

        data = coerce_fields(data, cls, LoRAConfig, choices={"method": (FULL,)})
        lora_keys = {f.name for f in dataclasses.fields(LoRAConfig)}
        run = {k: v for k, v in data.items() if k not in lora_keys}
        adapter_opts = {k: v for k, v in data.items() if k in lora_keys}
        if adapter_opts.get("method") == FULL:  # other adapter keys configure nothing then
            return cls(**run, adapter=None)
        defaults = TRAIN_ADAPTER.to_dict()
        if "method" in adapter_opts and "use_rslora" not in adapter_opts:
            defaults["use_rslora"] = None  # re-derived for the method asked for
        return cls(**run, adapter=LoRAConfig.from_dict({**defaults, **adapter_opts}))


def _check_tile(cfg: Any) -> None:
    for name, needs in (("offload", "checkpointing"), ("mlp_tile", "reduce_memory")):
        if getattr(cfg, name) not in (None, False) and not getattr(cfg, needs):
            raise ValueError(
                f"{name} needs {needs} on (offload moves what checkpointing keeps; "
                f"mlp_tile tiles the MLPs reduce_memory patches)"
            )
    if cfg.mlp_tile is not None and cfg.mlp_tile <= 0:
        raise ValueError(f"mlp_tile must be a positive number of tokens, got {cfg.mlp_tile}")


def _check_choice(cfg: Any, name: str) -> None:
    """A Literal-typed field holds one of its values."""
    import typing

    allowed = typing.get_args(typing.get_type_hints(type(cfg))[name])
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(cfg, name)!r}")

"""The job spec (DESIGN §5) as pydantic models, and the resolution of its "auto" values.

A `JobSpec` is what a user sends; `resolve_spec` turns it into a `ResolvedSpec` in which
every "auto" is a number chosen from the dataset and the model's limits. Unknown fields are
refused and every number has a range, so a spec that validates is one the engine can run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from peft_engine.data.formats import PREFERENCE_OBJECTIVES
from peft_engine.errors import SpecError
from peft_engine.eval_plan import plan_evaluation
from peft_engine.methods import METHODS
from peft_engine.methods.common import HEAD_TASKS
from peft_engine.methods.lora import LoraMethod
from peft_engine.rates import auto_learning_rate, head_learning_rate
from peft_engine.spec_delivery import ExportSpec, Integrations, ServingSpec, check_export_spec
from peft_engine.spec_errors import (
    METADATA_KEY_PATTERN,
    METADATA_MAX_KEYS,
    METADATA_MAX_VALUE_CHARS,
    spec_error_from,
)

Auto = Literal["auto"]
MetadataKey = Annotated[str, Field(pattern=METADATA_KEY_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EarlyStopping(_Strict):
    """Stop when eval loss has not improved by `min_delta` for `patience` evaluations."""

    patience: int = Field(3, ge=1, le=1000)
    min_delta: float = Field(0.0, ge=0.0, le=10.0)


class ReduceOnPlateau(_Strict):
    """Multiply the learning rate by `factor` when eval loss has not improved by more than
    `threshold` (relative) for `patience` evaluations; never below `min_lr_ratio` of the peak."""

    factor: float = Field(0.5, gt=0.0, lt=1.0)
    patience: int = Field(1, ge=1, le=1000)
    threshold: float = Field(1e-4, ge=0.0, le=1.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)


def _method_type(value: Any) -> Any:
    # A method without "type" is LoRA, the default.
    return value.get("type", "lora") if isinstance(value, dict) else getattr(value, "type", None)


# Every registered method's spec, told apart by "type".
Method = Annotated[
    Union[tuple(Annotated[m.spec, Tag(m.type)] for m in METHODS.values())],  # noqa: UP007
    Discriminator(_method_type),
]


class Hyperparameters(_Strict):
    n_epochs: Annotated[int, Field(ge=1, le=100)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = "auto"
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] | Auto = "auto"
    # The new task head's peak rate (classification tasks): "auto" gives it a higher rate
    # than the body's, as a head starts from nothing while the body only adjusts. head_only
    # trains nothing but the head, at learning_rate.
    head_learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] | Auto = "auto"
    lr_scheduler: Literal["linear", "cosine", "constant", "reduce_on_plateau"] = "cosine"
    # The plateau rule when lr_scheduler is "reduce_on_plateau" (defaults when null).
    reduce_on_plateau: ReduceOnPlateau | None = None
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0, le=1000.0)
    max_seq_length: Annotated[int, Field(ge=16, le=131072)] | Auto = 1024
    packing: bool = True
    train_on_inputs: bool = False
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    # Caps the number of optimizer steps; null trains for n_epochs.
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    early_stopping: EarlyStopping | None = EarlyStopping()
    eval_every_steps: int | None = Field(None, ge=1, le=10_000_000)
    # The share of the job's compute the periodic evaluations may take when eval_every_steps
    # is null: fewer evaluations, then a fixed sample of the validation set (plan_evaluation).
    eval_budget: float = Field(0.15, gt=0.0, le=1.0)
    checkpoint_every_steps: int | None = Field(None, ge=1, le=10_000_000)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    # The compute mode (peft_engine/precision.py): "auto" is bf16 autocast on a CUDA device
    # with bf16, fp16 with a GradScaler on an older one, fp32 on a CPU. The device refuses a
    # mode it cannot run when the job starts.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Recompute activations in the backward pass (peft_engine/activation_checkpointing.py):
    # less memory for one more forward pass; "auto": on a GPU the job would not fit without it.
    gradient_checkpointing: bool | Auto = "auto"
    # The frozen base's storage (peft_engine/quantization.py): "auto" keeps it in the compute
    # dtype; "nf4" loads it 4-bit NF4 with bitsandbytes (QLoRA), LoRA on causal_lm only.
    base_precision: Literal["auto", "nf4"] = "auto"
    # seq_classification: how the head pools the body ("auto": as the model was trained),
    # and per-class loss weights ("balanced", or {label: weight}, others 1).
    pooling: Literal["auto", "mean", "cls", "pooler", "last"] = "auto"
    class_weights: (
        Literal["balanced"]
        | Annotated[
            dict[Annotated[str, Field(max_length=256)], Annotated[float, Field(gt=0, le=1e6)]],
            Field(min_length=1, max_length=10_000),
        ]
        | None
    ) = None


class Resources(_Strict):
    # The devices one job runs on: with more than 1 the worker runs the engine under torchrun,
    # data parallel over that many GPUs of its machine (peft_engine/distributed.py); a CPU
    # worker runs that many processes. The global batch, and so the result, stays the same.
    gpus: int = Field(1, ge=1, le=64)


TaskName = Literal[
    "causal_lm", "seq_classification", "token_classification", "image_classification"
]


class JobSpec(_Strict):
    model: str = Field(min_length=1, max_length=64)
    task: TaskName = "causal_lm"
    training_file: str | None = Field(None, min_length=1, max_length=4096)
    validation_file: str | None = Field(None, min_length=1, max_length=4096)
    validation_split: float = Field(0.1, ge=0.0, le=0.5)
    method: Method = LoraMethod()
    hyperparameters: Hyperparameters = Hyperparameters()
    resources: Resources = Resources()
    # What happens to the result (spec_delivery.py): no effect on the training.
    export: ExportSpec | None = None
    serving: ServingSpec | None = None
    integrations: Integrations = Field(default_factory=list)
    # Seconds of training the job may take, over all its attempts (the time to each resumed
    # checkpoint, not the lost steps after it); then it stops and keeps its best weights.
    max_runtime_seconds: int | None = Field(None, ge=1, le=30 * 24 * 3600)
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    metadata: dict[MetadataKey, Annotated[str, Field(max_length=METADATA_MAX_VALUE_CHARS)]] = Field(
        default_factory=dict, max_length=METADATA_MAX_KEYS
    )


def parse_spec(data: Any) -> JobSpec:
    """Validate a decoded JSON spec; the first problem becomes a SpecError naming its field."""
    try:
        # Strict: "16" is not 16, nor 1 true. A spec means what its JSON types say, as the
        # API's schema shows it (a lax parse would accept what the schema calls invalid).
        spec = JobSpec.model_validate(_whole_floats_as_ints(data), strict=True)
    except ValidationError as exc:
        raise spec_error_from(exc) from None
    check_spec(spec)
    return spec


def _whole_floats_as_ints(value: Any) -> Any:
    """JSON does not tell 3 from 3.0 (JSON Schema's integer is either); strict pydantic does."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_floats_as_ints(item) for item in value]
    return value


def check_spec(spec: JobSpec) -> None:
    """Rules across fields: options that only one task or method can use."""
    hp = spec.hyperparameters
    for name, tasks in (
        ("pooling", ("seq_classification",)),
        ("class_weights", ("seq_classification", "image_classification")),
        ("head_learning_rate", HEAD_TASKS),
    ):
        chosen = name in hp.model_fields_set and getattr(hp, name) not in (None, "auto")
        if chosen and spec.task not in tasks:
            raise SpecError(
                f"applies to {' and '.join(tasks)} only, not {spec.task}",
                param=f"hyperparameters.{name}",
            )
    if hp.reduce_on_plateau is not None and hp.lr_scheduler != "reduce_on_plateau":
        raise SpecError(
            'is used only with lr_scheduler "reduce_on_plateau"',
            param="hyperparameters.reduce_on_plateau",
        )
    if spec.method.type == "head_only" and hp.head_learning_rate != "auto":
        raise SpecError(
            "head_only trains the head alone, at learning_rate; set that instead",
            param="hyperparameters.head_learning_rate",
        )
    if getattr(spec.method, "init", None) in ("pissa", "olora") and spec.task != "causal_lm":
        # peft's conversion back to a plain adapter does not handle a trained task head
        raise SpecError(
            f"init {spec.method.init!r} is available for causal_lm only", param="method.init"
        )
    if hp.base_precision == "nf4":
        check_nf4_spec(spec)
    method = METHODS[spec.method.type]
    if method.needs_padding and hp.packing and "packing" in hp.model_fields_set:
        raise SpecError(
            f"method {method.type!r} puts virtual tokens in front of every example, so "
            "examples cannot be packed; set packing to false",
            param="hyperparameters.packing",
        )
    if spec.method.objective.type in PREFERENCE_OBJECTIVES:
        check_preference_spec(spec)
    check_export_spec(spec)


def check_nf4_spec(spec: JobSpec) -> None:
    """QLoRA: LoRA adapters over a 4-bit causal LM, initialised the usual way (PiSSA and
    OLoRA rewrite the base weights, which a 4-bit base cannot hold exactly)."""
    where = "hyperparameters.base_precision"
    if spec.task != "causal_lm":
        raise SpecError(f'"nf4" (QLoRA) is for causal_lm only, not {spec.task}', param=where)
    if spec.method.type != "lora":
        raise SpecError(
            f'"nf4" (QLoRA) trains LoRA adapters only, not method {spec.method.type!r}; '
            'use method "lora" or base_precision "auto"',
            param=where,
        )
    if spec.method.init in ("pissa", "olora"):
        raise SpecError(
            f'"nf4" (QLoRA) cannot use init {spec.method.init!r}, which rewrites the base '
            'weights; use init "default" or "gaussian"',
            param=where,
        )


def check_preference_spec(spec: JobSpec) -> None:
    """A preference objective (DPO) compares the model with the base model, which it gets
    by disabling the adapter: a causal LM, an adapter that can be disabled, a base model
    left as it was, and pairs padded side by side (never packed)."""
    objective = spec.method.objective.type
    if spec.task != "causal_lm":
        raise SpecError(
            f"{objective} trains causal_lm only, not {spec.task}", param="method.objective"
        )
    if not METHODS[spec.method.type].disables_adapter:
        able = ", ".join(m.type for m in METHODS.values() if m.disables_adapter)
        raise SpecError(
            f"{objective} compares the model with the base model, which it gets by disabling "
            f"the adapter, and method {spec.method.type!r} has no adapter to disable; "
            f"use one of {able}",
            param="method.type",
        )
    if getattr(spec.method, "init", None) in ("pissa", "olora"):
        raise SpecError(
            f"init {spec.method.init!r} changes the base weights, so disabling the adapter "
            f"would not give the base model that {objective} compares with",
            param="method.init",
        )
    hp = spec.hyperparameters
    if hp.packing and "packing" in hp.model_fields_set:
        raise SpecError(
            f"{objective} runs each pair's two answers side by side, padded, so examples "
            "cannot be packed; set packing to false",
            param="hyperparameters.packing",
        )


# ---------------------------------------------------------------------------------------
# Resolution of "auto" values
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetStats:
    """What resolution needs to know about the tokenized training data."""

    n_train: int
    n_validation: int
    # longest training sequence, before truncation (a preference pair is two: its answers
    # after the prompt, each truncated on its own)
    max_tokens: int
    mean_tokens: float  # tokens of an example after truncation (a pair's: both sequences)
    # mean validation example, after truncation; None: as the training examples
    validation_mean_tokens: float | None = None


@dataclass(frozen=True)
class ModelLimits:
    max_position_embeddings: int | None
    # Tokens one micro-batch may hold; bounds "auto" batch sizes to what fits in memory.
    max_tokens_per_batch: int = 16384


class ResolvedHyperparameters(Hyperparameters):
    n_epochs: int = Field(ge=1, le=100)
    batch_size: int = Field(ge=1, le=1024)
    learning_rate: float = Field(gt=0.0, le=1.0)
    # None: no new task head, or head_only (whose head trains at learning_rate)
    head_learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    max_seq_length: int = Field(ge=16, le=131072)
    total_steps: int = Field(ge=1)
    steps_per_epoch: int = Field(ge=1)
    warmup_steps: int = Field(ge=0)
    # how many validation examples a periodic evaluation uses; None: the whole set
    eval_sample_size: int | None = Field(None, ge=1)
    # with a sample: whether the kept weights are evaluated on the whole set at the end (False
    # when that pass alone would go over eval_budget: the kept weights' numbers are the sample's)
    final_eval_whole_set: bool = True

    # the pooling a seq_classification head uses; None for other tasks
    pooling: Literal["mean", "cls", "pooler", "last"] | None = None


class ResolvedSpec(JobSpec):
    hyperparameters: ResolvedHyperparameters


# OpenAI-style epoch heuristic: aim for 100..25_000 examples seen in total.
_MIN_EXAMPLES_SEEN, _MAX_EXAMPLES_SEEN, _DEFAULT_EPOCHS = 100, 25_000, 3


def resolve_max_seq_length(hp: Hyperparameters, limits: ModelLimits) -> int:
    """The sequence limit before tokenization: the request, bounded by the model's context."""
    model_max = limits.max_position_embeddings
    if hp.max_seq_length == "auto":
        return min(model_max or 2048, 2048)
    if model_max is not None and hp.max_seq_length > model_max:
        if "max_seq_length" not in hp.model_fields_set:
            return model_max  # the default, not the user's choice: fit it to the model
        raise SpecError(
            f"{hp.max_seq_length} exceeds the model's context of {model_max} tokens",
            param="hyperparameters.max_seq_length",
        )
    return hp.max_seq_length


def resolve_spec(
    spec: JobSpec, stats: DatasetStats, limits: ModelLimits, *, pooling: str | None = None
) -> ResolvedSpec:
    """Every "auto" made a number; `pooling` is the task's resolved pooling, when it has one."""
    hp = spec.hyperparameters
    max_seq_length = resolve_max_seq_length(hp, limits)
    if hp.max_seq_length == "auto":
        # Fit the longest example, rounded up to a multiple of 64, within the model's limit.
        max_seq_length = min(max_seq_length, max(64, math.ceil(stats.max_tokens / 64) * 64))

    n_epochs = hp.n_epochs if hp.n_epochs != "auto" else _auto_epochs(stats.n_train)
    pairs = spec.method.objective.type in PREFERENCE_OBJECTIVES
    # Only causal LM packs examples, never with virtual tokens in front of each, and never
    # preference pairs (padded side by side).
    packing = (
        hp.packing
        and spec.task == "causal_lm"
        and not METHODS[spec.method.type].needs_padding
        and not pairs
    )
    batch_size = (
        hp.batch_size
        if hp.batch_size != "auto"
        else _auto_batch_size(stats, max_seq_length, packing, _per_sequence(limits, pairs))
    )
    if batch_size > stats.n_train:
        if hp.batch_size != "auto":
            raise SpecError(
                f"{batch_size} is larger than the {stats.n_train} training examples",
                param="hyperparameters.batch_size",
            )
        batch_size = stats.n_train
    learning_rate = hp.learning_rate if hp.learning_rate != "auto" else auto_learning_rate(spec)
    plateau = _plateau_rule(hp, stats)
    examples_per_step = batch_size * hp.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(stats.n_train / examples_per_step))
    total_steps = steps_per_epoch * n_epochs
    if hp.max_steps is not None:
        total_steps = min(total_steps, hp.max_steps)
    warmup_steps = math.floor(hp.warmup_ratio * total_steps)
    trained_examples = stats.n_train * total_steps / steps_per_epoch  # max_steps may cut
    plan = plan_evaluation(
        total_steps=total_steps,
        train_tokens=trained_examples * stats.mean_tokens,
        n_validation=stats.n_validation,
        validation_mean_tokens=stats.validation_mean_tokens or stats.mean_tokens,
        eval_budget=hp.eval_budget,
        explicit_every=hp.eval_every_steps,
    )
    eval_every = plan.every_steps
    checkpoint_every = hp.checkpoint_every_steps or eval_every or max(1, total_steps // 10)

    resolved = {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "head_learning_rate": head_learning_rate(spec, learning_rate),
        "max_seq_length": max_seq_length,
        "packing": packing,
        "reduce_on_plateau": plateau,
        "pooling": pooling,
        "eval_every_steps": eval_every,
        "eval_sample_size": plan.sample_size,
        "final_eval_whole_set": plan.final_whole_set,
        "checkpoint_every_steps": checkpoint_every,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": warmup_steps,
    }
    resolved_hp = ResolvedHyperparameters(**hp.model_dump(exclude=set(resolved)), **resolved)
    return ResolvedSpec(**spec.model_dump(exclude={"hyperparameters"}), hyperparameters=resolved_hp)


def _plateau_rule(hp: Hyperparameters, stats: DatasetStats) -> ReduceOnPlateau | None:
    """The reduce_on_plateau rule (its defaults when the schedule is chosen without one)."""
    if hp.lr_scheduler != "reduce_on_plateau":
        return hp.reduce_on_plateau
    if stats.n_validation == 0:
        raise SpecError(
            "reduce_on_plateau lowers the learning rate when eval loss stops improving, "
            "so it needs validation data (a validation file or validation_split > 0)",
            param="hyperparameters.lr_scheduler",
        )
    return hp.reduce_on_plateau or ReduceOnPlateau()


def _per_sequence(limits: ModelLimits, pairs: bool) -> ModelLimits:
    """The limits of one of an example's sequences: a preference pair's two answers are padded
    side by side in a micro-batch, so each has half its token budget."""
    if not pairs:
        return limits
    return replace(limits, max_tokens_per_batch=limits.max_tokens_per_batch // 2)


def _auto_epochs(n_train: int) -> int:
    if n_train * _DEFAULT_EPOCHS < _MIN_EXAMPLES_SEEN:
        return min(25, math.ceil(_MIN_EXAMPLES_SEEN / n_train))
    if n_train * _DEFAULT_EPOCHS > _MAX_EXAMPLES_SEEN:
        return max(1, _MAX_EXAMPLES_SEEN // n_train)
    return _DEFAULT_EPOCHS


def _auto_batch_size(
    stats: DatasetStats, max_seq_length: int, packing: bool, limits: ModelLimits
) -> int:
    # About 0.2% of the data per step (as the hosted APIs do), a power of two in [4, 32],
    # and no more tokens per micro-batch than the model's memory budget allows.
    wanted = 2 ** round(math.log2(max(1.0, stats.n_train * 0.002)))
    per_example = min(max_seq_length, stats.mean_tokens if packing else stats.max_tokens)
    fits = max(1, int(limits.max_tokens_per_batch // max(1.0, per_example)))
    return max(1, min(max(wanted, 4), 32, fits))

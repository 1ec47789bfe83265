"""Everything a job needs before a weight is loaded: the model's files, the data, the spec.

All the user's mistakes (bad spec, unknown model, bad data, examples that do not fit) are
found here, in seconds, before the expensive part starts. The service's dry run uses the
same function.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_engine.data.formats import (
    PREFERENCE_OBJECTIVES,
    DataFormat,
    Example,
    job_formats,
    read_examples,
)
from peft_engine.errors import DataError, SpecError
from peft_engine.hooks import Event
from peft_engine.methods import MethodDef, method_for
from peft_engine.models import ModelEntry, ModelRegistry, model_dir, read_model_info
from peft_engine.spec import (
    DatasetStats,
    JobSpec,
    ModelLimits,
    ResolvedSpec,
    resolve_max_seq_length,
    resolve_spec,
)


@dataclass(frozen=True)
class DataPaths:
    """Local paths of the job's data; the spec's file fields may hold service file ids."""

    train: Path
    validation: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", Path(self.train))
        if self.validation is not None:
            object.__setattr__(self, "validation", Path(self.validation))

    @classmethod
    def from_spec(cls, spec: JobSpec) -> DataPaths:
        if spec.training_file is None:
            raise SpecError("no training data given", param="training_file")
        validation = Path(spec.validation_file) if spec.validation_file else None
        return cls(Path(spec.training_file), validation)


@dataclass(frozen=True)
class PreparedJob:
    spec: ResolvedSpec
    entry: ModelEntry
    model_path: Path
    tokenizer: Any  # the task's processor: a tokenizer, or an image processor
    train: Any  # the task's prepared datasets (peft_engine.tasks)
    validation: Any | None
    n_train_examples: int  # as read, before any were dropped
    n_validation_examples: int
    labels: tuple[str, ...] | None = None  # class or tag names, in id order
    task_options: dict[str, Any] = field(default_factory=dict)
    data: DataPaths | None = None  # where the examples came from (diagnostics' previews)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        return pad if pad is not None else 0


def prepare_job(
    spec: JobSpec, data: DataPaths, *, registry: ModelRegistry, cache_dir: Path
) -> PreparedJob:
    from peft_engine.tasks import task_of

    entry = registry.get(spec.model)
    check_support(spec, entry)
    path = model_dir(entry, cache_dir)
    info = read_model_info(path)
    check_family(method_for(spec.method.type), info.model_type)
    limits = ModelLimits(max_position_embeddings=info.max_position_embeddings)

    train_examples, validation_examples = read_job_examples(spec, data)
    cap = resolve_max_seq_length(spec.hyperparameters, limits)
    prepared = task_of(spec).prepare(
        spec,
        train_examples,
        validation_examples,
        path,
        max_seq_length=cap,
        validation_param="validation_file" if data.validation else "training_file",
    )
    train, validation = prepared.train, prepared.validation
    stats = DatasetStats(
        n_train=len(train.examples),
        n_validation=len(validation.examples) if validation else 0,
        max_tokens=train.longest,
        mean_tokens=train.n_tokens / len(train.examples),
        validation_mean_tokens=validation.n_tokens / len(validation.examples)
        if validation and validation.examples
        else None,
    )
    return PreparedJob(
        spec=resolve_spec(spec, stats, limits, pooling=prepared.options.get("pooling")),
        entry=entry,
        model_path=path,
        tokenizer=prepared.processor,
        train=train,
        validation=validation,
        n_train_examples=len(train_examples),
        n_validation_examples=len(validation_examples),
        labels=prepared.labels,
        task_options=prepared.options,
        data=data,
    )


def read_job_examples(spec: JobSpec, data: DataPaths) -> tuple[list[Example], list[Example]]:
    """The training and evaluation examples: the validation file's, or a held-out split."""
    train_examples = read_examples(data.train, param="training_file")
    check_format(spec, train_examples, "training_file")
    if data.validation is not None:
        validation = read_examples(data.validation, param="validation_file")
        check_format(spec, validation, "validation_file")
        return train_examples, validation
    return split_validation(train_examples, spec.validation_split, seed=spec.hyperparameters.seed)


def split_validation(
    examples: list[Example], fraction: float, *, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the examples (at least one) for evaluation, chosen by seed.
    A held-out example whose label (or one of whose tags) no training example has goes
    back to training: a model cannot be scored on a class it was never given."""
    if fraction == 0 or len(examples) < 2:
        return examples, []
    n_holdout = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    indices = list(range(len(examples)))
    random.Random(seed).shuffle(indices)
    held = set(indices[:n_holdout])
    seen = {c for i, e in enumerate(examples) if i not in held for c in _classes(e)}
    for i in sorted(held):
        if not _classes(examples[i]) <= seen:
            held.discard(i)
            seen |= _classes(examples[i])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def _classes(example: Example) -> set[str]:
    """The classes an example is labelled with: its label, or its tags (none otherwise)."""
    record = example.record
    if "label" in record:
        return {str(record["label"])}
    return {str(t) for t in record.get("tags", ())}


def check_format(spec: JobSpec, examples: list[Example], param: str) -> None:
    """The file's format must be one the task trains on with the method's objective (a file
    holds one format): preference pairs for DPO, and for nothing else."""
    found, objective = examples[0].format, spec.method.objective.type
    wanted = job_formats(spec.task, objective)
    if found in wanted:
        return
    if found is DataFormat.PREFERENCE:
        message = (
            "the file holds preference pairs, which train with a preference objective: "
            'set method.objective to {"type": "dpo"}'
        )
    elif objective in PREFERENCE_OBJECTIVES:
        message = (
            f"the file is in {found} format, but method.objective {objective} trains on "
            "preference data (input, preferred_output, non_preferred_output)"
        )
    else:
        message = (
            f"the file is in {found} format, but task {spec.task} trains on "
            f"{' or '.join(wanted)} data"
        )
    raise DataError(message, param=param)


def check_support(spec: JobSpec, entry: ModelEntry) -> None:
    """The model offers the task, and the method works for the task and the model's family."""
    if spec.task not in entry.tasks:
        raise SpecError(
            f"model {entry.name!r} does not support task {spec.task!r} "
            f"(it supports: {', '.join(entry.tasks)})",
            param="task",
        )
    method = method_for(spec.method.type)
    if spec.task not in method.tasks:
        raise SpecError(
            f"method {method.type!r} does not support task {spec.task!r} "
            f"(it supports: {', '.join(method.tasks)})",
            param="method.type",
        )
    if entry.family is not None:
        check_family(method, entry.family)


def check_family(method: MethodDef, family: str) -> None:
    if method.families is not None and family not in method.families:
        raise SpecError(
            f"method {method.type!r} does not support model family {family!r} "
            f"(it supports: {', '.join(method.families)})",
            param="method.type",
        )


def prepared_events(job: PreparedJob) -> list[Event]:
    """What was prepared: examples, tokens, the resolved schedule, and what was cut."""
    from peft_engine.tasks import task_of

    hp = job.spec.hyperparameters
    train = job.train
    unit = task_of(job.spec).unit
    labels = f"{len(job.labels)} labels" if job.labels else ""
    if unit == "images":  # an image is its own unit: "100 training examples (5 labels)"
        counted = labels
    else:
        with_loss = {"tokens": "with loss", "pairs": "pairs"}.get(unit, f"{unit} with labels")
        counted = f"{train.n_tokens} tokens, {train.n_loss_tokens} {with_loss}"
        counted += f"; {labels}" if labels else ""
    events = [
        Event(
            "info",
            f"{len(train.examples)} training examples ({counted}), "
            f"{len(job.validation.examples) if job.validation else 0} validation examples; "
            f"{hp.total_steps} steps of batch {hp.batch_size}x{hp.gradient_accumulation_steps}, "
            f"{hp.n_epochs} epochs, lr {hp.learning_rate:g}",
            {"resolved_hyperparameters": hp.model_dump(), "unit": unit},
        )
    ]
    if train.truncated:
        events.append(
            Event(
                "warning",
                f"{train.truncated} training examples are longer than max_seq_length="
                f"{hp.max_seq_length} and were truncated",
                {"truncated_examples": train.truncated},
            )
        )
    if train.dropped:
        events.append(
            Event(
                "warning",
                f"{train.dropped} training examples had no token to learn from within "
                f"max_seq_length={hp.max_seq_length} and were left out",
                {"dropped_examples": train.dropped},
            )
        )
    return events

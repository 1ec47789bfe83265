"""Recording a succeeded job's figures, and the figures a new job of the model is estimated
with. The worker records; planning reads; both inside the caller's transaction.

The figures are kept per model, task, method type and kind of device: a full fine-tune's
step costs several LoRA steps on the same model, a frozen body's (`head_only`) a fraction
of one. A method no job has used yet borrows another method's figures of the model, which
are closer than the settings' defaults; `basis` says whose they are."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from peft_engine.estimate import Throughput, train_token_cost
from tuneq.db import utcnow
from tuneq.settings import Settings
from tuneq.throughput.models import ModelThroughput

log = logging.getLogger(__name__)

# The mean of a model's first four jobs, then each new job moves a figure a quarter of the
# way to its own: recent enough to follow a new driver or a resident model, steady enough
# that one odd job (a busy machine) does not swing the next estimate.
NEWEST_JOB_WEIGHT = 0.25


@dataclass(frozen=True)
class JobFigures:
    """One job's measured speeds; None where the job did not measure it."""

    device: str  # "cpu" or "cuda:<gpu name>"
    train_tokens_per_second: float
    eval_tokens_per_second: float | None
    load_seconds: float | None
    seconds_per_checkpoint: float | None

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> JobFigures | None:
        """The figures in a result.json (its `timings`, else its overall tokens/s); None when
        it holds no train speed or no device. The train speed is in plain steps' tokens: a
        preference job's steps also ran the reference forward, which its estimate adds back
        (peft_engine.estimate.train_token_cost), so its measured speed is scaled up by it."""
        timings = result.get("timings") or {}
        train = _ratio(timings.get("train_tokens"), timings.get("train_seconds"))
        train = train or _positive(result.get("tokens_per_second"))
        device = result.get("device")
        if train is None or not isinstance(device, str) or not device:
            return None
        train *= train_token_cost(_objective(result))
        load = timings.get("load_seconds")
        return cls(
            device=device_kind(device),
            train_tokens_per_second=train,
            eval_tokens_per_second=_ratio(timings.get("eval_tokens"), timings.get("eval_seconds")),
            load_seconds=_positive(load) if load != 0 else 0.0,  # 0: a resident model
            seconds_per_checkpoint=_ratio(
                timings.get("checkpoint_seconds"), timings.get("checkpoints")
            ),
        )


def method_type(result: dict[str, Any]) -> str:
    """The job's method type, as its estimate is asked for it ("" when the result has none)."""
    method = (result.get("spec") or {}).get("method")
    kind = method.get("type") if isinstance(method, dict) else None
    return kind if isinstance(kind, str) else ""


def _objective(result: dict[str, Any]) -> str:
    """The job's training objective ("sft" when its spec names none)."""
    method = (result.get("spec") or {}).get("method") or {}
    objective = method.get("objective") if isinstance(method, dict) else None
    kind = objective.get("type") if isinstance(objective, dict) else None
    return kind if isinstance(kind, str) else "sft"


def device_kind(device: str) -> str:
    """result.json's device ("cpu", or the GPU's name) as the table keys it."""
    return device if device == "cpu" else f"cuda:{device}"


def record_result(db: Session, result: dict[str, Any], *, job_id: str) -> None:
    """A succeeded job's speeds, for the next estimates of its model; in a savepoint, so
    that a failure to record them never fails the job."""
    try:
        figures = JobFigures.from_result(result)
        if figures is None:
            return
        spec, method = result["spec"], method_type(result)
        with db.begin_nested():
            record_job_figures(
                db, model=spec["model"], task=spec["task"], method=method, figures=figures
            )
    except Exception:
        log.warning("job %s: its throughput was not recorded", job_id, exc_info=True)


def record_job_figures(
    db: Session, *, model: str, task: str, method: str, figures: JobFigures
) -> None:
    """Add one succeeded job's figures to its model's row (created on its first job)."""
    key = (model, task, method, figures.device)
    row = db.scalars(_row(*key).with_for_update()).first()
    if row is None:
        if _insert_first(db, key, figures):
            return
        row = db.scalars(_row(*key).with_for_update()).one()  # another worker's, just now
    row.jobs += 1
    row.train_tokens_per_second = blend(
        row.train_tokens_per_second, figures.train_tokens_per_second, row.jobs
    )
    row.eval_tokens_per_second = blend(
        row.eval_tokens_per_second, figures.eval_tokens_per_second, row.jobs
    )
    row.load_seconds = blend(row.load_seconds, figures.load_seconds, row.jobs)
    row.seconds_per_checkpoint = blend(
        row.seconds_per_checkpoint, figures.seconds_per_checkpoint, row.jobs
    )
    row.updated_at = utcnow()


def blend(old: float | None, new: float | None, jobs: int) -> float | None:
    """A running figure after its `jobs`-th job: the mean so far, then weighted to the newest."""
    if new is None or old is None:
        return old if new is None else new
    return old + max(1 / jobs, NEWEST_JOB_WEIGHT) * (new - old)


def throughput_for(
    db: Session, *, model: str, task: str, method: str, settings: Settings
) -> Throughput:
    """The figures a new job of `model` with `method` is estimated with.

    The queue does not say which device a job will get, so the device is the one the model
    last trained on here (its most recently updated row): a deployment's workers on one
    queue usually share a kind of device. On it, the method's own row, else the most recent
    row of another method. A figure that row has not measured yet, and every figure before
    any job of the model succeeded, comes from the `TUNEQ_ESTIMATED_*` settings; `basis`
    says which.
    """
    newest = ModelThroughput.updated_at.desc(), ModelThroughput.id.desc()
    latest = db.scalars(_rows(model, task).order_by(*newest).limit(1)).first()
    if latest is None:
        return default_throughput(settings, model=model, task=task)
    own = _row(model, task, method, latest.device)
    row = db.scalars(own).first() or latest
    kind = f"{task} {row.method}" if row.method else task
    jobs = f"{row.jobs} {kind} job{'s' if row.jobs != 1 else ''}"
    borrowed = f" (no {method} job has finished here yet)" if row.method != method else ""
    return Throughput.of(
        row.train_tokens_per_second,
        eval_tokens_per_second=row.eval_tokens_per_second,
        load_seconds=_or(row.load_seconds, settings.estimated_load_seconds),
        seconds_per_checkpoint=_or(
            row.seconds_per_checkpoint, settings.estimated_checkpoint_seconds
        ),
        basis=f"measured: {jobs} of {model} on {row.device}{borrowed}",
    )


def default_throughput(settings: Settings, *, model: str, task: str) -> Throughput:
    """The figures of a model no job has trained here yet: the settings'. An image counts
    as one "token" in the estimate, so an image task divides by images per second."""
    images = task == "image_classification"
    return Throughput.of(
        settings.estimated_images_per_second if images else settings.estimated_tokens_per_second,
        load_seconds=settings.estimated_load_seconds,
        seconds_per_checkpoint=settings.estimated_checkpoint_seconds,
        basis=f"default: TUNEQ_ESTIMATED_* settings (no {task} job of {model} has finished "
        "here yet)",
    )


def _rows(model: str, task: str) -> Select[tuple[ModelThroughput]]:
    return select(ModelThroughput).where(
        ModelThroughput.model == model, ModelThroughput.task == task
    )


def _row(model: str, task: str, method: str, device: str) -> Select[tuple[ModelThroughput]]:
    query = _rows(model, task).where(
        ModelThroughput.method == method, ModelThroughput.device == device
    )
    return query.execution_options(populate_existing=True)


def _insert_first(db: Session, key: tuple[str, str, str, str], figures: JobFigures) -> bool:
    """The row of a model's first job; False when another worker inserted it meanwhile."""
    model, task, method, device = key
    try:
        with db.begin_nested():
            db.add(
                ModelThroughput(
                    model=model,
                    task=task,
                    method=method,
                    device=device,
                    jobs=1,
                    train_tokens_per_second=figures.train_tokens_per_second,
                    eval_tokens_per_second=figures.eval_tokens_per_second,
                    load_seconds=figures.load_seconds,
                    seconds_per_checkpoint=figures.seconds_per_checkpoint,
                    updated_at=utcnow(),
                )
            )
    except IntegrityError:
        return False
    return True


def _ratio(numerator: Any, denominator: Any) -> float | None:
    """numerator / denominator, when both are positive numbers (a missing key is None)."""
    numerator, denominator = _positive(numerator), _positive(denominator)
    return numerator / denominator if numerator and denominator else None


def _positive(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None


def _or(value: float | None, default: float) -> float:
    return default if value is None else value

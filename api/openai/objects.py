"""OpenAI's objects, each built from the native document of the same thing.

The facade shows what the `openai` client's types expect (openai/types/...), and keeps
what the native API says that OpenAI has no field for in one extension member, `tuneq`:
the native document itself, unchanged, so nothing is lost and nothing is said twice in two
vocabularies. tuneq's states in OpenAI's vocabulary (`STATUS`):

    queued -> queued        running -> running      succeeded / failed / cancelled -> same
    cancelling -> running   (the worker is still stopping it; it may yet finish)
    paused -> queued        (waits, not running, for `resume`; `tuneq.status` says paused)

OpenAI's `validating_files` never shows: a tuneq job is validated before it exists.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel

from peft_engine.methods import METHODS

STATUS = {
    "queued": "queued",
    "running": "running",
    "cancelling": "running",
    "paused": "queued",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}
# tuneq's event levels in OpenAI's ("warn"); any other level shows as info.
_LEVELS = {"info": "info", "warning": "warn", "error": "error"}
EVENT_ID_PREFIX = "ftevent-"
CHECKPOINT_ID_PREFIX = "ftckpt-"
# Where the native API serves a job's trained adapter (the job id filled in).
ADAPTER_PATH = "/jobs/{job_id}/artifacts/adapter.tar.gz"


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"  # only valid files are kept
    status_details: str | None = None
    tuneq: dict[str, Any]  # the native file: format, examples, the validation report

    @classmethod
    def of(cls, native: dict[str, Any]) -> FileObject:
        return cls(
            id=native["id"],
            bytes=native["bytes"],
            created_at=native["created_at"],
            filename=native["filename"],
            purpose=native["purpose"],
            tuneq=native,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Hyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    organization_id: str
    status: str
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    training_file: str
    validation_file: str | None
    hyperparameters: Hyperparameters
    method: dict[str, Any]
    result_files: list[str]
    trained_tokens: int | None
    estimated_finish: int | None
    seed: int
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]]
    tuneq: dict[str, Any]  # the job as the native `GET /jobs/{id}` shows it

    @classmethod
    def of(cls, native: dict[str, Any], *, organization_id: str) -> FineTuningJob:
        resolved = native["hyperparameters"]
        hyperparameters = Hyperparameters(
            n_epochs=resolved["n_epochs"],
            batch_size=resolved["batch_size"],
            learning_rate_multiplier=learning_rate_multiplier(
                native["method"], resolved["learning_rate"]
            ),
        )
        succeeded = native["status"] == "succeeded"
        return cls(
            id=native["id"],
            created_at=native["created_at"],
            finished_at=native["finished_at"],
            model=native["model"],
            organization_id=organization_id,
            status=STATUS[native["status"]],
            error=_error(native["error"]),
            fine_tuned_model=fine_tuned_model(native, organization_id) if succeeded else None,
            training_file=native["training_file"],
            validation_file=native["validation_file"],
            hyperparameters=hyperparameters,
            method=openai_method(native["method"], hyperparameters),
            result_files=[],  # the adapter is an artifact, not a file: see ADAPTER_PATH
            trained_tokens=native["trained_tokens"],
            estimated_finish=_estimated_finish(native),
            seed=resolved["seed"],
            metadata=native["metadata"] or None,
            integrations=[],
            tuneq=native,
        )


def openai_method(method: dict[str, Any], hyperparameters: Hyperparameters) -> dict[str, Any]:
    """The job's method as OpenAI names it: "dpo" for the DPO objective (with its beta),
    "supervised" for everything else."""
    shown = hyperparameters.model_dump()
    objective = method.get("objective") or {}
    if objective.get("type") == "dpo":
        return {"type": "dpo", "dpo": {"hyperparameters": {**shown, "beta": objective["beta"]}}}
    return {"type": "supervised", "supervised": {"hyperparameters": shown}}


def learning_rate_multiplier(method: dict[str, Any], learning_rate: float) -> float:
    """The learning rate as a multiple of the method's default (what "auto" resolves to):
    the facade's meaning of OpenAI's `learning_rate_multiplier`."""
    definition = METHODS[method["type"]]
    default = definition.default_learning_rate(definition.spec.model_validate(method))
    return float(f"{learning_rate / default:.6g}")


def fine_tuned_model(native: dict[str, Any], organization_id: str) -> str:
    """The adapter's name in OpenAI's shape, `ft:<model>:<organization>:<suffix>:<job id>`
    (an empty suffix when none was given); it downloads natively from ADAPTER_PATH."""
    return f"ft:{native['model']}:{organization_id}:{native['suffix'] or ''}:{native['id']}"


def _error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {"code": error["code"], "message": error["message"], "param": error.get("param")}


def _estimated_finish(native: dict[str, Any]) -> int | None:
    """While it runs: now plus the worker's latest ETA, else its start plus the estimate."""
    if STATUS[native["status"]] != "running":
        return None
    eta = (native["progress"] or {}).get("eta_seconds")
    if eta is not None:
        return int(time.time() + eta)
    started, seconds = native["started_at"], (native["estimate"] or {}).get("estimated_seconds")
    return int(started + seconds) if started is not None and seconds is not None else None


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any]

    @classmethod
    def of(cls, native: dict[str, Any]) -> FineTuningJobEvent:
        return cls(
            id=f"{EVENT_ID_PREFIX}{native['id']}",
            created_at=native["created_at"],
            level=_LEVELS.get(native["level"], "info"),
            message=native["message"],
            type=native["type"],
            data=native["data"],
        )


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int
    tuneq: dict[str, Any]  # the native checkpoint: attempt, metrics, its artifact's name

    @classmethod
    def of(
        cls,
        checkpoint_id: int,
        native: dict[str, Any],
        *,
        job: dict[str, Any],
        organization_id: str,
        train_loss: float | None,
    ) -> FineTuningJobCheckpoint:
        step = native["step"]
        evaluation = native["metrics"]
        metrics = {"step": float(step), **evaluation}
        if train_loss is not None:  # the training loss of the checkpoint's step
            metrics["train_loss"] = train_loss
        if "eval_loss" in evaluation:  # tuneq evaluates on the whole validation set
            metrics["valid_loss"] = metrics["full_valid_loss"] = evaluation["eval_loss"]
        adapter = fine_tuned_model(job, organization_id)
        return cls(
            id=f"{CHECKPOINT_ID_PREFIX}{checkpoint_id}",
            created_at=native["created_at"],
            fine_tuned_model_checkpoint=f"{adapter}:ckpt-step-{step}",
            fine_tuning_job_id=job["id"],
            metrics=metrics,
            step_number=step,
            tuneq=native,
        )


def page(items: list[BaseModel], *, has_more: bool) -> dict[str, Any]:
    """A cursor page as OpenAI's lists are: the client's next `after` is the last item's id."""
    return {
        "object": "list",
        "data": [item.model_dump(mode="json") for item in items],
        "has_more": has_more,
    }

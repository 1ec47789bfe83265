"""Planning a job: its spec checked against the model registry and the team's files, with
what it will cost (its duration from the model's throughput measured here: tuneq.throughput).
Everything a submission validates before anything is written; the engine's user errors
come out as the API's typed errors."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from peft_engine.errors import DataError, ModelNotFoundError, SpecError, UserError
from peft_engine.estimate import Estimate, estimate_job
from peft_engine.models import ModelRegistry
from peft_engine.prepare import DataPaths
from peft_engine.serving import check_serving_model
from peft_engine.spec import JobSpec, parse_spec
from tuneq.errors import (
    ErrorItem,
    InvalidFile,
    InvalidHyperparameters,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    TuneqError,
    UnsupportedHardware,
    field_error,
)
from tuneq.files.models import File
from tuneq.files.service import get_file, held_copy
from tuneq.jobs.routing import queue_for
from tuneq.jobs.schemas import DryRunPublic
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team
from tuneq.throughput.service import throughput_for


@dataclass(frozen=True)
class Plan:
    """A job spec checked against the registry and its files, with what it will cost."""

    spec: JobSpec
    estimate: Estimate
    training_file: File
    validation_file: File | None
    queue: str


def as_tuneq_error(err: UserError) -> TuneqError:
    """The engine's user errors, as the API reports them."""
    if isinstance(err, DataError):
        items = [ErrorItem(e.message, field=e.field, line=e.line) for e in err.errors]
        if not items:  # a problem with the file as a whole: name the field that holds it
            items = [ErrorItem(err.message, field=err.param)]
        return InvalidFile(
            err.message, errors=items, param=err.param, extra={"total_errors": err.total_errors}
        )
    field_item = [ErrorItem(err.message, field=err.param)] if err.param else []
    if isinstance(err, ModelNotFoundError):
        return ModelNotFound(str(err), errors=field_item, param=err.param)
    if isinstance(err, SpecError) and (err.param or "").startswith("hyperparameters"):
        return InvalidHyperparameters(str(err), errors=field_item, param=err.param)
    return InvalidRequest(str(err), errors=field_item, param=err.param)


def plan_job(
    *,
    db: Session,
    store: ObjectStore,
    settings: Settings,
    registry: ModelRegistry,
    team: Team,
    body: dict[str, Any],
) -> Plan:
    try:
        spec = bounded_runtime(parse_spec(body), settings)
        check_hardware(spec, settings)
        check_serving_model(spec, registry, settings.resolved_cache_dir)
        check_integrations(spec, settings)
        if spec.training_file is None:
            raise SpecError("a training file id is required", param="training_file")
        training = _team_file(db, team, spec.training_file, "training_file")
        validation = (
            _team_file(db, team, spec.validation_file, "validation_file")
            if spec.validation_file
            else None
        )
        with ExitStack() as held:  # the copies stay while the estimate reads them
            data = DataPaths(
                held.enter_context(held_copy(store, training, settings)),
                held.enter_context(held_copy(store, validation, settings)) if validation else None,
            )
            estimate = estimate_job(
                spec,
                data,
                registry=registry,
                cache_dir=settings.resolved_cache_dir,
                throughput=throughput_for(
                    db,
                    model=spec.model,
                    task=spec.task,
                    method=spec.method.type,
                    settings=settings,
                ),
            )
    except UserError as err:
        raise as_tuneq_error(err) from None
    queue = queue_for(
        settings.gpu_queue_memory_gib,
        registry.get(spec.model).queue,
        estimate.memory,
        auto_checkpointing=spec.hyperparameters.gradient_checkpointing == "auto"
        and spec.method.type != "prefix_tuning",
    )
    return Plan(spec, estimate, training, validation, queue)


def bounded_runtime(spec: JobSpec, settings: Settings) -> JobSpec:
    """The operator's bound on a job's training time: a spec over TUNEQ_MAX_RUNTIME_SECONDS_CAP
    is refused naming the field; one with none gets TUNEQ_MAX_RUNTIME_SECONDS (else the cap)."""
    cap = settings.max_runtime_seconds_cap
    if spec.max_runtime_seconds is None:
        default = settings.max_runtime_seconds or cap
        return spec if default is None else spec.model_copy(update={"max_runtime_seconds": default})
    if cap is not None and spec.max_runtime_seconds > cap:
        raise field_error(
            "max_runtime_seconds",
            f"at most {cap} seconds on this deployment (TUNEQ_MAX_RUNTIME_SECONDS_CAP)",
        )
    return spec


def check_hardware(spec: JobSpec, settings: Settings) -> None:
    """A 4-bit base (QLoRA) needs CUDA, or bitsandbytes quantising on the CPU. The API cannot
    see its workers' devices: it accepts "nf4" where the deployment lists GPU queues
    (TUNEQ_GPU_QUEUE_MEMORY_GIB), or where its own process could run it (a worker beside it,
    as the embedded stack runs); else it refuses at once, rather than failing the job later.
    Judged from the installed bitsandbytes, without importing torch (the worker probes)."""
    if spec.hyperparameters.base_precision != "nf4" or settings.gpu_queue_memory_gib:
        return
    from peft_engine.quantization import PARAM, installed_four_bit_missing

    missing = installed_four_bit_missing()
    if missing is None:
        return
    detail = (
        '"nf4" (QLoRA) needs a GPU worker with bitsandbytes, and this deployment lists no GPU '
        f"queue (TUNEQ_GPU_QUEUE_MEMORY_GIB) while here {missing}: list the GPU queues, or "
        'install the qlora extra where the API runs, or use base_precision "auto"'
    )
    raise UnsupportedHardware(detail, errors=[ErrorItem(detail, field=PARAM)], param=PARAM)


# Each tracker's settings and optional package (`pip install tuneq[mlflow]`, `tuneq[wandb]`).
TRACKERS = {
    "mlflow": ("TUNEQ_MLFLOW_TRACKING_URI", "mlflow"),
    "wandb": ("TUNEQ_WANDB_MODE", "wandb"),
}


def tracker_unavailable(kind: str, settings: Settings, *, here: bool) -> str | None:
    """Why this deployment cannot log to the tracker `kind`, or None. The operator's
    setting is required; the package is looked up (not imported) only where this process
    stands for the workers (`here`)."""
    import importlib.util

    setting, package = TRACKERS[kind]
    configured = settings.mlflow_tracking_uri if kind == "mlflow" else settings.wandb_mode
    if not configured:
        return f"this deployment has no {kind} tracking ({setting} is unset)"
    if kind == "wandb" and configured == "online" and settings.wandb_api_key is None:
        return "this deployment has no W&B API key for online runs (TUNEQ_WANDB_API_KEY)"
    if here and importlib.util.find_spec(package) is None:
        return f"the {package} package is not installed (pip install tuneq[{kind}])"
    return None


def check_integrations(spec: JobSpec, settings: Settings) -> None:
    """An integration the deployment cannot serve is refused at once, naming it. Packages are
    checked only on the embedded stack (no TUNEQ_BROKER_URL: workers beside the API, on its
    install); the production API's image is not the workers', which warn in the job."""
    for index, integration in enumerate(spec.integrations):
        why = tracker_unavailable(integration.type, settings, here=settings.broker_url is None)
        if why:
            raise field_error(f"integrations[{index}].type", why)


def _team_file(db: Session, team: Team, file_id: str, param: str) -> File:
    try:
        return get_file(db=db, team=team, file_id=file_id)
    except NotFound:
        raise InvalidRequest(
            f"no file {file_id!r}",
            errors=[ErrorItem(f"no file {file_id!r}", field=param)],
            param=param,
        ) from None


def resolved_view(plan: Plan) -> dict[str, Any]:
    dumped = plan.estimate.spec.model_dump(mode="json")
    keys = ("method", "hyperparameters", "resources", "export", "serving", "integrations")
    return {key: dumped[key] for key in keys}


def estimate_of(plan: Plan) -> DryRunPublic:
    view = resolved_view(plan)
    return DryRunPublic(
        model=plan.spec.model,
        task=plan.spec.task,
        method=view["method"],
        hyperparameters=view["hyperparameters"],
        estimate=plan.estimate.as_dict(),
    )

"""One job attempt, start to finish: claim → download → train → upload → record.

    claim (conditional UPDATE; no row: a duplicate message, drop it)
    → heartbeat thread (renews the lease, hears cancel/pause)
    → training file (and the latest checkpoint, when an earlier attempt left one)
    → peft_engine.train with hooks that write events, metrics and progress
    → each checkpoint uploaded, then the job's pointer moved under the fence
    → the adapter uploaded as .tar.gz, the result recorded under the fence

Every write that says "this job's state is X" carries the claim's fencing token, so a
worker that lost its lease can no longer change the job, whatever it still believes.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import peft_engine
from peft_engine.errors import UserError
from peft_engine.hooks import Event, Hooks
from peft_engine.methods.weights import (
    MODEL_INFO_FILE,
    TRAINED_WEIGHTS_FILE,
    TRAINED_WEIGHTS_INFO,
)
from peft_engine.models import ModelRegistry
from peft_engine.models.resident import ResidentModels
from peft_engine.prepare import DataPaths
from peft_engine.progress import quiet_library_output
from tuneq.db import transaction
from tuneq.faults import JobFault, job_fault
from tuneq.files.models import File
from tuneq.files.service import held_copy
from tuneq.jobs.lease import Claim, fenced_update
from tuneq.jobs.models import Job, JobArtifact, JobCheckpoint, JobEvent, JobMetric, OutboxMessage
from tuneq.jobs.retention import prune_checkpoints
from tuneq.jobs.schemas import (
    CheckpointPublic,
    checkpoint_artifact_name,
)
from tuneq.quotas.fair_share import claim_next, wake_waiting
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.webhooks.schemas import JOB_CHECKPOINT
from tuneq.webhooks.service import enqueue_job_event
from worker import outcomes
from worker.artifacts import upload_tarball
from worker.distributed import train_on_ranks
from worker.exports import export_after_training
from worker.heartbeat import Heartbeat
from worker.history import History
from worker.journal import Journal
from worker.metrics import WORKER_METRICS, AttemptMetrics
from worker.retry import RetryingStore, RetryPolicy, is_transient, retry_transient
from worker.tracking import Tracking

log = logging.getLogger(__name__)

# The files of a checkpoint a user downloads: the method's weights (a PEFT adapter, or the
# trained tensors by name) and what rebuilds the model for `load_trained` (task head,
# labels, method); the resume state stays server-side.
_ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    TRAINED_WEIGHTS_FILE,
    TRAINED_WEIGHTS_INFO,
    MODEL_INFO_FILE,
    "README.md",
)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class JobRunner:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore
    registry: ModelRegistry
    # Set when the worker is asked to shut down (a deploy, a scale-in): the job stops at
    # its next step with a checkpoint and goes back to the queue for another worker.
    shutting_down: threading.Event = field(default_factory=threading.Event)
    # Base models kept in memory between this process's jobs (none: load every job).
    resident: ResidentModels = field(default_factory=lambda: ResidentModels(max_models=0))
    # A job held back at its team's quota, published again when this run's job stopped.
    woke: str | None = None

    @cached_property
    def policy(self) -> RetryPolicy:
        """Backoff for transient faults of the store and the database."""
        s = self.settings
        return RetryPolicy(s.store_retries, s.store_retry_base_seconds, s.store_retry_cap_seconds)

    @cached_property
    def history(self) -> History:
        return History(self.settings.history_log)

    def run(self, job_id: str) -> str:
        """Run the job if this worker wins the claim; returns what happened, for the log.
        Raises ClaimUnavailable when the database stays away through the claim's retries:
        the message goes back to the broker rather than being lost."""
        quiet_library_output()
        claimed_at = time.monotonic()
        try:
            claim = retry_transient(
                lambda: self._claim(job_id), what="claim", policy=self.policy,
                report=lambda message, _: log.warning("job %s: %s", job_id, message),
            )  # fmt: skip
        except Exception as err:
            if is_transient(err):
                raise ClaimUnavailable(f"{type(err).__name__}: {err}") from err
            raise
        if claim is None:
            return "not claimed (nothing due: running, finished, cancelled, or at its quota)"
        if isinstance(claim, str):
            return claim
        ran = claim.job_id
        workdir = self.settings.resolved_work_dir / "jobs" / ran / f"attempt-{claim.attempt}"
        heartbeat = Heartbeat(self.sessions, claim, lease_ttl=self.settings.lease_ttl_seconds,
                              claimed_at=claimed_at, history=self.history)  # fmt: skip
        try:
            with heartbeat, WORKER_METRICS.attempt() as observed:
                outcome = _Attempt(self, claim, heartbeat, workdir, observed).run()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self._wake_waiting(ran)
        return outcome if ran == job_id else f"ran {ran} (fair share, for this message): {outcome}"

    def _wake_waiting(self, job_id: str) -> None:
        """The job stopped running: a job its team held back at its quota may start now."""
        try:
            with transaction(self.sessions) as db:
                team_id = db.scalar(select(Job.team_id).where(Job.id == job_id))
                if team_id is not None:
                    self.woke = wake_waiting(db, self.settings, team_id)
        except Exception:  # noqa: BLE001 - beat republishes a job left waiting long
            log.warning("could not wake a waiting job after %s", job_id, exc_info=True)

    def _claim(self, job_id: str) -> Claim | str | None:
        with transaction(self.sessions) as db:
            if self.shutting_down.is_set():
                # A message that arrived during a warm shutdown: leave the job to another
                # worker, and have the relay send it again now rather than after a timeout.
                db.add(OutboxMessage(job_id=job_id))
                return "worker shutting down; the job is left for another worker"
            # the claim decides which job runs, not the message's order (fair share)
            claim = claim_next(db, job_id=job_id, owner=worker_identity(),
                               lease_ttl=self.settings.lease_ttl_seconds,
                               settings=self.settings)  # fmt: skip
            if claim is not None:
                self.history.note(db, "claim", claim, expires=claim.expires_at)
            return claim


class ClaimUnavailable(Exception):
    """The database could not be reached to claim the job: the task hands its message
    back to the broker."""


@dataclass
class _Attempt:
    runner: JobRunner
    claim: Claim
    heartbeat: Heartbeat
    workdir: Path
    observed: AttemptMetrics  # what it reports to Prometheus (worker/metrics.py)
    fault: JobFault | None = None  # only under TUNEQ_FAULTS (tuneq/faults.py)
    tracking: Tracking = field(default_factory=Tracking)  # MLflow, W&B (worker/tracking.py)

    @cached_property
    def store(self) -> ObjectStore:
        """The store, each call retried on transient faults, each retry a job event."""
        return RetryingStore(  # type: ignore[return-value]
            self.runner.store,
            self.runner.policy,
            lambda message, data: self._event("warning", message, data),
        )

    @cached_property
    def journal(self) -> Journal:
        """The attempt's database writes, retried through blips while the lease holds."""
        return Journal(self.runner.sessions, self.heartbeat, self.runner.policy)

    @property
    def history(self) -> History:
        return self.runner.history

    def run(self) -> str:
        outcome = self._run()
        self.tracking.close(outcome)  # the adapter, the run ended as the attempt ended
        return outcome

    def _run(self) -> str:
        try:
            job, training, validation = self._load()
            self.observed.started(job.queue)  # Prometheus: worker/metrics.py
            self.fault = job_fault(job.metadata_, self.claim.attempt)
            self._event("info", f"attempt {self.claim.attempt} started on {self.claim.owner}")
            self.tracking = Tracking.open(self, job)
            with ExitStack() as held:  # the data's copies, never evicted while the job runs
                data = DataPaths(
                    held.enter_context(self._copy(training)),
                    held.enter_context(self._copy(validation)) if validation else None,
                )
                resume_from = self._download_checkpoint(job)
                with self.runner.resident.active(report=self._on_model_load):
                    result = self._train(job, data, resume_from)
        except UserError as err:
            return outcomes.fail(self, err.code, str(err), err.param)
        except Exception as err:
            self.observed.crashed(self, err)
            return outcomes.crashed(self, err)
        if result.status != "succeeded":
            return outcomes.stopped(self)
        assert result.output_dir is not None
        self.tracking.adapter = result.output_dir
        try:
            outcome = outcomes.succeed(self, result.output_dir, result.result)
        except Exception as err:
            self.observed.crashed(self, err)
            return outcomes.crashed(self, err)
        if outcome == "succeeded" and self.runner.settings.keep_checkpoints is not None:
            self._prune(self.runner.settings.keep_checkpoints)
        if outcome == "succeeded":  # the spec's export.merged, the adapter already safe
            export_after_training(self.runner, self.heartbeat, job, result.output_dir)
        return outcome

    def _prune(self, keep_last: int) -> None:
        """TUNEQ_KEEP_CHECKPOINTS: the job has succeeded; a failure here only leaves more."""
        try:
            gone = prune_checkpoints(sessions=self.runner.sessions, store=self.store,
                                     job_id=self.claim.job_id, keep_last=keep_last)  # fmt: skip
        except Exception:
            log.warning("job %s: checkpoints not pruned", self.claim.job_id, exc_info=True)
            return
        if gone:
            note = f"deleted the checkpoints of steps {gone} (TUNEQ_KEEP_CHECKPOINTS={keep_last})"
            self._event("info", note, {"steps": gone})

    def _train(
        self, job: Job, data: DataPaths, resume_from: Path | None
    ) -> peft_engine.TrainResult:
        hooks = Hooks(
            on_event=self._on_event,
            on_metrics=self._on_metrics,
            on_checkpoint=self._on_checkpoint,
            should_stop=self._should_stop,
        )
        hooks = self.observed.hooks(hooks)  # each step, evaluation and upload counted, timed
        hooks = self.tracking.tee(hooks)  # metrics to the job's MLflow/W&B runs too
        gpus = int((job.spec.get("resources") or {}).get("gpus", 1))
        if gpus > 1:  # the engine under torchrun, reporting through a file (distributed.py)
            return train_on_ranks(
                job.spec,
                self.workdir,
                hooks,
                gpus=gpus,
                data=data,
                resume_from=resume_from,
                registry_file=self.runner.settings.resolved_model_registry,
                cache_dir=self.runner.settings.resolved_cache_dir,
            )
        return peft_engine.train(
            job.spec,
            self.workdir,
            hooks,
            data=data,
            resume_from=resume_from,
            registry=self.runner.registry,
            cache_dir=self.runner.settings.resolved_cache_dir,
        )

    def _should_stop(self) -> bool:
        return self.heartbeat.should_stop() or self.runner.shutting_down.is_set()

    # -- inputs ------------------------------------------------------------------------

    def _load(self) -> tuple[Job, File, File | None]:
        with self.runner.sessions() as db:
            job = db.get(Job, self.claim.job_id)
            assert job is not None
            training = db.get(File, job.training_file_id)
            validation = db.get(File, job.validation_file_id) if job.validation_file_id else None
            if training is None:
                raise RuntimeError(f"training file {job.training_file_id} is gone")
            return job, training, validation

    def _copy(self, file: File) -> AbstractContextManager[Path]:
        return held_copy(self.store, file, self.runner.settings)

    def _download_checkpoint(self, job: Job) -> Path | None:
        if job.latest_checkpoint_key is None:
            return None
        target = self.workdir / "resume" / f"checkpoint-{job.latest_checkpoint_step}"
        self.store.get_dir(job.latest_checkpoint_key, target)
        self._event(
            "info",
            f"resuming from the checkpoint of step {job.latest_checkpoint_step} "
            f"(attempt {self.claim.attempt})",
        )
        return target

    # -- hooks -------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        self._event(event.level, event.message, event.data)
        resolved = event.data.get("resolved_hyperparameters")
        if resolved is None:
            return

        def write(db: Session) -> None:  # the engine's exact counts replace the API's estimate
            job = db.get(Job, self.claim.job_id)
            assert job is not None
            hyperparameters = {**job.resolved.get("hyperparameters", {}), **resolved}
            fenced_update(
                db, self.claim, resolved={**job.resolved, "hyperparameters": hyperparameters}
            )

        self.journal.write("record the resolved hyperparameters", write)

    def _on_model_load(self, message: str, data: dict[str, Any]) -> None:
        self._event("info", message, data)  # where the base model came from, and how fast

    def _on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        kind = "train" if "train_loss" in metrics else "eval"
        values = {k: float(v) for k, v in metrics.items()}
        progress = _progress(step, metrics) if kind == "train" else None
        if progress is not None:
            self.heartbeat.progress = progress

        def write(db: Session) -> None:
            db.add(JobMetric(job_id=self.claim.job_id, attempt=self.claim.attempt, step=step,
                             kind=kind, values=values))  # fmt: skip
            told = f"{kind} metrics at step {step}"
            db.add(self.event_row("info", told, {"step": step, **values}, "metrics"))
            if progress is not None:
                fenced_update(db, self.claim, progress=progress,
                              trained_tokens=int(metrics["trained_tokens"]))  # fmt: skip

        self.journal.write(f"record the {kind} metrics of step {step}", write)
        if self.fault is not None and kind == "train":
            self.fault.at_step(step)

    def _on_checkpoint(self, path: Path, step: int, metrics: dict[str, float]) -> None:
        if self.heartbeat.lost.is_set():
            return  # another attempt owns the job now: our checkpoint must not become its
        if self.fault is not None:
            self.fault.at_checkpoint()
        prefix = f"jobs/{self.claim.job_id}/attempts/{self.claim.attempt}/checkpoint-{step}"
        self.store.put_dir(prefix, path)
        artifact_key, size, digest = self.upload_tarball(
            path, f"{prefix}/{checkpoint_artifact_name(step)}", _ADAPTER_FILES
        )
        checkpoint_metrics = {k: float(v) for k, v in metrics.items()}

        def write(db: Session) -> bool:
            # The pointer moves only after the upload completed, and only under our fence.
            if not fenced_update(
                db, self.claim, latest_checkpoint_key=prefix, latest_checkpoint_step=step
            ):
                return False
            checkpoint = JobCheckpoint(job_id=self.claim.job_id, attempt=self.claim.attempt,
                                       step=step, storage_prefix=prefix,
                                       metrics=checkpoint_metrics)  # fmt: skip
            db.add(checkpoint)
            db.flush()
            public = CheckpointPublic.of(checkpoint).model_dump(mode="json")
            enqueue_job_event(
                db, job_id=self.claim.job_id, event_type=JOB_CHECKPOINT, checkpoint=public
            )
            self.add_artifact(db, checkpoint_artifact_name(step), "checkpoint", step,
                              artifact_key, size, digest)  # fmt: skip
            db.add(self.event_row("info", f"checkpoint of step {step} saved", {"step": step}))
            self.history.note(db, "checkpoint", self.claim, step=step)
            return True

        if not self.journal.write(f"record the checkpoint of step {step}", write):
            self.heartbeat.lost.set()

    # -- helpers -----------------------------------------------------------------------

    def upload_tarball(
        self, directory: Path, key: str, names: tuple[str, ...]
    ) -> tuple[str, int, str]:
        return upload_tarball(self.store, self.workdir / "upload", directory, key, names)

    def add_artifact(
        self, db: Session, name: str, kind: str, step: int | None, key: str, size: int, digest: str
    ) -> None:
        db.add(JobArtifact(job_id=self.claim.job_id, name=name, kind=kind, step=step,
                           storage_key=key, bytes=size, sha256=digest))  # fmt: skip

    def event_row(
        self, level: str, message: str, data: dict[str, Any] | None = None, type_: str = "message"
    ) -> JobEvent:
        return JobEvent(
            job_id=self.claim.job_id, type=type_, level=level, message=message, data=data or {}
        )

    def _event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        row = self.event_row(level, message, _jsonable(data or {}))
        self.journal.write("record an event", lambda db: db.add(row))


def _progress(step: int, metrics: dict[str, float]) -> dict[str, Any]:
    total = int(metrics["total_steps"])
    return {
        "step": step,
        "total_steps": total,
        "epoch": round(metrics["epoch"], 4),
        "percent": round(100.0 * step / total, 2),
        "eta_seconds": round(metrics["eta_seconds"], 1),
        "train_loss": metrics["train_loss"],
        "tokens_per_second": round(metrics["tokens_per_second"], 1),
    }


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    """Event data as JSON: paths as strings, the rest as it is."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}

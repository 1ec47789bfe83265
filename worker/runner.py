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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

import peft_engine
from peft_engine.diagnostics import DIAGNOSTICS_FILE
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
from tuneq.db import db_now, transaction
from tuneq.files.models import File
from tuneq.files.service import local_copy
from tuneq.jobs.lease import Claim, claim_job, fenced_update, hand_back
from tuneq.jobs.models import Job, JobArtifact, JobCheckpoint, JobEvent, JobMetric, OutboxMessage
from tuneq.jobs.retention import prune_checkpoints
from tuneq.jobs.schemas import (
    ADAPTER_ARTIFACT,
    DIAGNOSTICS_ARTIFACT,
    CheckpointPublic,
    checkpoint_artifact_name,
)
from tuneq.jobs.states import JobState
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.throughput.service import record_result
from tuneq.webhooks.schemas import JOB_CANCELLED, JOB_CHECKPOINT, JOB_FAILED, JOB_SUCCEEDED
from tuneq.webhooks.service import enqueue_job_event
from worker.artifacts import size_and_digest, upload_tarball
from worker.heartbeat import Heartbeat
from worker.retry import RetryingStore, RetryPolicy, is_transient

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

    def run(self, job_id: str) -> str:
        """Run the job if this worker wins the claim; returns what happened, for the log."""
        quiet_library_output()
        if self.shutting_down.is_set():
            # A message that arrived during a warm shutdown: leave the job to another
            # worker, and have the relay send it again now rather than after a timeout.
            with transaction(self.sessions) as db:
                db.add(OutboxMessage(job_id=job_id))
            return "worker shutting down; the job is left for another worker"
        with transaction(self.sessions) as db:
            claim = claim_job(
                db,
                job_id=job_id,
                owner=worker_identity(),
                lease_ttl=self.settings.lease_ttl_seconds,
            )
        if claim is None:
            return "not claimed (already running, finished, cancelled, or unknown)"
        workdir = self.settings.resolved_work_dir / "jobs" / job_id / f"attempt-{claim.attempt}"
        try:
            with Heartbeat(
                self.sessions, claim, lease_ttl=self.settings.lease_ttl_seconds
            ) as heartbeat:
                return _Attempt(self, claim, heartbeat, workdir).run()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class _Attempt:
    runner: JobRunner
    claim: Claim
    heartbeat: Heartbeat
    workdir: Path

    @cached_property
    def store(self) -> ObjectStore:
        """The store, each call retried on transient faults, each retry a job event."""
        settings = self.runner.settings
        policy = RetryPolicy(settings.store_retries, settings.store_retry_base_seconds,
                             settings.store_retry_cap_seconds)  # fmt: skip
        return RetryingStore(  # type: ignore[return-value]
            self.runner.store, policy, lambda message, data: self._event("warning", message, data)
        )

    def run(self) -> str:
        job, training, validation = self._load()
        self._event("info", f"attempt {self.claim.attempt} started on {self.claim.owner}")
        try:
            data = DataPaths(self._copy(training), self._copy(validation) if validation else None)
            resume_from = self._download_checkpoint(job)
            with self.runner.resident.active(report=self._on_model_load):
                result = self._train(job, data, resume_from)
        except UserError as err:
            self._fail(err.code, str(err), err.param)
            return f"failed: {err}"
        except Exception as err:
            return self._crashed(err)
        if result.status == "succeeded":
            assert result.output_dir is not None
            try:
                outcome = self._succeed(result.output_dir, result.result)
            except Exception as err:
                return self._crashed(err)
            if outcome == "succeeded" and self.runner.settings.keep_checkpoints is not None:
                self._prune(self.runner.settings.keep_checkpoints)
            return outcome
        return self._stopped()

    def _crashed(self, err: Exception) -> str:
        """A transient fault that outlasted its retries hands the job back, to resume later;
        anything else is a bug of ours or the platform's: `internal_error`."""
        log.exception("job %s attempt %s crashed", self.claim.job_id, self.claim.attempt)
        if self.heartbeat.lost.is_set():
            return "lease lost"
        cause = f"{type(err).__name__}: {err}"
        if is_transient(err):
            with transaction(self.runner.sessions) as db:
                delay = self.runner.settings.handback_delay_seconds
                told = f"a transient fault outlasted its retries ({cause})"
                moved = hand_back(db, self.claim, cause=told, first_delay=delay)
            return f"handed back ({moved}): {cause}"
        self._fail("internal_error", cause, None)
        return f"failed: {err}"

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
        return peft_engine.train(
            job.spec,
            self.workdir,
            Hooks(
                on_event=self._on_event,
                on_metrics=self._on_metrics,
                on_checkpoint=self._on_checkpoint,
                should_stop=self._should_stop,
            ),
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

    def _copy(self, file: File) -> Path:
        return local_copy(self.store, file, self.runner.settings.resolved_work_dir)

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
        if resolved is not None:  # the engine's exact counts replace the API's estimate
            with transaction(self.runner.sessions) as db:
                job = db.get(Job, self.claim.job_id)
                assert job is not None
                hyperparameters = {**job.resolved.get("hyperparameters", {}), **resolved}
                fenced_update(
                    db, self.claim, resolved={**job.resolved, "hyperparameters": hyperparameters}
                )

    def _on_model_load(self, message: str, data: dict[str, Any]) -> None:
        self._event("info", message, data)  # where the base model came from, and how fast

    def _on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        kind = "train" if "train_loss" in metrics else "eval"
        values = {k: float(v) for k, v in metrics.items()}
        with transaction(self.runner.sessions) as db:
            db.add(
                JobMetric(
                    job_id=self.claim.job_id,
                    attempt=self.claim.attempt,
                    step=step,
                    kind=kind,
                    values=values,
                )
            )
            db.add(
                self._event_row(
                    "info", f"{kind} metrics at step {step}", {"step": step, **values}, "metrics"
                )
            )
            if kind == "train":
                total = int(metrics["total_steps"])
                progress = {
                    "step": step,
                    "total_steps": total,
                    "epoch": round(metrics["epoch"], 4),
                    "percent": round(100.0 * step / total, 2),
                    "eta_seconds": round(metrics["eta_seconds"], 1),
                    "train_loss": metrics["train_loss"],
                    "tokens_per_second": round(metrics["tokens_per_second"], 1),
                }
                self.heartbeat.progress = progress
                fenced_update(
                    db, self.claim, progress=progress, trained_tokens=int(metrics["trained_tokens"])
                )

    def _on_checkpoint(self, path: Path, step: int, metrics: dict[str, float]) -> None:
        if self.heartbeat.lost.is_set():
            return  # another attempt owns the job now: our checkpoint must not become its
        prefix = f"jobs/{self.claim.job_id}/attempts/{self.claim.attempt}/checkpoint-{step}"
        self.store.put_dir(prefix, path)
        artifact_key, size, digest = self._upload_tarball(
            path, f"{prefix}/{checkpoint_artifact_name(step)}", _ADAPTER_FILES
        )
        with transaction(self.runner.sessions) as db:
            # The pointer moves only after the upload completed, and only under our fence.
            if not fenced_update(
                db, self.claim, latest_checkpoint_key=prefix, latest_checkpoint_step=step
            ):
                self.heartbeat.lost.set()
                return
            checkpoint = JobCheckpoint(
                job_id=self.claim.job_id,
                attempt=self.claim.attempt,
                step=step,
                storage_prefix=prefix,
                metrics={k: float(v) for k, v in metrics.items()},
            )
            db.add(checkpoint)
            db.flush()
            enqueue_job_event(
                db,
                job_id=self.claim.job_id,
                event_type=JOB_CHECKPOINT,
                checkpoint=CheckpointPublic.of(checkpoint).model_dump(mode="json"),
            )
            self._add_artifact(db, checkpoint_artifact_name(step), "checkpoint", step,
                               artifact_key, size, digest)  # fmt: skip
            db.add(self._event_row("info", f"checkpoint of step {step} saved", {"step": step}))

    # -- outcomes ----------------------------------------------------------------------

    def _succeed(self, output_dir: Path, result: dict[str, Any]) -> str:
        prefix = f"jobs/{self.claim.job_id}/attempts/{self.claim.attempt}"
        files = tuple(p.name for p in output_dir.iterdir() if p.is_file())
        key, size, digest = self._upload_tarball(output_dir, f"{prefix}/{ADAPTER_ARTIFACT}", files)
        diagnostics = output_dir / DIAGNOSTICS_FILE  # also on its own, for GET .../diagnostics
        diagnostics_key = f"{prefix}/{DIAGNOSTICS_ARTIFACT}"
        if diagnostics.is_file():
            self.store.put_file(diagnostics_key, diagnostics)
        # Out of time (max_runtime_seconds): the best weights so far are kept as the adapter,
        # and the job fails with a code that says why.
        error = _out_of_time(result) if result.get("max_runtime_reached") else None
        with transaction(self.runner.sessions) as db:
            if not fenced_update(
                db,
                self.claim,
                state=JobState.FAILED if error else JobState.SUCCEEDED,
                result=result,
                error=error,
                trained_tokens=int(result.get("trained_tokens", 0)),
                finished_at=db_now(),
                lease_expires_at=None,
            ):
                self.store.delete(key)
                self.store.delete(diagnostics_key)
                return "lease lost before the result was recorded"
            self._add_artifact(db, ADAPTER_ARTIFACT, "adapter", None, key, size, digest)
            if diagnostics.is_file():
                self._add_artifact(db, DIAGNOSTICS_ARTIFACT, "diagnostics", None,
                                   diagnostics_key, *size_and_digest(diagnostics))  # fmt: skip
            if error:
                data = {"code": error["code"], "artifact": ADAPTER_ARTIFACT}
                db.add(self._event_row("error", f"job failed: {error['message']}", data))
                enqueue_job_event(db, job_id=self.claim.job_id, event_type=JOB_FAILED)
                return "failed: max_runtime_exceeded"
            db.add(self._event_row("info", "job succeeded", {"artifact": ADAPTER_ARTIFACT}))
            enqueue_job_event(db, job_id=self.claim.job_id, event_type=JOB_SUCCEEDED)
            record_result(db, result, job_id=self.claim.job_id)
        return "succeeded"

    def _stopped(self) -> str:
        self.heartbeat.beat()  # the latest flags: a cancel may have come since the last beat
        if self.heartbeat.lost.is_set():
            return "lease lost; stopped"
        if self.heartbeat.cancel_requested.is_set():
            target, message = JobState.CANCELLED, "cancelled"
            values: dict[str, Any] = {"finished_at": db_now()}
        elif self.heartbeat.pause_requested.is_set():
            target, message = JobState.PAUSED, "paused; resume continues from the last checkpoint"
            values = {"pause_requested": False}
        else:  # the worker is shutting down: hand the job to the next one, attempt refunded
            target, message = JobState.QUEUED, "worker shutting down; queued again"
            values = {"max_attempts": Job.max_attempts + 1}
        with transaction(self.runner.sessions) as db:
            if fenced_update(
                db, self.claim, state=target, lease_owner=None, lease_expires_at=None, **values
            ):
                db.add(self._event_row("info", message))
                if target == JobState.QUEUED:
                    db.add(OutboxMessage(job_id=self.claim.job_id))
                elif target == JobState.CANCELLED:
                    enqueue_job_event(db, job_id=self.claim.job_id, event_type=JOB_CANCELLED)
        return message

    def _fail(self, code: str, message: str, param: str | None) -> None:
        with transaction(self.runner.sessions) as db:
            error = {"code": code, "message": message, "param": param}
            if fenced_update(
                db,
                self.claim,
                state=JobState.FAILED,
                error=error,
                finished_at=db_now(),
                lease_expires_at=None,
            ):
                db.add(self._event_row("error", f"job failed: {message}", {"code": code}))
                enqueue_job_event(db, job_id=self.claim.job_id, event_type=JOB_FAILED)

    # -- helpers -----------------------------------------------------------------------

    def _upload_tarball(
        self, directory: Path, key: str, names: tuple[str, ...]
    ) -> tuple[str, int, str]:
        return upload_tarball(self.store, self.workdir / "upload", directory, key, names)

    def _add_artifact(
        self, db: Session, name: str, kind: str, step: int | None, key: str, size: int, digest: str
    ) -> None:
        db.add(
            JobArtifact(
                job_id=self.claim.job_id,
                name=name,
                kind=kind,
                step=step,
                storage_key=key,
                bytes=size,
                sha256=digest,
            )
        )

    def _event_row(
        self, level: str, message: str, data: dict[str, Any] | None = None, type_: str = "message"
    ) -> JobEvent:
        return JobEvent(
            job_id=self.claim.job_id, type=type_, level=level, message=message, data=data or {}
        )

    def _event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        with transaction(self.runner.sessions) as db:
            db.add(self._event_row(level, message, _jsonable(data or {})))


def _out_of_time(result: dict[str, Any]) -> dict[str, Any]:
    limit = result["spec"].get("max_runtime_seconds")
    return {
        "code": "max_runtime_exceeded",
        "message": f"the job ran for its max_runtime_seconds ({limit} s) and stopped at step "
        f"{result.get('steps')} of {result.get('total_steps')}; the adapter holds its best "
        f"weights so far (step {result.get('best_step')}), its checkpoints are kept",
        "param": "max_runtime_seconds",
    }


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    """Event data as JSON: paths as strings, the rest as it is."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}

"""A job's merged export, built on a worker: after training (the spec's `export.merged`)
or when asked (`POST /jobs/{id}/exports`, the `EXPORT_TASK` on the job's queue).

The job has succeeded before its export starts, so an export that fails (a method error,
memory, the store) never costs the adapter: the job stays succeeded with `adapter.tar.gz`,
and a warning event says why the export is missing (`data.code` "export_failed",
`data.error` the cause). A worker lost during an export leaves no artifact and no
state to clean: the task is acked on receipt, not redelivered (an export that runs the
host out of memory must not kill worker after worker); the caller asks again.

The merged model is packed as `merged-{dtype}.tar.gz` under a key of its own
(`jobs/{id}/exports/{uuid}/`), recorded as an artifact of kind "merged" with an info event;
one that finds the name recorded already (a race of two asks) deletes its own upload.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from peft_engine.models import ModelRegistry, model_dir
from tuneq.db import transaction
from tuneq.jobs.exports import (
    EXPORT_TASK,
    MERGED_KIND,
    export_event,
    merged_artifact_name,
)
from tuneq.jobs.models import Job, JobArtifact
from tuneq.jobs.schemas import ADAPTER_ARTIFACT
from tuneq.jobs.service import newest_artifact
from tuneq.jobs.states import JobState
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from worker.artifacts import upload_tarball

log = logging.getLogger(__name__)


@dataclass
class Exporter:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore
    registry: ModelRegistry

    def export(self, job_id: str, dtype: str, output_dir: Path | None = None) -> str:
        """Build, upload and record the job's merged model in `dtype`; what happened, for
        the log. `output_dir`: the job's output where the worker still has it, else the
        adapter artifact is downloaded. Never raises: a failure is the job's warning event."""
        name = merged_artifact_name(dtype)
        with self.sessions() as db:
            job = db.get(Job, job_id)
            if job is None or job.state != JobState.SUCCEEDED:
                return f"not exported: job {job_id} is {job.state if job else 'gone'}"
            if newest_artifact(db=db, job=job, name=name) is not None:
                return f"{name} exists already"
            model, adapter = job.model, newest_artifact(db=db, job=job, name=ADAPTER_ARTIFACT)
            adapter_key = adapter.storage_key if adapter is not None else None
        scratch = self.settings.resolved_work_dir / "exports" / f"{job_id}-{uuid.uuid4().hex}"
        try:
            if output_dir is None:
                if adapter_key is None:
                    raise RuntimeError(f"job {job_id} has no {ADAPTER_ARTIFACT} to merge")
                output_dir = self._download(adapter_key, scratch / "output")
            return self._build(job_id, model, dtype, output_dir, scratch)
        except Exception as err:  # noqa: BLE001 - the adapter stays; the event says why
            log.warning("job %s: merged export (%s) failed", job_id, dtype, exc_info=True)
            cause = f"{type(err).__name__}: {err}"
            self._note(export_event(job_id, "warning", f"merged export ({dtype}) failed: {cause}; "
                                    "the adapter is unaffected", dtype,
                                    code="export_failed", error=cause))  # fmt: skip
            return f"export failed: {cause}"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _download(self, key: str, target: Path) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        tarball = target.parent / ADAPTER_ARTIFACT
        self.store.get_file(key, tarball)
        with tarfile.open(tarball, "r:gz") as archive:
            archive.extractall(target, filter="data")
        return target

    def _build(self, job_id: str, model: str, dtype: str, output: Path, scratch: Path) -> str:
        from peft_engine.export import export_merged

        base_dir = model_dir(self.registry.get(model), self.settings.resolved_cache_dir)
        merged = scratch / "merged"
        record = export_merged(output, base_dir, merged, dtype)
        name = merged_artifact_name(dtype)
        key = f"jobs/{job_id}/exports/{uuid.uuid4().hex}/{name}"
        files = tuple(p.name for p in merged.iterdir() if p.is_file())
        key, size, digest = upload_tarball(self.store, scratch / "upload", merged, key, files)
        with transaction(self.sessions) as db:
            job = db.get(Job, job_id)
            duplicate = job is None or newest_artifact(db=db, job=job, name=name) is not None
            if not duplicate:
                db.add(JobArtifact(job_id=job_id, name=name, kind=MERGED_KIND, step=None,
                                   storage_key=key, bytes=size, sha256=digest))  # fmt: skip
                db.add(export_event(job_id, "info", f"merged export ready: {name}", dtype,
                                    bytes=size, parameters=record["parameters"]))  # fmt: skip
        if duplicate:  # recorded by a concurrent export, or the job was deleted meanwhile
            self.store.delete(key)
            return f"{name} was recorded meanwhile; this upload deleted"
        return f"exported {name} ({size} bytes)"

    def _note(self, event: Any) -> None:
        try:
            with transaction(self.sessions) as db:
                db.add(event)
        except Exception:  # noqa: BLE001 - the log keeps it
            log.warning("could not record the export's event", exc_info=True)


def register_export_task(app: Celery, context: Any) -> None:
    """`EXPORT_TASK(job_id, dtype)` on the worker (acked on receipt: see the docstring)."""

    @app.task(name=EXPORT_TASK, acks_late=False, ignore_result=True)
    def export_merged_model(job_id: str, dtype: str) -> str:
        context.answerers.drop_loaded()  # the memory of models loaded to answer is the export's
        exporter = Exporter(context.settings, context.sessions, context.store, context.registry)
        outcome = exporter.export(job_id, dtype)
        log.info("job %s: %s", job_id, outcome)
        return outcome


def export_after_training(runner: Any, heartbeat: Any, job: Job, output_dir: Path) -> None:
    """The spec's `export.merged`: built from the output still on disk, after the job has
    been recorded succeeded (its webhook sent): the export's event tells when it is there."""
    asked = job.spec.get("export") or {}
    if not asked.get("merged"):
        return
    # The job is recorded and its lease released: the heartbeat has nothing left to renew
    # (beating on, it would report the lease lost). Stopping it twice is harmless.
    heartbeat.__exit__(None, None, None)
    dtype = asked.get("dtype", "bf16")
    exporter = Exporter(runner.settings, runner.sessions, runner.store, runner.registry)
    exporter._note(export_event(job.id, "info", f"merged export ({dtype}) started", dtype))
    log.info("job %s: %s", job.id, exporter.export(job.id, dtype, output_dir))

"""The Celery tasks. Each takes ids only, re-reads the world, and is safe to run twice.

`run_job` is on the training queue (one job at a time per worker process, late acks,
prefetch 1); `generate` on its inference queue, answered between jobs with the worker's
resident base models; the relay, the reaper and webhook delivery are periodic (Celery
beat) on the maintenance queue.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from functools import cached_property
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_shutting_down

from peft_engine.models import ModelRegistry
from peft_engine.models.registry import ReloadingRegistry
from peft_engine.models.resident import ResidentModels
from tuneq import faults
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.idempotency.service import purge_expired
from tuneq.jobs.lease import reap_expired_leases
from tuneq.queue import (
    DELIVER_WEBHOOKS_TASK,
    GENERATE_TASK,
    REAP_TASK,
    RELAY_TASK,
    RUN_JOB_TASK,
    inference_results,
    kick_webhook_delivery,
    make_celery,
    purge_sent,
    relay_now,
    relay_outbox,
    republish_stale_queued,
)
from tuneq.quotas.fair_share import wake_teams_of
from tuneq.settings import Settings
from tuneq.storage import ObjectStore, open_store
from tuneq.webhooks.delivery import deliver_due
from worker.exports import register_export_task
from worker.inference import Answerers
from worker.runner import ClaimUnavailable, JobRunner

log = logging.getLogger(__name__)


class WorkerContext:
    """What the tasks of one worker process share: settings, database, store, registry, and
    the base models kept in memory from one job to the next."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # A cut-off worker's open transaction must not hold its job's row (and the cancel
        # and the reaper behind it) past a third of the lease.
        self.engine = make_engine(
            settings.resolved_database_url,
            idle_in_transaction_seconds=max(1.0, settings.lease_ttl_seconds / 3),
        )
        self.sessions = make_sessionmaker(self.engine)
        self.shutting_down = threading.Event()

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings)

    @cached_property
    def registry(self) -> ModelRegistry:
        """The operator's registry, read again when its file changes (a new model trains
        without a worker restart)."""
        return ReloadingRegistry(lambda: self.settings.resolved_model_registry)

    @cached_property
    def resident(self) -> ResidentModels:
        return ResidentModels(
            max_models=self.settings.resident_models,
            max_bytes=self.settings.resident_model_bytes,
        )

    @cached_property
    def answerers(self) -> Answerers:
        return Answerers(self.settings, self.sessions, self.store, self.registry, self.resident)


def import_training_stack() -> None:
    """Import torch, transformers and peft while the worker starts rather than in its first
    job, which would otherwise wait for them (several seconds). Beat never calls this."""
    import peft_engine.training  # noqa: F401


def register_tasks(app: Celery, context: WorkerContext) -> None:
    settings = context.settings
    results = inference_results(app, settings)

    @app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
    def run_job(job_id: str) -> str:
        context.answerers.drop_loaded()  # the memory of models loaded to answer is the job's
        runner = JobRunner(
            settings,
            context.sessions,
            context.store,
            context.registry,
            context.shutting_down,
            context.resident,
        )
        try:
            outcome = runner.run(job_id)
        except ClaimUnavailable as err:
            # the database stayed away through the claim's retries: the message goes back
            # to the broker (not acked) for this or another worker to try again
            log.warning("job %s: could not claim (%s); message requeued", job_id, err)
            raise Reject(str(err), requeue=True) from err
        log.info("job %s: %s", job_id, outcome)
        if runner.woke is not None:  # a job its team's quota held back: publish it now
            relay_now(context.sessions, app)
        kick_webhook_delivery(app)  # the job's end, if it ended, is owed to its webhooks
        return outcome

    # Acked on receipt: a worker lost while answering leaves the API to time out, rather
    # than another to answer a client long gone. STARTED tells the API a worker took it.
    @app.task(
        name=GENERATE_TASK, acks_late=False, ignore_result=False, track_started=True,
        backend=results,
    )  # fmt: skip
    def generate(request: dict[str, Any]) -> dict[str, Any]:
        return context.answerers.answer(request)

    @app.task(name=RELAY_TASK, ignore_result=True)
    def relay() -> int:
        with transaction(context.sessions) as db:
            return relay_outbox(db, app)

    @app.task(name=REAP_TASK, ignore_result=True)
    def reap() -> int:
        with transaction(context.sessions) as db:
            moved = reap_expired_leases(db, first_delay=settings.handback_delay_seconds)
            # each job reaped freed its team's slot: a job its quota held back may start
            wake_teams_of(db, settings, [job_id for job_id, _ in moved])
            republish_stale_queued(db, older_than=timedelta(seconds=settings.requeue_after_seconds))
            purge_sent(db, older_than=timedelta(days=1))
            purge_expired(db, older_than=timedelta(hours=settings.idempotency_ttl_hours))
        results.cleanup()  # answers nobody read (the API gave up); Redis expires its own
        for job_id, state in moved:
            log.warning("reaper: job %s → %s", job_id, state)
        # publish what the reaper queued again without waiting for the next relay tick
        with transaction(context.sessions) as db:
            relay_outbox(db, app)
        return len(moved)

    @app.task(name=DELIVER_WEBHOOKS_TASK, ignore_result=True)
    def deliver_webhooks() -> int:
        return deliver_due(context.sessions, settings)

    register_export_task(app, context)  # POST /jobs/{id}/exports (worker/exports.py)


def create_worker_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    if settings.faults is not None:  # the fault tests' hooks (tuneq/faults.py)
        faults.arm(settings.faults)
    app = make_celery(settings)
    context = WorkerContext(settings)
    register_tasks(app, context)

    # A warm shutdown (SIGTERM) waits for the running task; ours then stops at its next
    # step, checkpoints and re-queues the job rather than holding the deploy for hours.
    def on_shutting_down(**_: object) -> None:
        context.shutting_down.set()

    worker_shutting_down.connect(on_shutting_down, weak=False)
    return app

"""The broker side of the queue: the Celery app, publishing, and the outbox relay.

The broker only carries "job X may be ready" (DESIGN §3). The job row and an outbox row are
committed together; `relay_outbox` publishes unsent rows and marks them sent. A message lost
on the way is re-sent by the reaper (`republish_stale_queued`); a duplicate is harmless
because a worker must win the claim before it runs anything.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.app.backends import by_url
from celery.backends.base import Backend
from celery.result import AsyncResult
from sqlalchemy import and_, delete, exists, or_, select
from sqlalchemy.orm import Session, sessionmaker

from tuneq import faults
from tuneq.db import db_now, transaction, utcnow
from tuneq.jobs.models import Job, OutboxMessage
from tuneq.jobs.states import JobState
from tuneq.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "tuneq.run_job"
RELAY_TASK = "tuneq.relay_outbox"
REAP_TASK = "tuneq.reap_expired_leases"
DELIVER_WEBHOOKS_TASK = "tuneq.deliver_webhooks"
GENERATE_TASK = "tuneq.generate"
TRAINING_QUEUE = "training"
MAINTENANCE_QUEUE = "maintenance"
# A training queue's generate requests go to its inference queue: the workers that can
# hold the queue's models answer them (`tuneq worker` listens on both).
INFERENCE_SUFFIX = "-inference"
# How long a worker's answer is kept for the API to read (it reads and forgets it at once).
RESULT_TTL_SECONDS = 3600


def make_celery(settings: Settings) -> Celery:
    app = Celery("tuneq", broker=settings.resolved_broker_url, set_as_current=False)
    options: dict[str, object] = {}
    if settings.resolved_broker_url.startswith("filesystem"):
        folder, control = settings.broker_dir / "messages", settings.broker_dir / "control"
        folder.mkdir(parents=True, exist_ok=True)
        control.mkdir(parents=True, exist_ok=True)
        options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(control),  # exchange bindings; kombu's default is ./control
        }
    elif settings.resolved_broker_url.startswith(("redis", "rediss")):
        # Never what keeps a long job alive (the lease is); only how soon an unacked
        # message is offered again, to be dropped by the claim if the job still runs.
        options = {"visibility_timeout": settings.broker_visibility_timeout_seconds}
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=TRAINING_QUEUE,
        task_routes={
            RELAY_TASK: {"queue": MAINTENANCE_QUEUE},
            REAP_TASK: {"queue": MAINTENANCE_QUEUE},
            DELIVER_WEBHOOKS_TASK: {"queue": MAINTENANCE_QUEUE},
        },
        beat_schedule={
            "relay-outbox": {
                "task": RELAY_TASK,
                "schedule": settings.relay_interval_seconds,
                "options": {"expires": settings.relay_interval_seconds * 2},
            },
            "reap-expired-leases": {
                "task": REAP_TASK,
                "schedule": settings.reaper_interval_seconds,
                "options": {"expires": settings.reaper_interval_seconds * 2},
            },
            "deliver-webhooks": {
                "task": DELIVER_WEBHOOKS_TASK,
                "schedule": settings.webhook_poll_seconds,
                "options": {"expires": settings.webhook_poll_seconds * 2},
            },
        },
        result_expires=RESULT_TTL_SECONDS,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def publish_run_job(app: Celery, job_id: str, queue: str = TRAINING_QUEUE) -> None:
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)


def inference_queue(queue: str) -> str:
    """The queue of generate requests for the jobs of a training queue."""
    return queue if queue.endswith(INFERENCE_SUFFIX) else f"{queue}{INFERENCE_SUFFIX}"


def with_inference_queues(queues: str) -> str:
    """The queues a worker listens on: each queue named, followed by its inference queue."""
    names = (name.strip() for name in queues.split(","))
    return ",".join(dict.fromkeys(q for n in names if n for q in (n, inference_queue(n))))


def inference_results(app: Celery, settings: Settings) -> Backend:
    """Where workers store generate answers for the API: the Redis broker's server, or a
    directory beside the filesystem broker. Only the generate task uses it (the app has no
    result backend: publishing a job never subscribes to a result)."""
    url = settings.resolved_broker_url
    if not url.startswith(("redis", "rediss")):
        settings.results_dir.mkdir(parents=True, exist_ok=True)
        url = settings.results_dir.as_uri()
    backend, url = by_url(url, app.loader)
    return backend(app=app, url=url)


def send_generate(
    app: Celery, results: Backend, request: dict[str, Any], *, queue: str, expires: float
) -> AsyncResult:
    """Publish a generate request; a worker that receives it after `expires` seconds drops it."""
    sent = app.send_task(GENERATE_TASK, args=[request], queue=queue, expires=expires)
    return AsyncResult(sent.id, backend=results, app=app)


def kick_webhook_delivery(app: Celery) -> None:
    """Have beat's worker send what a job's end owes now, not at its next tick (the tick
    is the backstop: a lost kick only waits for it)."""
    try:
        app.send_task(DELIVER_WEBHOOKS_TASK, queue=MAINTENANCE_QUEUE)
    except Exception:  # noqa: BLE001 - the broker may be down; beat's schedule retries
        log.warning("could not ask for webhook delivery; beat's schedule will send it")


def relay_outbox(db: Session, app: Celery, *, limit: int = 100) -> int:
    """Publish unsent outbox rows, oldest first, each to its job's queue; the caller's
    transaction marks them sent."""
    rows = db.execute(
        select(OutboxMessage, Job.queue)
        .join(Job, Job.id == OutboxMessage.job_id)
        .where(
            OutboxMessage.sent_at.is_(None),
            # the delay is judged by the database's clock, as it was set (lease.py)
            or_(OutboxMessage.not_before.is_(None), OutboxMessage.not_before <= db_now()),
        )
        .order_by(OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=OutboxMessage)
    ).all()
    for row, queue in rows:
        publish_run_job(app, row.job_id, queue)
        if faults.armed("relay_twice"):
            publish_run_job(app, row.job_id, queue)
        row.sent_at = utcnow()
    return len(rows)


def relay_now(sessions: sessionmaker[Session], app: Celery) -> None:
    """Publish the new outbox rows right after a commit; beat's periodic relay is the backstop."""
    try:
        with transaction(sessions) as db:
            relay_outbox(db, app)
    except Exception:  # noqa: BLE001 - the broker may be down; the beat relay retries
        log.warning("publishing after commit failed; beat's relay will retry", exc_info=True)


def republish_stale_queued(db: Session, *, older_than: timedelta) -> int:
    """Queue a new message for queued jobs whose last one went out long ago and was not claimed."""
    cutoff = utcnow() - older_than
    recent = exists().where(
        OutboxMessage.job_id == Job.id,
        or_(OutboxMessage.sent_at.is_(None), OutboxMessage.sent_at > cutoff),
    )
    stale = db.scalars(
        select(Job.id).where(and_(Job.state == JobState.QUEUED, Job.created_at < cutoff, ~recent))
    ).all()
    for job_id in stale:
        db.add(OutboxMessage(job_id=job_id))
    return len(stale)


def purge_sent(db: Session, *, older_than: timedelta) -> None:
    db.execute(delete(OutboxMessage).where(OutboxMessage.sent_at < utcnow() - older_than))

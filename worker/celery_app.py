"""The Celery application of `celery -A worker.celery_app worker|beat` (settings from TUNEQ_*)."""

from worker.tasks import create_worker_app

app = create_worker_app()

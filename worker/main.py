"""Start-up of the two Celery processes: `tuneq worker` and `tuneq beat` run these.

The CLI names them by string ("worker.main:run_worker") and imports this module only when
one of those commands runs: the shared package tuneq/ never imports worker/.
"""

from __future__ import annotations

from tuneq.queue import MAINTENANCE_QUEUE, with_inference_queues
from tuneq.settings import Settings
from worker.metrics import serve_beat_metrics, serve_worker_metrics
from worker.tasks import create_worker_app, import_training_stack


def run_worker(settings: Settings, *, queues: str, name: str | None = None) -> None:
    """A training worker on `queues` (comma-separated), one job at a time, until stopped;
    between jobs it answers generate requests on each queue's inference queue."""
    app = create_worker_app(settings)
    import_training_stack()  # before taking jobs, so that the first one does not wait
    serve_worker_metrics(settings)  # the solo pool trains in this process: its metrics
    app.worker_main(
        [
            "worker",
            "--queues",
            with_inference_queues(queues),
            # One training job per process: a GPU is not shared, and a solo pool lets a
            # SIGKILL take the job down with it (the lease then hands it to another worker).
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "--prefetch-multiplier",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
            "--hostname",
            name or "training@%h",
        ]
    )


def run_beat(settings: Settings) -> None:
    """The periodic outbox relay, lease reaper and webhook deliveries (run exactly one)."""
    app = create_worker_app(settings)
    serve_beat_metrics(settings)
    app.worker_main(
        [
            "worker",
            "--beat",
            # The schedule lives in memory: no shelve (pickle) file on disk.
            "--scheduler",
            "celery.beat:Scheduler",
            "--queues",
            MAINTENANCE_QUEUE,
            "--pool",
            "solo",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
            "--hostname",
            "beat@%h",
        ]
    )

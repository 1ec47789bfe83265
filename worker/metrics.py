"""Prometheus metrics of the two Celery processes: what a worker's training does, and what
waits in the queues (DESIGN §2; the API's own are api/metrics.py).

`tuneq worker` serves `/metrics` on TUNEQ_WORKER_METRICS_PORT: jobs running, optimizer
steps, trained tokens, step, evaluation and checkpoint-upload times, bytes uploaded, memory,
attempts started and crashed by cause. The worker's pool is `solo` (worker/main.py): the job
trains in the process that serves the metrics, so one registry in memory sees it all, with
no multiprocess mode. A multi-GPU job's ranks report through the attempt's hooks too
(worker/distributed.py replays them), but their memory is their own processes'.

`tuneq beat` serves `/metrics` on TUNEQ_BEAT_METRICS_PORT: queued jobs and the age of the
oldest, per queue and team, read from the database at scrape time (one grouped query on
the partial index of queued jobs), so the numbers are the database's whatever the workers.

Labels stay bounded: a queue, a team, a cause from a fixed set; never a job id.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from peft_engine.hooks import Hooks
from tuneq.db import make_engine, make_sessionmaker, utcnow
from tuneq.jobs.models import Job
from tuneq.jobs.states import JobState
from tuneq.settings import Settings
from tuneq.teams.models import Team
from worker.journal import LeaseLapsed
from worker.outcomes import crash_class

if TYPE_CHECKING:
    from worker.runner import _Attempt

log = logging.getLogger(__name__)

# worker/outcomes.py's classes of a crash, and a lease lost to another worker: the only
# values of the `cause` label. All but out_of_memory hand the job back for another attempt
# (until its max_attempts; the last one fails the job with that code instead).
CRASH_CAUSES = (
    "infrastructure_unavailable",
    "disk_full",
    "internal_error",
    "out_of_memory",
    "lease_lost",
)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
EVAL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
UPLOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    """The metrics of one worker process, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, q = self.registry, ["queue"]
        self.jobs_running = Gauge(
            "tuneq_worker_jobs_running",
            "Jobs this worker runs (claimed, not yet ended)",
            q,
            registry=r,
        )
        self.attempts = Counter(
            "tuneq_worker_attempts_started", "Job attempts started", q, registry=r
        )
        self.crashes = Counter(
            "tuneq_worker_attempt_crashes",
            "Attempts ended by an exception, by cause; all but out_of_memory hand the job "
            "back for a retry (the last attempt fails it); lease_lost: another worker has it",
            ["queue", "cause"],
            registry=r,
        )
        self.steps = Counter("tuneq_worker_steps", "Optimizer steps trained", q, registry=r)
        self.tokens = Counter("tuneq_worker_tokens", "Tokens trained", q, registry=r)
        self.step_seconds = Histogram(
            "tuneq_worker_step_seconds",
            "Time of one optimizer step (forward, backward, update)",
            q,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.eval_seconds = Histogram(
            "tuneq_worker_eval_seconds",
            "Time of one evaluation on the validation set",
            q,
            buckets=EVAL_BUCKETS,
            registry=r,
        )
        self.upload_seconds = Histogram(
            "tuneq_worker_checkpoint_upload_seconds",
            "Time to upload a checkpoint to the store and record it",
            q,
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.upload_bytes = Counter(
            "tuneq_worker_checkpoint_upload_bytes",
            "Bytes of checkpoints uploaded",
            q,
            registry=r,
        )
        self.registry.register(MemoryCollector())

    @contextmanager
    def attempt(self) -> Iterator[AttemptMetrics]:
        """Around one attempt: the job counts as running from its `started` to the end."""
        observed = AttemptMetrics(self)
        try:
            yield observed
        finally:
            if observed.queue is not None:
                self.jobs_running.labels(observed.queue).dec()


@dataclass
class AttemptMetrics:
    """What one attempt reports; its queue is known once the job is read."""

    metrics: WorkerMetrics
    queue: str | None = None
    _tokens: float | None = None  # the run's trained tokens at its last step
    _trained_at: tuple[int, float] | None = None  # (step, when its train metrics came)

    def started(self, queue: str) -> None:
        self.queue = queue
        self.metrics.attempts.labels(queue).inc()
        self.metrics.jobs_running.labels(queue).inc()

    def crashed(self, attempt: _Attempt, err: BaseException) -> None:
        """The attempt ended on `err`: count its cause as worker/outcomes.py classes it."""
        if isinstance(err, LeaseLapsed) or attempt.heartbeat.lost.is_set():
            cause = "lease_lost"
        else:
            cause = crash_class(err)[0]
        cause = cause if cause in CRASH_CAUSES else "internal_error"  # a bounded label
        self.metrics.crashes.labels(self.queue or "unknown", cause).inc()

    def hooks(self, hooks: Hooks) -> Hooks:
        """`hooks`, each step, evaluation and checkpoint also counted and timed."""
        on_metrics, on_checkpoint = hooks.on_metrics, hooks.on_checkpoint

        def observed_metrics(step: int, values: dict[str, float]) -> None:
            if "train_loss" in values:
                on_metrics(step, values)
                self.trained(step, values)
                self._trained_at = (step, time.monotonic())
            else:
                self.evaluated(step)
                on_metrics(step, values)

        def observed_checkpoint(path: Path, step: int, values: dict[str, float]) -> None:
            started = time.monotonic()
            on_checkpoint(path, step, values)
            self.uploaded(time.monotonic() - started, directory_bytes(path))

        return replace(hooks, on_metrics=observed_metrics, on_checkpoint=observed_checkpoint)

    def trained(self, step: int, values: dict[str, float]) -> None:
        """A step's train metrics: the engine's cumulative trained tokens and its tokens/s
        give the step's tokens and time. The first step after a resume counts as a step
        only: the tokens trained before it are the earlier attempt's."""
        queue = self.queue or "unknown"
        self.metrics.steps.labels(queue).inc()
        trained = float(values.get("trained_tokens", 0.0))
        before = 0.0 if step == 1 else self._tokens
        self._tokens = trained
        if before is None or trained <= before:
            return
        tokens = trained - before
        self.metrics.tokens.labels(queue).inc(tokens)
        per_second = float(values.get("tokens_per_second", 0.0))
        if per_second > 0:
            self.metrics.step_seconds.labels(queue).observe(tokens / per_second)

    def evaluated(self, step: int) -> None:
        """Eval metrics arrive when the evaluation ends, right after the step's train
        metrics; the base model's evaluation (step 0) has no such mark and is not timed."""
        if self._trained_at is not None and self._trained_at[0] == step:
            seconds = time.monotonic() - self._trained_at[1]
            self.metrics.eval_seconds.labels(self.queue or "unknown").observe(seconds)
        self._trained_at = None

    def uploaded(self, seconds: float, size: int) -> None:
        queue = self.queue or "unknown"
        self.metrics.upload_seconds.labels(queue).observe(seconds)
        self.metrics.upload_bytes.labels(queue).inc(size)


def directory_bytes(path: Path) -> int:
    """The bytes of the files under `path` (a checkpoint: what `put_dir` uploads)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class MemoryCollector(Collector):
    """Memory in use and at its peak, read at scrape time: the process's resident set
    (device "cpu"), and the CUDA allocator's on each GPU this process has used (tensors
    allocated; peak since the worker started). torch is asked only once something else
    imported it: beat and an idle control plane never load it for this."""

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(
            "tuneq_worker_device_memory_bytes",
            "Memory in use: cpu the resident set, cuda:N tensors allocated",
            labels=["device"],
        )
        peak = GaugeMetricFamily(
            "tuneq_worker_device_memory_peak_bytes",
            "Peak memory since the worker started, as for in use",
            labels=["device"],
        )
        for device, in_use, at_peak in memory_by_device():
            used.add_metric([device], in_use)
            peak.add_metric([device], at_peak)
        yield used
        yield peak


def memory_by_device() -> list[tuple[str, float, float]]:
    """(device, bytes in use, peak bytes) for the host and each CUDA device in use."""
    resident = _resident_bytes()  # the kernel's high-water mark may lag the current page count
    found = [("cpu", float(resident), float(max(resident, _peak_resident_bytes())))]
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            found.append(
                (
                    f"cuda:{index}",
                    float(torch.cuda.memory_allocated(index)),
                    float(torch.cuda.max_memory_allocated(index)),
                )
            )
    return found


def _resident_bytes() -> int:
    try:  # Linux: pages resident, the second field
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_resident_bytes()


def _peak_resident_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


class QueueCollector(Collector):
    """Queued jobs and the age of the oldest, per queue and team, from the database at
    scrape time. A (queue, team) seen once stays at 0 when it empties, so a graph drops to
    zero rather than ending. The age counts from the job's creation: a job handed back or
    resumed keeps its first place (and its age), as the fair-share claim does."""

    def __init__(self, sessions: sessionmaker[Session], clock: Callable[[], Any] = utcnow):
        self.sessions, self.clock = sessions, clock
        self.seen: set[tuple[str, str]] = set()

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "tuneq_queue_jobs", "Jobs queued (waiting for a worker)", labels=["queue", "team"]
        )
        age = GaugeMetricFamily(
            "tuneq_queue_oldest_job_age_seconds",
            "Age of the oldest queued job",
            labels=["queue", "team"],
        )
        try:
            rows = self._queued()
        except Exception:  # noqa: BLE001 - a scrape must answer; the log says why it is empty
            log.warning("queue metrics: the database did not answer", exc_info=True)
            return
        now = self.clock()
        for queue, team, count, oldest in rows:
            self.seen.add((queue, team))
            depth.add_metric([queue, team], count)
            age.add_metric([queue, team], max(0.0, (now - oldest).total_seconds()))
        for queue, team in sorted(self.seen - {(queue, team) for queue, team, *_ in rows}):
            depth.add_metric([queue, team], 0)
        yield depth
        yield age

    def _queued(self) -> list[tuple[str, str, int, Any]]:
        query = (
            select(Job.queue, Team.name, func.count(), func.min(Job.created_at))
            .join(Team, Team.id == Job.team_id)
            .where(Job.state == JobState.QUEUED.value)
            .group_by(Job.queue, Team.name)
        )
        with self.sessions() as db:
            return [tuple(row) for row in db.execute(query).all()]  # type: ignore[misc]


# The worker process's metrics: the attempts of its jobs report here (worker/runner.py).
WORKER_METRICS = WorkerMetrics()


def serve_worker_metrics(settings: Settings) -> bool:
    """`tuneq worker`: this process's metrics on TUNEQ_WORKER_METRICS_PORT."""
    return _serve(WORKER_METRICS.registry, settings, settings.worker_metrics_port, "worker")


def serve_beat_metrics(settings: Settings) -> bool:
    """`tuneq beat`: the queues' metrics on TUNEQ_BEAT_METRICS_PORT, on an engine of its own."""
    if settings.beat_metrics_port == 0:
        return False
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    registry = CollectorRegistry()
    registry.register(QueueCollector(sessions))
    return _serve(registry, settings, settings.beat_metrics_port, "beat")


def _serve(registry: CollectorRegistry, settings: Settings, port: int, what: str) -> bool:
    """Serve `registry` at http://TUNEQ_METRICS_HOST:port/metrics from a daemon thread; 0
    turns it off. A port already taken (a second worker on the host, left at the default)
    is logged and the process runs on without it: metrics never stop a job."""
    if port == 0:
        return False
    host = settings.metrics_host
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        log.warning(
            "%s metrics not served on %s:%s (%s); give each process its own port",
            what,
            host,
            port,
            err,
        )
        return False
    log.info("%s metrics at http://%s:%s/metrics", what, host, port)
    return True

"""Experiment tracking: a job's run on the operator's MLflow server, or in Weights & Biases,
one per entry of the spec's `integrations` (DESIGN §5).

    open    the job's spec, resolved hyperparameters and estimate as params; tags (job,
            team, model, method, attempt); a later attempt continues the same run
    tee     the attempt's hooks: each step's and evaluation's metrics, with their step; the
            engine's exact hyperparameters
    close   the adapter as an artifact, and the run ended as the attempt ended

A tracker never fails the job. Each call is guarded; the first failure is one warning job
event; what failed, and what comes while the server is away, is kept in order (at most
10,000 calls; the oldest go first) and tried again later (after 30 s, doubled each failure),
at the latest at the attempt's end; what is still not delivered then is counted in an info
event. A call waits at most its client's timeout, between two training steps.

The run id lives in the job's events: the attempt that starts a run writes an info event
whose data holds `tracking_run` {index, type, run_id} (the user sees it too: where the run
is); the next attempt reads it back, so the runs table needs no column.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from peft_engine.hooks import Event, Hooks
from tuneq.jobs.models import Job, JobEvent
from tuneq.jobs.planning import tracker_unavailable
from tuneq.jobs.schemas import ADAPTER_ARTIFACT
from tuneq.teams.models import Team
from worker.tracking_sinks import MlflowSink, WandbSink

if TYPE_CHECKING:
    from worker.runner import _Attempt

log = logging.getLogger(__name__)

BUFFER = 10_000  # calls kept while a tracking server is away
_FIRST_RETRY = 30.0  # seconds before a failed tracker is tried again; doubled each failure
_LAST_RETRY = 600.0
RUN_KEY = "tracking_run"  # the event data that records a run's id

Warn = Callable[..., None]  # (message, data, level="warning"): a job event


@dataclass
class _Tracker:
    """One integration: its calls in order, tried now or, while its server is away, later."""

    sink: Any  # MlflowSink | WandbSink
    index: int
    name: str  # the experiment or project
    warn: Warn
    record_run: Callable[[_Tracker, str], None]
    run_id: str | None  # an earlier attempt's run, continued
    start_args: tuple[str, dict[str, str]]  # the run's name and tags
    pending: deque[tuple[str, Callable[[], None]]] = field(default_factory=deque)
    started: bool = False
    recorded: bool = False  # this attempt created the run
    dropped: int = 0
    failures: int = 0
    retry_at: float = 0.0
    warned: bool = False

    @property
    def fresh(self) -> bool:
        """The run starts in this attempt: its params are this attempt's to write."""
        return self.run_id is None or self.recorded

    @property
    def where(self) -> dict[str, Any]:
        return {"integration": f"integrations[{self.index}]", "type": self.sink.kind}

    def call(self, what: str, do: Callable[[], None]) -> None:
        if len(self.pending) >= BUFFER:
            self.pending.popleft()
            self.dropped += 1
        self.pending.append((what, do))
        if time.monotonic() >= self.retry_at:
            self.flush()

    def flush(self) -> bool:
        """Send what is pending, in order; False (and a later retry) at the first failure."""
        try:
            if not self.started:
                self._start()
            while self.pending:
                self.pending[0][1]()
                self.pending.popleft()
        except Exception as err:  # noqa: BLE001 - a tracker never fails the job
            self.failures += 1
            wait = min(_FIRST_RETRY * 2 ** (self.failures - 1), _LAST_RETRY)
            self.retry_at = time.monotonic() + wait
            self._warn_once(err)
            return False
        self.failures, self.retry_at = 0, 0.0
        return True

    def _start(self) -> None:
        resumed = self.run_id
        self.run_id = self.sink.start(resumed, *self.start_args)
        self.started = True
        if resumed is None:
            self.recorded = True
            self.record_run(self, self.run_id)

    def _warn_once(self, err: Exception) -> None:
        log.warning("%s tracking failed", self.sink.label, exc_info=True)
        if self.warned:
            return
        self.warned = True
        told = f"{type(err).__name__}: {err}"[:300]
        self.warn(
            f"{self.sink.label} tracking failed ({told}); the job goes on, and what was not "
            "logged is tried again later",
            self.where,
        )


@dataclass
class Tracking:
    """The job's trackers for one attempt; with none (the usual job), each call is a no-op."""

    trackers: list[_Tracker] = field(default_factory=list)
    adapter: Path | None = None  # the trained adapter's directory, once training succeeded
    adapter_key: str = ""

    @classmethod
    def open(cls, attempt: _Attempt, job: Job) -> Tracking:
        """The trackers of the job's `integrations`; one the worker cannot serve (settings
        changed since submission, a package missing here) is a warning event instead."""
        if not (job.resolved or {}).get("integrations"):
            return cls()
        try:
            return cls._open(attempt, job, _warner(attempt))
        except Exception as err:  # noqa: BLE001 - a database blip here must not fail the job
            log.warning("job %s: tracking not started", job.id, exc_info=True)
            _warner(attempt)(f"not tracked: {type(err).__name__}: {err}"[:300], {})
            return cls()

    @classmethod
    def _open(cls, attempt: _Attempt, job: Job, warn: Warn) -> Tracking:
        integrations = job.resolved["integrations"]
        settings = attempt.runner.settings
        runs = _earlier_runs(attempt, job.id)
        tags = _tags(attempt, job)
        tracking = cls(adapter_key=f"jobs/{job.id}/attempts/{attempt.claim.attempt}/"
                       f"{ADAPTER_ARTIFACT}")  # fmt: skip
        for index, integration in enumerate(integrations):
            kind = integration["type"]
            name = integration.get("experiment") or integration.get("project") or ""
            where = {"integration": f"integrations[{index}]", "type": kind}
            why, sink = tracker_unavailable(kind, settings, here=True), None
            try:
                sink = None if why else _SINKS[kind](settings, name)
            except Exception as err:  # noqa: BLE001 - an import or a client that breaks
                why = f"{type(err).__name__}: {err}"[:300]
            if sink is None:
                warn(f"not tracked in {kind}: {why}", where)
                continue
            tracking.trackers.append(_Tracker(sink, index, name, warn, _recorder(attempt),
                                              runs.get((index, kind)), (job.id, tags)))  # fmt: skip
        tracking._each("params", lambda sink: sink.params(_params(job)), fresh_only=True)
        return tracking

    def tee(self, hooks: Hooks) -> Hooks:
        """The attempt's hooks, each also feeding the trackers (after the job's own write)."""
        if not self.trackers:
            return hooks

        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            hooks.on_metrics(step, metrics)
            values = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            self._each(f"metrics of step {step}", lambda sink: sink.metrics(step, values))

        def on_event(event: Event) -> None:
            hooks.on_event(event)
            resolved = event.data.get("resolved_hyperparameters")
            if resolved:  # params are written once per run: by the attempt that starts it
                engine = {"engine": resolved}
                what = "the engine's hyperparameters"
                self._each(what, lambda sink: sink.params(engine), fresh_only=True)

        return dataclasses.replace(hooks, on_metrics=on_metrics, on_event=on_event)

    def close(self, outcome: str) -> None:
        """The adapter and the run's end, from the attempt's outcome; then one last try at
        what is pending, and a warning for what is still not logged. Never raises."""
        if not self.trackers:
            return
        status = _status(outcome)
        adapter, key = self.adapter, self.adapter_key
        if adapter is not None and status in {"FINISHED", "FAILED"}:
            self._each("the adapter", lambda sink: sink.adapter(adapter, key))
        self._each("the run's end", lambda sink: sink.end(status))
        for tracker in self.trackers:
            if tracker.flush() and not tracker.dropped:
                continue
            lost = len(tracker.pending) + tracker.dropped
            tracker.warn(  # the job was warned at the first failure: this says what it cost
                f"{tracker.sink.label} tracking: {lost} logging calls were not delivered "
                f"(the run {tracker.run_id or 'was never created'})",
                {**tracker.where, "undelivered": lost},
                "info" if tracker.warned else "warning",
            )

    def _each(self, what: str, do: Callable[[Any], None], fresh_only: bool = False) -> None:
        for tracker in self.trackers:
            if tracker.fresh or not fresh_only:
                tracker.call(what, lambda sink=tracker.sink: do(sink))


_SINKS: dict[str, Callable[[Any, str], Any]] = {"mlflow": MlflowSink, "wandb": WandbSink}


def _status(outcome: str) -> str | None:
    """The run's end for the attempt's outcome (worker/outcomes.py); None: the job goes on
    in a later attempt (paused, handed back, a worker shutting down, a lost lease)."""
    if outcome == "succeeded":
        return "FINISHED"
    if outcome.startswith("failed"):
        return "FAILED"
    if outcome == "cancelled":
        return "KILLED"
    return None


def _warner(attempt: _Attempt) -> Warn:
    def warn(message: str, data: dict[str, Any], level: str = "warning") -> None:
        try:
            attempt._event(level, message, data)
        except Exception:  # noqa: BLE001 - the lease is gone: nobody reads this attempt
            log.warning("job %s: %s", attempt.claim.job_id, message)

    return warn


def _recorder(attempt: _Attempt) -> Callable[[_Tracker, str], None]:
    def record(tracker: _Tracker, run_id: str) -> None:
        data = {**tracker.where, RUN_KEY: {"index": tracker.index, "type": tracker.sink.kind,
                                           "run_id": run_id}}  # fmt: skip
        message = f"{tracker.sink.label} run {run_id} started in {tracker.name!r}"
        try:
            attempt._event("info", message, data)
        except Exception:  # noqa: BLE001 - a later attempt starts a new run then
            log.warning("job %s: %s not recorded", attempt.claim.job_id, message, exc_info=True)

    return record


def _earlier_runs(attempt: _Attempt, job_id: str) -> dict[tuple[int, str], str]:
    """(index, type) -> run id, from the events of the job's earlier attempts."""
    if attempt.claim.attempt <= 1:
        return {}
    query = select(JobEvent.data).where(
        JobEvent.job_id == job_id, JobEvent.type == "message", JobEvent.level == "info"
    )
    with attempt.runner.sessions() as db:
        found = [data[RUN_KEY] for data in db.scalars(query) if RUN_KEY in (data or {})]
    return {(run["index"], run["type"]): run["run_id"] for run in found}


def _tags(attempt: _Attempt, job: Job) -> dict[str, str]:
    with attempt.runner.sessions() as db:
        team = db.get(Team, job.team_id)
    method = ((job.resolved or {}).get("method") or {}).get("type", "")
    return {
        "tuneq.job_id": job.id,
        "tuneq.team": team.name if team is not None else job.team_id,
        "tuneq.model": job.model,
        "tuneq.method": method,
        "tuneq.task": job.task,
    }


def _params(job: Job) -> dict[str, Any]:
    """The spec as sent, its resolved method and hyperparameters over it, and the estimate."""
    spec = {k: v for k, v in job.spec.items() if k not in {"integrations", "metadata"}}
    resolved = {k: v for k, v in (job.resolved or {}).items() if k != "integrations"}
    return {**spec, **resolved, "estimate": job.estimate or {}}

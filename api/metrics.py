"""Prometheus `/metrics`: request counts and latencies by route, and jobs by state."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from tuneq.jobs.models import Job
from tuneq.jobs.states import JobState


class _JobsByState(Collector):
    """Read at scrape time from the database, so every API replica reports the same truth."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("tuneq_jobs", "Jobs by state", labels=["state"])
        sessions = getattr(self.app.state, "sessions", None)
        counts: dict[str, int] = {}
        if sessions is not None:
            with sessions() as db:
                counts = dict(db.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        for state in JobState:
            gauge.add_metric([state.value], counts.get(state.value, 0))
        yield gauge


def install(app: FastAPI) -> None:
    registry = CollectorRegistry()
    requests = Counter(
        "tuneq_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "tuneq_http_request_seconds", "HTTP request latency", ["method", "route"], registry=registry
    )
    registry.register(_JobsByState(app))

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        latency.labels(request.method, path).observe(time.perf_counter() - started)
        requests.labels(request.method, path, str(response.status_code)).inc()
        return response

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

"""Prometheus `/metrics`: request counts and latencies by route, event streams open, and jobs
by state."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class _Observe:
    """Counts and times every HTTP request by route and status. An event stream is counted,
    and gauged while open, but not timed: it lasts as long as its client listens, and would
    swamp the latencies.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs
    each request through an extra task and memory streams (and a task group per body
    read), which cost a GET about as much as the route itself.
    """

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram, streams: Gauge) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped the app
        event_stream = False

        async def send_observed(message: Message) -> None:
            nonlocal status, event_stream
            if message["type"] == "http.response.start":
                status = message["status"]
                event_stream = _is_event_stream(message.get("headers", ()))
                if event_stream:
                    self.streams.inc()
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            if event_stream:
                self.streams.dec()
            else:
                self.latency.labels(method, path).observe(time.perf_counter() - started)
            self.requests.labels(method, path, str(status)).inc()


def _is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(
        name.lower() == b"content-type" and value.startswith(b"text/event-stream")
        for name, value in headers
    )


def install(app: FastAPI) -> None:
    registry = CollectorRegistry()
    requests = Counter(
        "tuneq_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "tuneq_http_request_seconds", "HTTP request latency", ["method", "route"], registry=registry
    )
    streams = Gauge("tuneq_http_event_streams", "Event streams open", registry=registry)
    registry.register(_JobsByState(app))
    app.add_middleware(_Observe, requests=requests, latency=latency, streams=streams)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

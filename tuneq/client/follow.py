"""Following a job live: its events as they happen, then the job as it ended.

The event stream (`GET /jobs/{id}/events/stream`, Server-Sent Events) is read first; a
dropped connection is resumed from the last event seen (`Last-Event-ID`), so no event is
lost or repeated. Where the stream route does not exist (404/405: an older server, or a
proxy that refuses it) or keeps failing, the events list is polled (`?after=`) instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx

from tuneq.client.errors import TuneqAPIError
from tuneq.client.sse import parse_events
from tuneq.client.types import Event, Job

if TYPE_CHECKING:
    from tuneq.client.client import Jobs

NO_STREAM_ROUTE = frozenset({404, 405})  # a missing job is a 404 too: polling then says so
# Longer than the server's heartbeat (15 s by default): silence this long is a dead link.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)


class JobFollow:
    """Iterate it for the job's events, each once and in order; then `job` is the job
    as it ended (succeeded, failed or cancelled)."""

    def __init__(
        self,
        jobs: Jobs,
        job_id: str,
        *,
        after: int | None = None,
        poll_seconds: float = 1.0,
        max_stream_failures: int = 5,
    ) -> None:
        self.jobs = jobs
        self.job_id = job_id
        self.after = after  # the id of the last event seen
        self.poll_seconds = poll_seconds
        self.max_stream_failures = max_stream_failures
        self.job: Job | None = None
        self.streamed = False  # whether the events came from the stream (else polling)

    def __iter__(self) -> Iterator[Event]:
        yield from self._stream()
        if self.job is None:
            yield from self._poll()

    def _stream(self) -> Iterator[Event]:
        """Events from the stream until its `end`; returns early to let polling take over."""
        failures, reconnect_seconds = 0, 2.0
        while failures < self.max_stream_failures:
            headers = {"Accept": "text/event-stream"}
            if self.after is not None:
                headers["Last-Event-ID"] = str(self.after)
            try:
                with self.jobs.transport.stream(
                    "GET",
                    f"/jobs/{self.job_id}/events/stream",
                    headers=headers,
                    timeout=STREAM_TIMEOUT,
                ) as response:
                    for sse in parse_events(response.iter_lines()):
                        if sse.retry_ms is not None:
                            reconnect_seconds = sse.retry_ms / 1000
                        if sse.event == "end":
                            self.job = Job.of(json.loads(sse.data))
                            return
                        event = Event.of(json.loads(sse.data))
                        if self.after is None or event.id > self.after:
                            self.streamed, self.after, failures = True, event.id, 0
                            yield event
            except TuneqAPIError as err:
                if err.status in NO_STREAM_ROUTE:
                    return
                if err.status is not None and err.status < 500 and err.status != 429:
                    raise
            except httpx.TransportError:
                pass  # the connection dropped mid-stream: resume after the last event
            failures += 1
            time.sleep(reconnect_seconds)

    def _poll(self) -> Iterator[Event]:
        """Events page by page; once the job has ended, the events it wrote before that."""
        ended: Job | None = None
        while True:
            page = self.jobs.events(self.job_id, after=self.after, limit=100)
            for event in page.data:
                self.after = event.id
                yield event
            if page.has_more:
                continue
            if ended is not None:
                self.job = ended
                return
            job = self.jobs.get(self.job_id)
            if job.done:
                ended = job  # one more page: what it wrote before it ended
            else:
                time.sleep(self.poll_seconds)

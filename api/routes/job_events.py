"""A job's events, two roads: `GET /jobs/{id}/events` pages through them, and
`GET /jobs/{id}/events/stream` follows them as Server-Sent Events until the job ends.

Both read through `tuneq.jobs.service.list_events`. The stream polls (every
`TUNEQ_SSE_POLL_SECONDS`), each poll one short session in a worker thread (`api.deps.Reads`):
a session held open for the stream's life would hold SQLite's write lock against the worker,
and a connection of PostgreSQL's pool. The wire format is contract 1 of issue 14:

    retry: 2000                     once, first
    id: 42                          each event, in order of id
    event: metrics
    data: {"id": 42, ...}           the EventPublic that GET /jobs/{id}/events lists

    : keep-alive                    after TUNEQ_SSE_HEARTBEAT_SECONDS of silence

    event: end                      the job is terminal and every event was sent;
    data: {"id": "job-...", ...}    the job as GET /jobs/{id} shows it; then the server closes

A stream open for `TUNEQ_SSE_MAX_SECONDS` closes without `end` (the client resumes with
Last-Event-ID): no stream outlives a deployment by much, however long its job trains.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.deps import DbDep, Reads, TeamDep
from api.openapi_docs import responses
from api.routes.jobs import NO_JOB, Limit, list_page
from tuneq.db import MAX_ROW_ID
from tuneq.errors import NotFound
from tuneq.jobs import service
from tuneq.jobs.models import JobEvent
from tuneq.jobs.schemas import EventPublic, EventsPublic, JobPublic
from tuneq.jobs.states import TERMINAL
from tuneq.settings import Settings
from tuneq.teams.models import Team

router = APIRouter(prefix="/jobs", tags=["jobs"])

RETRY = b"retry: 2000\n\n"  # the client waits 2 s before it reconnects
KEEP_ALIVE = b": keep-alive\n\n"
PAGE = 100  # events read per poll; a page that is full is followed by the next at once
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


@router.get("/{job_id}/events", response_model=EventsPublic, responses=responses(NO_JOB))
def list_events(
    job_id: str,
    team: TeamDep,
    db: DbDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_ROW_ID)] = None,
    limit: Limit = 100,
) -> dict[str, Any]:
    job = service.get_job(db=db, team=team, job_id=job_id)
    events, has_more = service.list_events(db=db, job=job, after=after, limit=limit)
    return list_page(map(EventPublic.of, events), has_more=has_more)


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={
        200: {"description": "Server-Sent Events", "content": {"text/event-stream": {}}},
        **responses(NO_JOB),
    },
)
async def stream_events(
    job_id: str,
    request: Request,
    team: TeamDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_ROW_ID, description="resume after this event id")
    ] = None,
    last_event_id: Annotated[
        int | None, Header(ge=0, le=MAX_ROW_ID, description="resume after it (wins)")
    ] = None,
) -> StreamingResponse:
    """The job's events with id > Last-Event-ID (or `after`), then the ones to come."""
    reads: Reads = request.app.state.reads
    # Before the response starts: another team's job or none is a 404, not a broken stream.
    await reads.run(lambda db: service.get_job(db=db, team=team, job_id=job_id))
    resume = last_event_id if last_event_id is not None else after
    follow = _Follow(reads, team, job_id, request.app.state.settings)
    return StreamingResponse(follow.stream(resume), media_type="text/event-stream", headers=HEADERS)


@dataclass(frozen=True)
class _Poll:
    """What one poll found: the events' frames, and the `end` frame if the job has ended."""

    frames: bytes
    last_id: int | None
    has_more: bool
    end: bytes | None


def _poll(db: Session, *, team: Team, job_id: str, after: int | None) -> _Poll:
    # The state is read before the events: an event committed before (or with) the terminal
    # state is in this page or a later one, never skipped by an `end` sent too soon.
    job = service.get_job(db=db, team=team, job_id=job_id)
    ended = job.state in TERMINAL
    document = JobPublic.of(job).model_dump_json() if ended else None
    events, has_more = service.list_events(db=db, job=job, after=after, limit=PAGE)
    frames = b"".join(map(_event_frame, events))
    end = f"event: end\ndata: {document}\n\n".encode() if ended and not has_more else None
    return _Poll(frames, events[-1].id if events else None, has_more, end)


def _event_frame(event: JobEvent) -> bytes:
    data = EventPublic.of(event).model_dump_json()  # one line: JSON escapes its newlines
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()


@dataclass(frozen=True)
class _Follow:
    """One client's stream of one job. Ends when the job has, or after `sse_max_seconds`;
    a client that goes away cancels it (Starlette listens for the disconnect) at its next
    await: a poll in a thread finishes first, and its session closes there."""

    reads: Reads
    team: Team
    job_id: str
    settings: Settings

    async def stream(self, after: int | None) -> AsyncIterator[bytes]:
        yield RETRY
        started = quiet_since = time.monotonic()
        while time.monotonic() - started < self.settings.sse_max_seconds:
            try:
                poll = await self.reads.run(
                    partial(_poll, team=self.team, job_id=self.job_id, after=after)
                )
            except NotFound:  # the job is gone: a reconnect gets the 404
                return
            if poll.frames:
                yield poll.frames
                after, quiet_since = poll.last_id, time.monotonic()
            if poll.end is not None:
                yield poll.end
                return
            if poll.has_more:
                continue
            if time.monotonic() - quiet_since >= self.settings.sse_heartbeat_seconds:
                yield KEEP_ALIVE
                quiet_since = time.monotonic()
            await anyio.sleep(self.settings.sse_poll_seconds)

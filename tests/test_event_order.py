"""A reader that resumes after the last event id it saw never skips an event (PostgreSQL).

`?after=` and SSE's Last-Event-ID rely on one job's events becoming visible in id order.
PostgreSQL gives a row its id when it is inserted, not when it commits, so two writers of
one job's events (the worker's metrics, the API's cancel) could commit out of id order; the
lock taken before an event's insert (tuneq.jobs.models) makes the second writer wait. On
SQLite one writer holds the database at a time, so the order holds by construction.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select, text

from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
from tests.service_fixtures import insert_job, make_settings, migrate
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.jobs.models import JobEvent
from tuneq.jobs.states import JobState


@pytest.fixture
def sessions(tmp_path):
    url = fresh_postgres_database(require(postgres_url))
    settings = make_settings(tmp_path, database_url=url)
    migrate(settings)
    engine = make_engine(settings.resolved_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()
    drop_postgres_database(url)


def _event(job_id: str, message: str) -> JobEvent:
    return JobEvent(job_id=job_id, type="message", level="info", message=message)


def _visible(sessions, job_id: str) -> list[str]:
    with sessions() as db:
        query = select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return list(db.scalars(query))


def _waiting_for_a_lock(sessions) -> bool:
    with sessions() as db:
        return bool(db.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


def test_a_later_writer_of_a_jobs_events_waits_for_the_earlier_one_to_commit(sessions):
    job_id = insert_job(sessions, state=JobState.RUNNING)
    first = sessions()
    first.begin()
    first.add(_event(job_id, "worker: step 7"))
    first.flush()  # has its id, not yet committed

    def second_writer() -> None:
        with transaction(sessions) as db:
            db.add(_event(job_id, "api: cancel requested"))

    writer = threading.Thread(target=second_writer)
    writer.start()
    deadline = time.monotonic() + 30
    while not _waiting_for_a_lock(sessions):  # the second writer reached the lock
        assert writer.is_alive(), "the second writer committed while the first was open"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # What a reader polling now sees: nothing it could step over later.
    assert _visible(sessions, job_id) == []
    first.commit()
    first.close()
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert _visible(sessions, job_id) == ["worker: step 7", "api: cancel requested"]

"""A worker's side of a database that goes away: its heartbeat, its writes, its history.

The worker reaches a real PostgreSQL through a FlakyProxy on loopback, which resets its
connections and refuses new ones as a restart or a network partition does; the database
itself (and whoever else talks to it directly) carries on. Leases are a few seconds.
"""

from __future__ import annotations

import errno
import json
import threading
from urllib.parse import urlparse

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from tests.flaky_proxy import FlakyProxy
from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
from tests.service_fixtures import insert_job, make_settings, migrate
from tests.stack import wait_for
from tuneq.db import db_now, make_engine, make_sessionmaker, transaction
from tuneq.jobs.lease import claim_job, fenced_update
from tuneq.jobs.models import Job, JobEvent
from worker.heartbeat import Heartbeat
from worker.history import History
from worker.journal import Journal, LeaseLapsed
from worker.outcomes import crash_class
from worker.retry import RetryPolicy, is_transient

TTL = 3.0
POLICY = RetryPolicy(attempts=5, base_seconds=0.1, cap_seconds=0.3)


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    url = fresh_postgres_database(require(postgres_url))
    migrate(make_settings(tmp_path_factory.mktemp("db"), database_url=url))
    yield url
    drop_postgres_database(url)


@pytest.fixture
def worlds(database):
    """(sessions straight to the database, the worker's sessions through the proxy, proxy)"""
    target = urlparse(database.replace("postgresql+psycopg", "postgresql"))
    proxy = FlakyProxy((target.hostname, target.port or 5432))
    proxied = database.replace(f"{target.hostname}:{target.port}", f"127.0.0.1:{proxy.port}")
    direct, through = make_engine(database), make_engine(proxied)
    yield make_sessionmaker(direct), make_sessionmaker(through), proxy
    through.dispose()
    direct.dispose()
    proxy.close()


def _claimed(direct, worker_sessions):
    job_id = insert_job(direct, max_attempts=3)
    with transaction(worker_sessions) as db:
        claim = claim_job(db, job_id=job_id, owner="w1", lease_ttl=TTL)
    assert claim is not None
    return claim


def _outage(proxy, seconds):
    """The database away from the worker for `seconds`, from now, in the background."""
    proxy.fail(10**6)
    threading.Timer(seconds, proxy.fail, args=(0,)).start()


def test_a_blip_shorter_than_the_lease_is_ridden_out(worlds):
    direct, through, proxy = worlds
    ttl = 6.0  # renewals every 2 s; the blip outlasts one and ends well within the lease
    job_id = insert_job(direct, max_attempts=3)
    with transaction(through) as db:
        claim = claim_job(db, job_id=job_id, owner="w1", lease_ttl=ttl)
    with Heartbeat(through, claim, lease_ttl=ttl) as heartbeat:
        _outage(proxy, 2.2)  # a restart: connections reset, then refused for a while
        journal = Journal(through, heartbeat, POLICY)
        # a write during the outage waits it out and goes through
        journal.write("a test write", lambda db: fenced_update(db, claim, progress={"step": 7}))
        # the heartbeat, which failed at least once meanwhile, renews again
        wait_for(lambda: _told(direct, job_id, "lease renewal failed"), timeout=4 * ttl,
                 what="the heartbeat to renew after the outage")  # fmt: skip
        assert not heartbeat.lost.is_set() and not heartbeat.should_stop()
    with direct() as db:
        job = db.get(Job, claim.job_id)
    assert job.progress == {"step": 7} and job.fence == claim.fence and job.attempt == 1
    wrote, renewed = (
        _told(direct, job_id, "the database was unreachable"),
        _told(direct, job_id, "lease renewal failed"),
    )
    assert len(wrote) == 1 and wrote[0].data["retries"] >= 1, wrote
    assert len(renewed) == 1 and renewed[0].data["code"] == "transient_fault"
    assert renewed[0].data["retries"] >= 1 and renewed[0].message.endswith("the job goes on")


def _told(sessions, job_id, start):
    with sessions() as db:
        events = db.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
    return [e for e in events if e.message.startswith(start)]


def test_an_outage_longer_than_the_lease_stops_the_worker_within_it(worlds):
    direct, through, proxy = worlds
    claim = _claimed(direct, through)
    with Heartbeat(through, claim, lease_ttl=TTL) as heartbeat:
        proxy.fail(10**6)  # partitioned for good
        journal = Journal(through, heartbeat, POLICY)
        with pytest.raises(LeaseLapsed):
            journal.write("a test write", lambda db: fenced_update(db, claim, progress={}))
        # the worker gave up before the lease the database granted lapsed (by the
        # database's clock): no other worker could have claimed the job yet
        with direct() as db:
            still_leased = db.scalar(select(Job.lease_expires_at > db_now())
                                     .where(Job.id == claim.job_id))  # fmt: skip
        assert heartbeat.should_stop() and heartbeat.lost.is_set()
    assert still_leased
    with direct() as db:
        job = db.get(Job, claim.job_id)
    assert job.progress is None and job.lease_owner == "w1"


def test_a_write_that_is_not_transient_is_raised_at_once(worlds):
    direct, through, _ = worlds
    claim = _claimed(direct, through)
    with Heartbeat(through, claim, lease_ttl=TTL) as heartbeat:
        journal = Journal(through, heartbeat, POLICY)
        orphan = JobEvent(job_id="job_nope", type="message", level="info", message="")
        tries = []
        with pytest.raises(IntegrityError):  # no such job: a constraint, not a blip
            journal.write("a bad write", lambda db: tries.append(db.add(orphan)))
        assert len(tries) == 1


def test_history_lines_are_written_after_the_commit_with_the_database_clock(worlds, tmp_path):
    direct, through, _ = worlds
    history = History(tmp_path / "history.jsonl")
    job_id = insert_job(direct, max_attempts=3)
    with transaction(through) as db:
        claim = claim_job(db, job_id=job_id, owner="w1", lease_ttl=TTL)
        history.note(db, "claim", claim, expires=claim.expires_at)
        assert not history.path.exists()  # not before the commit
    with pytest.raises(RuntimeError), transaction(through) as db:
        history.note(db, "checkpoint", claim, step=5)
        raise RuntimeError("rolled back")
    with transaction(through) as db:
        assert fenced_update(db, claim, latest_checkpoint_step=5)
        history.note(db, "checkpoint", claim, step=5)
    records = [json.loads(line) for line in history.path.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["claim", "checkpoint"]  # the rollback left none
    first, second = records
    assert first["fence"] == second["fence"] == claim.fence and first["job"] == job_id
    assert first["db_time"] < first["expires"] <= first["db_time"] + TTL
    assert second["db_time"] > first["db_time"] and second["step"] == 5


def test_faults_are_classed_by_cause():
    dropped = OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    assert crash_class(dropped) == ("infrastructure_unavailable", True)
    assert crash_class(OSError(errno.ENOSPC, "No space left on device")) == ("disk_full", True)
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert crash_class(oom) == ("out_of_memory", False)
    assert crash_class(MemoryError()) == ("out_of_memory", False)
    assert crash_class(KeyError("a bug")) == ("internal_error", True)
    assert crash_class(OSError(errno.EACCES, "Permission denied")) == ("internal_error", True)


def test_a_transaction_left_open_by_a_vanished_worker_does_not_hold_its_job(database):
    # A partition sends no reset: the server sees a worker's session idle in an open
    # transaction that holds the job's row lock, and a cancel (or the reaper) waits behind
    # it. The worker's engine has the server end such a session after a while.
    worker_engine = make_engine(database, idle_in_transaction_seconds=1.0)
    direct = make_sessionmaker(make_engine(database))
    job_id = insert_job(direct, max_attempts=3)
    vanished = worker_engine.connect()
    vanished.execute(update(Job).where(Job.id == job_id).values(pause_requested=True))
    # ... and the worker is gone, its transaction open. A cancel comes in:
    with transaction(direct) as db:
        db.execute(text("SET LOCAL lock_timeout = '30s'"))  # far longer than the timeout
        db.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    with direct() as db:
        job = db.get(Job, job_id)
    assert job.cancel_requested and not job.pause_requested  # the vanished write rolled back
    with pytest.raises(DBAPIError) as ended:  # the server ended the vanished session
        vanished.execute(select(1))
    assert is_transient(ended.value)  # a worker that was only slow retries its write
    worker_engine.dispose()

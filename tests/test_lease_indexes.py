"""The claim and the heartbeat at scale on the real PostgreSQL (migration 0006): the claim
reads a queue of thousands through the partial index on queued jobs, never a scan of the
jobs table, and a heartbeat's UPDATE is HOT (no index entry written).

Plans are read with EXPLAIN after ANALYZE, as autovacuum would leave the statistics; no
timing is asserted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, select, text

from bench import lease_sim
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.jobs.lease import Claim, reap_expired_leases, renew_lease
from tuneq.jobs.models import Job
from tuneq.quotas.fair_share import claim_next

QUEUED, TEAMS = 3000, 20


@pytest.fixture
def queue(postgres_settings) -> Iterator[tuple[Any, Any, list[str]]]:
    """QUEUED jobs of TEAMS teams, 40 of them claimed (running), the statistics gathered."""
    engine = make_engine(postgres_settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    jobs = lease_sim.top_up(sessions, lease_sim.add_teams(sessions, TEAMS), QUEUED)
    for n, job_id in enumerate(jobs[:40]):
        with transaction(sessions) as db:
            claim_next(db, job_id=job_id, owner=f"w{n}", lease_ttl=30, settings=postgres_settings)
    with engine.connect() as connection:
        connection.execute(text("ANALYZE jobs, outbox, teams"))
        connection.commit()
    yield sessions, postgres_settings, jobs
    engine.dispose()


def _statements(sessions, run) -> list[tuple[str, Any]]:
    """The SELECTs on jobs that run(db) sends, with their parameters; rolled back."""
    sent: list[tuple[str, Any]] = []
    engine = sessions.kw["bind"]

    def record(_conn, _cursor, statement, parameters, _context, _many) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")) and "jobs" in statement:
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with sessions() as db:
            run(db)
            db.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return sent


def _plans(sessions, statements: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    raw = sessions.kw["bind"].raw_connection()
    try:
        cursor = raw.cursor()
        plans = []
        for statement, parameters in statements:
            cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
            plan = cursor.fetchone()[0]
            plans.append(plan[0]["Plan"] if isinstance(plan, list) else json.loads(plan)[0]["Plan"])
        raw.rollback()
        return plans
    finally:
        raw.close()


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _seq_scans_of_jobs(plans: list[dict[str, Any]]) -> int:
    return sum(node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "jobs"
               for plan in plans for node in _nodes(plan))  # fmt: skip


def _reads_of(plans: list[dict[str, Any]], index: str) -> int:
    """The plans' nodes that read `index` (an index, index-only or bitmap index scan)."""
    return sum(node.get("Index Name") == index for plan in plans for node in _nodes(plan))


def test_the_claim_reads_the_queue_through_the_partial_index(queue) -> None:
    sessions, settings, jobs = queue

    def claim(db) -> None:
        assert claim_next(db, job_id=jobs[-1], owner="w", lease_ttl=30, settings=settings)

    plans = _plans(sessions, _statements(sessions, claim))

    assert len(plans) >= 4 and _seq_scans_of_jobs(plans) == 0
    # the teams waiting (a probe a team: one node, run again) and their oldest jobs (one
    # index scan a team, TEAMS in one UNION ALL)
    assert _reads_of(plans, "ix_jobs_queued") >= 1 + TEAMS
    assert not [node for plan in plans for node in _nodes(plan) if node["Node Type"] == "Sort"
                and node.get("Plan Rows", 0) > TEAMS * 20]  # fmt: skip


def test_the_reaper_reads_the_leased_jobs_through_their_partial_index(queue) -> None:
    sessions, _, _ = queue

    plans = _plans(sessions, _statements(sessions, reap_expired_leases))

    assert len(plans) == 1 and _seq_scans_of_jobs(plans) == 0
    assert _reads_of(plans, "ix_jobs_leased") == 1


def test_a_heartbeat_writes_no_index_entry(queue) -> None:
    """Each renewal's UPDATE is HOT. pg_stat_xact_user_tables counts this backend's updates
    not yet reported (this transaction's, and earlier ones' still pending): read before
    and after the renewal, in its transaction."""
    sessions, settings, jobs = queue
    with transaction(sessions) as db:
        claim = claim_next(db, job_id=jobs[-1], owner="w", lease_ttl=30, settings=settings)
    assert isinstance(claim, Claim)
    counted = text(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'jobs'"
    )
    for step in range(3):
        with transaction(sessions) as db:
            updates, hot = db.execute(counted).one()
            renewal = renew_lease(db, claim, lease_ttl=30, progress={"step": step})
            assert renewal.held
            assert tuple(db.execute(counted).one()) == (updates + 1, hot + 1)
    with sessions() as db:
        assert db.scalar(select(Job.progress).where(Job.id == claim.job_id)) == {"step": 2}

"""bench/lease_sim.py's simulation at tiny N on the real PostgreSQL: the invariants its
figures rest on (no timing is asserted).

Three simulated workers run each phase for two seconds with a 3 s lease (a beat a second),
every claim, renewal and end written to a history log (worker/history.py) that
tests/fault_history.py's checker reads: at most one live lease per job, no write under an
old fence, fences increasing, every claimed job ended.
"""

from __future__ import annotations

from collections import deque

import pytest
from sqlalchemy import select, text

from bench import lease_sim
from tests.fault_history import check_history, read_history
from tuneq.db import make_engine, make_sessionmaker
from tuneq.jobs.models import Job
from tuneq.jobs.states import JobState
from tuneq.quotas.fair_share import CANDIDATES, claim_next
from worker.history import History

WORKERS, SECONDS = 3, 2.0


@pytest.fixture
def bench(postgres_settings, tmp_path):
    """A migrated database with two teams' backlog, three connections and a history log."""
    settings = postgres_settings  # a lease of 3 s (tests/service_fixtures.py)
    groups = lease_sim.open_groups(settings.resolved_database_url, WORKERS)
    setup = groups[0].sessions
    broker = deque(lease_sim.top_up(setup, lease_sim.add_teams(setup, 2), 200))
    yield groups, settings, broker, History(tmp_path / "history.jsonl")
    lease_sim.close_groups(groups)


def _check(groups, history: History, tally) -> None:
    """Every claim got a distinct job, held by its worker under the claim's fence; the log
    is clean; the jobs all ended succeeded under the fence they were claimed with."""
    jobs = [claim.job_id for _, claim in tally.claims]
    assert len(jobs) > WORKERS  # each worker claimed more than once
    assert len(set(jobs)) == len(jobs)
    assert {worker for worker, _ in tally.claims} == {f"sim-{n}" for n in range(WORKERS)}
    assert tally.errors == tally.lost == 0
    with groups[0].sessions() as db:
        rows = {job.id: job for job in db.scalars(select(Job).where(Job.id.in_(jobs)))}
    for worker, claim in tally.claims:
        job = rows[claim.job_id]
        assert (job.state, job.fence, job.attempt) == (JobState.SUCCEEDED, claim.fence, 1)
        assert job.lease_owner == worker and job.lease_expires_at is None
    records = read_history(history.path)
    assert check_history(records, {job: rows[job].state for job in jobs}) == []
    assert sorted(r["job"] for r in records if r["kind"] == "claim") == sorted(jobs)


def test_claims_phase_every_claim_a_distinct_job_ended_under_its_fence(bench):
    groups, settings, broker, history = bench
    simulation = lease_sim.Simulation(groups, settings, broker, steady=False, history=history)
    tally = simulation.run(WORKERS, SECONDS)
    _check(groups, history, tally)
    assert tally.renewals == [] and len(tally.claim_ms) == len(tally.claims) + tally.empty


def test_steady_phase_beats_renew_under_the_claims_fence(bench):
    groups, settings, broker, history = bench
    simulation = lease_sim.Simulation(
        groups, settings, broker, steady=True, job_seconds=1.0, history=history
    )
    tally = simulation.run(WORKERS, SECONDS)
    _check(groups, history, tally)
    assert tally.start_s is not None and tally.beat_ms  # every worker held a job, then beat
    claimed = {(claim.job_id, claim.fence) for _, claim in tally.claims}
    assert tally.renewals and all(held for *_, held in tally.renewals)
    assert {(claim.job_id, claim.fence) for _, claim, _ in tally.renewals} <= claimed
    renewed = [r for r in read_history(history.path) if r["kind"] == "renew"]
    assert len(renewed) == len(tally.renewals)
    assert {(r["job"], r["fence"]) for r in renewed} <= claimed


def test_workers_claiming_at_once_take_different_jobs_without_waiting(postgres_settings):
    """More claims in flight at once than CANDIDATES: each takes the next free job at once
    (SKIP LOCKED), none waits for another's commit (lock_timeout turns a wait into an
    error), and none comes back empty while jobs wait."""
    engine = make_engine(postgres_settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    jobs = lease_sim.top_up(sessions, lease_sim.add_teams(sessions, 1), CANDIDATES + 5)
    opened, claimed = [], []
    try:
        for n in range(CANDIDATES + 2):  # each transaction left open: a claim in flight
            db = sessions()
            opened.append(db)
            db.execute(text("SET LOCAL lock_timeout = '3s'"))
            claim = claim_next(db, job_id=jobs[0], owner=f"w{n}", lease_ttl=30,
                               settings=postgres_settings)  # fmt: skip
            assert claim is not None, f"claim {n + 1} found nothing with jobs waiting"
            claimed.append(claim.job_id)
        for db in opened:
            db.commit()
        assert len(set(claimed)) == len(claimed)
        with sessions() as db:
            running = db.scalars(select(Job.id).where(Job.state == JobState.RUNNING)).all()
        assert sorted(running) == sorted(claimed)
    finally:
        for db in opened:
            db.close()
        engine.dispose()

"""The faults of issue 17, one function each, shared by tests/test_faults.py and
bench/faults.py. Each injects its fault into a running FaultStack, waits for the jobs it
hit to end, and returns a FaultRun: whether they ended as expected (the checks each
function names), with the history checker's verdict on every lease write.

Recovery is timed from the fault until each job it hit trained again or ended
(RecoveryClock): for a poison job (3) and a cancel (11), until it ended; where the fault
is in how the job is sent (7, 8), from its submission to its first step; from the upload
that met the outage (9); from the disk-full event (14); max_runtime (12) has none.
"""

from __future__ import annotations

import io
import random
import tarfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from tests.fault_runs import (
    ROWS,
    FaultRun,
    RecoveryClock,
    conclude,
    count_events,
    messages,
    spec,
)
from tests.fault_stack import DOWN, TERMINAL, FaultStack, Worker
from tests.service_fixtures import auth
from tests.stack import wait_for
from tuneq import faults
from tuneq.queue import make_celery, publish_run_job

SKEWED = [{"faults": {"clock_skew_seconds": 300.0}}, {"faults": {"clock_skew_seconds": -300.0}}]


def _until(check: Callable[[], Any], what: str, timeout: float = 120) -> bool:
    """Wait for `check`; False (not an error) when it never held: the run's checks say."""
    try:
        wait_for(check, timeout=timeout, interval=0.05, what=what)
        return True
    except AssertionError:
        return False


def _claims(fs: FaultStack, job_id: str) -> list[dict[str, Any]]:
    return [r for r in fs.history({job_id}) if r["kind"] == "claim"]


def _cancel(fs: FaultStack, job_id: str) -> str:
    return str(fs.api.post(f"/jobs/{job_id}/cancel", headers=auth(fs.key)).json()["status"])


def _stopped_by_itself(fs: FaultStack, worker: Worker, job_id: str) -> bool:
    return _until(lambda: f"lease of {job_id} not renewed" in fs.log(worker), "a lapsed lease")


def worker_killed(fs: FaultStack, rng: random.Random) -> FaultRun:
    """1. SIGKILL at a random step: the next attempt resumes from the last checkpoint."""
    fs.use_workers({}, {})
    job_id = fs.submit(spec(fs, 120, checkpoint_every=10))
    fs.wait_step(job_id, rng.randint(11, 60))
    clock = RecoveryClock(fs, [job_id], until="attempt")
    fs.kill(fs.owner(job_id))
    job = fs.settle([job_id])[job_id]
    checks = {"succeeded": job["status"] == "succeeded", "attempt 2": job["attempt"] == 2}
    return conclude(fs, 1, {job_id: job}, checks, clock.seconds(), steps_lost_at_most=10)


def redelivered_past_visibility(fs: FaultStack, rng: random.Random) -> FaultRun:
    """2. A job longer than the broker's visibility timeout: the copy the broker offers
    again is dropped at the claim; one attempt. (The job is long, 40,000 steps, and is
    cancelled once the copy was dropped: however fast the machine, it outlasts the
    timeout and the second worker's start.)"""
    visibility = {"broker_visibility_timeout_seconds": 3.0}
    (first,) = fs.use_workers(visibility)
    body = spec(fs, 4000)
    body["training_file"] = fs.upload(ROWS * 10)  # 400 rows, batch 1, 100 epochs
    job_id = fs.submit(body)
    fs.wait_step(job_id, 1)
    claimed = _claims(fs, job_id)[0]["db_time"]
    _until(lambda: fs.db_time() > claimed + 3.5, "the visibility timeout to pass")
    clock = RecoveryClock(fs, [job_id])
    second = fs.add_worker(visibility)  # its first poll offers the unacked message again
    dropped = _until(
        lambda: f"job {job_id}: not claimed" in fs.log(first) + fs.log(second),
        "the redelivered copy to be dropped",
        timeout=60,
    )
    was = fs.job(job_id)["status"]
    _cancel(fs, job_id)
    job = fs.settle([job_id])[job_id]
    started = [m for m in messages(fs, job_id) if m.startswith("attempt ")]
    checks = {
        "still running when the copy came": was == "running",
        "cancelled": job["status"] == "cancelled",
        "attempt 1": job["attempt"] == 1 and len(started) == 1,
        "the redelivered message dropped at the claim": dropped,
    }
    return conclude(fs, 2, {job_id: job}, checks, clock.seconds())


def poison_job(fs: FaultStack, rng: random.Random) -> FaultRun:
    """3. Poison jobs: one that kills its worker on every attempt fails `worker_lost`, one
    whose every attempt raises fails `internal_error`, each after exactly max_attempts,
    each attempt handed back with a backoff, and no claim after the end."""
    fs.use_workers({}, {}, {}, {})  # three to lose, one to be offered the job once more
    killer = fs.submit(spec(fs, 40, metadata={"fault": "exit", "fault_step": "2"}))
    raiser = fs.submit(spec(fs, 40, metadata={"fault": "raise", "fault_step": "3"}))
    clock = RecoveryClock(fs, [killer, raiser], until="end")
    jobs = fs.settle([killer, raiser])
    recover_s = clock.seconds()
    survivors = [w for w in fs.workers if w.alive()]
    celery = make_celery(fs.stack.settings)
    publish_run_job(celery, killer)  # a late copy of its message: dropped
    celery.close()
    dropped = _until(
        lambda: any(f"job {killer}: not claimed" in fs.log(w) for w in survivors),
        "the late message to be dropped",
    )
    handed_back = count_events(fs, raiser, "handed_back")
    checks = {
        "failed worker_lost": jobs[killer]["status"] == "failed"
        and (jobs[killer]["error"] or {}).get("code") == "worker_lost",
        "failed internal_error": jobs[raiser]["status"] == "failed"
        and (jobs[raiser]["error"] or {}).get("code") == "internal_error",
        "exactly 3 attempts": all(
            jobs[j]["attempt"] == 3 and len(_claims(fs, j)) == 3 for j in (killer, raiser)
        ),
        "handed back twice, then failed": handed_back == 2,
        "a message after the end dropped": dropped,
    }
    return conclude(fs, 3, jobs, checks, recover_s)


def broker_restarted_and_flushed(fs: FaultStack, rng: random.Random) -> FaultRun:
    """4. Redis restarted with a job running and two queued, then FLUSHALL with one
    running and two queued: every queued job is published again from the database."""
    fs.use_workers({})
    running = fs.submit(spec(fs, 100))
    fs.wait_step(running, 3)
    queued = [fs.submit(spec(fs, 30)) for _ in range(2)]
    restart = RecoveryClock(fs, [running, *queued])
    fs.redis.restart()
    fs.wait_step(queued[0], 3)
    late = fs.submit(spec(fs, 30))
    flush = RecoveryClock(fs, [queued[0], queued[1], late])
    fs.redis.flushall()
    jobs = fs.settle([running, *queued, late])
    times = [restart.seconds(), flush.seconds()]
    recover_s = None if None in times else max(t for t in times if t is not None)
    checks = {"every job succeeded": all(j["status"] == "succeeded" for j in jobs.values())}
    return conclude(fs, 4, jobs, checks, recover_s)


def worker_partitioned_from_db(fs: FaultStack, rng: random.Random) -> FaultRun:
    """5. The worker of a job cut off from the database for longer than its lease: it
    stops by itself, the job resumes on a fresh attempt elsewhere, and once the network
    heals nothing is written under the old fence."""
    fs.use_workers({}, {})
    job_id = fs.submit(spec(fs, 200, checkpoint_every=10))
    fs.wait_step(job_id, 12)
    owner = fs.owner(job_id)
    clock = RecoveryClock(fs, [job_id], until="attempt")
    owner.db_proxy.fail(DOWN)
    stopped = _stopped_by_itself(fs, owner, job_id)
    _until(lambda: len(_claims(fs, job_id)) > 1, "a second attempt")
    owner.db_proxy.fail(0)
    job = fs.settle([job_id])[job_id]
    checks = {
        "succeeded": job["status"] == "succeeded",
        "attempt 2": job["attempt"] == 2,
        "the cut-off worker stopped by itself": stopped,
    }
    return conclude(fs, 5, {job_id: job}, checks, clock.seconds(), steps_lost_at_most=10)


def database_restarted(fs: FaultStack, rng: random.Random) -> FaultRun:
    """6. The database gone for a second, less than the lease (6 s here): every
    connection of the worker reset, the renewals fail, then resume; no reap."""
    (worker,) = fs.use_workers({"lease_ttl_seconds": 6.0})
    job_id = fs.submit(spec(fs, 250))
    fs.wait_step(job_id, 5)
    clock = RecoveryClock(fs, [job_id])
    worker.db_proxy.fail(DOWN)
    time.sleep(1.0)  # the outage
    healed = fs.db_time()
    worker.db_proxy.fail(0)
    job = fs.settle([job_id])[job_id]
    history = fs.history({job_id})
    checks = {
        "succeeded": job["status"] == "succeeded",
        "attempt 1 (no reap)": job["attempt"] == 1,
        "renewals after the outage": any(
            r["kind"] == "renew" and r["db_time"] > healed for r in history
        ),
    }
    return conclude(fs, 6, {job_id: job}, checks, clock.seconds())


def api_killed_after_commit(fs: FaultStack, rng: random.Random) -> FaultRun:
    """7. The API process dies between the job's commit and its publish: the client sees
    a dropped connection, its retry (same Idempotency-Key) gets the job, beat's relay
    publishes it."""
    fs.use_workers({})
    api, url = fs.api_process({"exit_after_commit": True})
    body = spec(fs, 20)
    headers = auth(fs.key) | {"Idempotency-Key": str(uuid.uuid4())}
    since = time.monotonic()
    try:
        httpx.post(f"{url}/jobs", json=body, headers=headers, timeout=60)
        dropped = False
    except httpx.TransportError:
        dropped = True
    exited = api.wait(timeout=60) != 0
    retried = fs.api.post("/jobs", json=body, headers=headers)  # on an API that lives
    job_id = retried.json()["id"]
    clock = RecoveryClock(fs, [job_id], since=since)
    job = fs.settle([job_id])[job_id]
    checks = {
        "a dropped connection": dropped and exited,
        "the retry answered with the job": retried.status_code == 201,
        "succeeded on attempt 1": job["status"] == "succeeded" and job["attempt"] == 1,
    }
    return conclude(fs, 7, {job_id: job}, checks, clock.seconds())


def relay_publishes_twice(fs: FaultStack, rng: random.Random) -> FaultRun:
    """8. Every message published twice (the API's relay after the commit and beat's):
    the job runs once."""
    workers = fs.use_workers({}, {})
    fs.replace_beats(1, {"relay_twice": True})
    since = time.monotonic()
    faults.arm({"relay_twice": True})  # this process is the API that publishes the job
    try:
        job_id = fs.submit(spec(fs, 20))
    finally:
        faults.arm(None)
    clock = RecoveryClock(fs, [job_id], since=since)
    job = fs.settle([job_id])[job_id]
    dropped = _until(
        lambda: any(f"job {job_id}: not claimed" in fs.log(w) for w in workers),
        "the second message to be dropped",
    )
    fs.replace_beats(1)
    started = [m for m in messages(fs, job_id) if m.startswith("attempt ")]
    checks = {
        "succeeded": job["status"] == "succeeded",
        "one execution": job["attempt"] == 1
        and len(started) == 1
        and started[0].startswith("attempt 1 "),
        "the second message dropped": dropped,
    }
    return conclude(fs, 8, {job_id: job}, checks, clock.seconds())


def store_failing(fs: FaultStack, rng: random.Random) -> FaultRun:
    """9. The object store down during a checkpoint's upload and during the final one:
    retried, the job finishes; every checkpoint it lists downloads whole."""
    fs.use_workers({})
    job_id = fs.submit(spec(fs, 50, checkpoint_every=10))
    outages = []
    for at_step in (32, 45):  # before the checkpoint of step 40, before the adapter's upload
        fs.wait_step(job_id, at_step)
        seen = count_events(fs, job_id, "transient_fault")
        fs.store_proxy.fail(DOWN)
        _until(
            lambda seen=seen: (
                count_events(fs, job_id, "transient_fault") > seen
                or fs.job(job_id)["status"] in TERMINAL
            ),
            "an upload to meet the outage",
        )
        outages.append(RecoveryClock(fs, [job_id]))  # from the upload that met it
        fs.store_proxy.fail(0)
    job = fs.settle([job_id])[job_id]
    times = [clock.seconds() for clock in outages]
    checkpoints = fs.get(f"/jobs/{job_id}/checkpoints")["data"]
    checks = {
        "succeeded": job["status"] == "succeeded",
        "both uploads retried": count_events(fs, job_id, "transient_fault") >= 2,
        "every checkpoint downloads": bool(checkpoints)
        and all(_downloads(fs, job_id, f"checkpoint-{c['step']}.tar.gz") for c in checkpoints),
    }
    recover_s = None if None in times else max(t for t in times if t is not None)
    return conclude(fs, 9, {job_id: job}, checks, recover_s)


def _downloads(fs: FaultStack, job_id: str, name: str) -> bool:
    """The artifact comes back whole: a gzipped tar that lists its files."""
    response = fs.api.get(
        f"/jobs/{job_id}/artifacts/{name}", headers=auth(fs.key), follow_redirects=False
    )
    if response.status_code == 307:  # S3: a presigned URL
        response = httpx.get(response.headers["location"], timeout=60)
    if response.status_code != 200:
        return False
    try:
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
            return bool(archive.getnames())
    except (tarfile.TarError, EOFError):
        return False


def rolling_deploy(fs: FaultStack, rng: random.Random) -> FaultRun:
    """10. SIGTERM to each worker running a job, one after the other, with new workers up
    beside them: each job checkpoints, goes back to the queue and goes on elsewhere."""
    fs.use_workers({}, {}, {}, {})
    jobs = [fs.submit(spec(fs, 150)) for _ in range(2)]
    for job_id in jobs:
        fs.wait_step(job_id, 3)
    clock = RecoveryClock(fs, jobs, until="attempt")
    statuses = [fs.stop(fs.owner(job_id)) for job_id in jobs]
    ended = fs.settle(jobs)
    checks = {
        "both succeeded": all(j["status"] == "succeeded" for j in ended.values()),
        "each on attempt 2": all(j["attempt"] == 2 for j in ended.values()),
        "the workers exited cleanly": statuses == [0, 0],
        "each handed over": all(
            "worker shutting down; queued again" in messages(fs, j) for j in jobs
        ),
    }
    return conclude(fs, 10, ended, checks, clock.seconds(), steps_lost_at_most=0)


def cancel_everywhere(fs: FaultStack, rng: random.Random) -> FaultRun:
    """11. Cancel a running job and a queued one; then a running job whose worker is cut
    off from the database: the cancel lands, the worker stops within its lease, the job
    ends cancelled."""
    (worker,) = fs.use_workers({})
    running = fs.submit(spec(fs, 3000))
    fs.wait_step(running, 2)
    queued = fs.submit(spec(fs, 3000))
    clock = RecoveryClock(fs, [running, queued], until="end")
    answers = [_cancel(fs, queued), _cancel(fs, running)]
    jobs = fs.settle([running, queued])
    recover = [clock.seconds()]
    partitioned = fs.submit(spec(fs, 3000))
    fs.wait_step(partitioned, 2)
    clock = RecoveryClock(fs, [partitioned], until="end")
    worker.db_proxy.fail(DOWN)
    answers.append(_cancel(fs, partitioned))
    jobs |= fs.settle([partitioned])
    recover.append(clock.seconds())
    stopped = _stopped_by_itself(fs, worker, partitioned)
    worker.db_proxy.fail(0)
    checks = {
        "each cancelled": all(j["status"] == "cancelled" for j in jobs.values()),
        "cancelled at once, queued; cancelling, running": answers
        == ["cancelled", "cancelling", "cancelling"],
        "the queued one never ran": jobs[queued]["attempt"] == 0,
        "the cut-off worker stopped by itself": stopped,
    }
    recover_s = None if None in recover else max(t for t in recover if t is not None)
    return conclude(fs, 11, jobs, checks, recover_s)


def out_of_time(fs: FaultStack, rng: random.Random) -> FaultRun:
    """12. max_runtime_seconds reached: failed `max_runtime_exceeded`, with the adapter
    and every checkpoint kept."""
    fs.use_workers({})
    job_id = fs.submit(spec(fs, 3000, checkpoint_every=10, max_runtime_seconds=4))
    job = fs.settle([job_id])[job_id]
    checkpoints = fs.get(f"/jobs/{job_id}/checkpoints")["data"]
    names = {a["name"] for a in fs.get(f"/jobs/{job_id}/artifacts")["data"]}
    checks = {
        "failed max_runtime_exceeded": job["status"] == "failed"
        and (job["error"] or {}).get("code") == "max_runtime_exceeded",
        "the adapter kept": _downloads(fs, job_id, "adapter.tar.gz"),
        "every checkpoint kept": {f"checkpoint-{c['step']}.tar.gz" for c in checkpoints} <= names,
    }
    return conclude(fs, 12, {job_id: job}, checks, None)


def two_reapers_skewed_clocks(fs: FaultStack, rng: random.Random) -> FaultRun:
    """13. Two beats (two reapers) and workers whose clocks run five minutes fast and
    slow: no job reaped while its worker lives, and one new attempt after a SIGKILL."""
    fs.replace_beats(2)
    fs.use_workers(*SKEWED)
    jobs = [fs.submit(spec(fs, 150, checkpoint_every=10)) for _ in range(2)]
    victim, survivor = jobs
    fs.wait_step(victim, 12)
    clock = RecoveryClock(fs, [victim], until="attempt")
    fs.kill(fs.owner(victim))  # at once: a fast machine would finish the job first
    fs.add_worker()  # to take the job of the worker killed
    ended = fs.settle(jobs)
    fs.replace_beats(1)
    reaped = sum(m.startswith("worker lost on attempt") for m in messages(fs, victim))
    checks = {
        "both succeeded": all(j["status"] == "succeeded" for j in ended.values()),
        "the living worker's job not reaped": ended[survivor]["attempt"] == 1,
        "one new attempt for the killed one": ended[victim]["attempt"] == 2 and reaped == 1,
    }
    return conclude(fs, 13, ended, checks, clock.seconds(), steps_lost_at_most=10)


def disk_full(fs: FaultStack, rng: random.Random) -> FaultRun:
    """14. No space left on the device while writing the first checkpoint: the attempt
    ends cleanly with an event that says so, and the retry succeeds."""
    fs.use_workers({})
    metadata = {"fault": "disk_full", "fault_attempts": "1"}
    job_id = fs.submit(spec(fs, 20, checkpoint_every=5, metadata=metadata))
    _until(lambda: _disk_full_told(fs, job_id), "the disk-full event")
    clock = RecoveryClock(fs, [job_id], until="attempt")
    job = fs.settle([job_id])[job_id]
    told = _disk_full_told(fs, job_id)
    checks = {
        "succeeded on attempt 2": job["status"] == "succeeded" and job["attempt"] == 2,
        "an event that says the disk is full": bool(told),
    }
    return conclude(fs, 14, {job_id: job}, checks, clock.seconds())


def _disk_full_told(fs: FaultStack, job_id: str) -> bool:
    query = "SELECT count(*) FROM job_events WHERE job_id = :job AND message LIKE :text"
    return bool(fs.sql(query, job=job_id, text="%No space left on device%")[0][0])


Scenario = Callable[[FaultStack, random.Random], FaultRun]

SCENARIOS: dict[int, tuple[str, Scenario]] = {
    1: ("SIGKILL mid-training", worker_killed),
    2: ("past the visibility timeout", redelivered_past_visibility),
    3: ("poison job", poison_job),
    4: ("Redis restarted / flushed", broker_restarted_and_flushed),
    5: ("worker cut off from the DB", worker_partitioned_from_db),
    6: ("DB restarted (< lease)", database_restarted),
    7: ("API killed after commit", api_killed_after_commit),
    8: ("relay publishes twice", relay_publishes_twice),
    9: ("object store failing", store_failing),
    10: ("SIGTERM, rolling deploy", rolling_deploy),
    11: ("cancel (queued, running, cut off)", cancel_everywhere),
    12: ("max_runtime_seconds", out_of_time),
    13: ("two reapers, skewed clocks", two_reapers_skewed_clocks),
    14: ("disk full at a checkpoint", disk_full),
}

# The order the test and the bench run them in: each scenario keeps the workers the one
# before left running when they are of the kind it needs (a worker takes seconds to start).
RUN_ORDER = (12, 14, 9, 7, 4, 11, 8, 1, 5, 10, 3, 6, 2, 13)

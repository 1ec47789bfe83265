"""The simulated workers of bench/lease_scale.py: connection groups, the claim and the
heartbeat each worker runs (the worker's own code), and the broker's queue of messages.
bench/lease_scale.py's docstring says what is measured with them."""

from __future__ import annotations

import heapq
import itertools
import math
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.infra: PostgreSQL found or started as in tests

from tuneq.db import db_now, make_engine, make_sessionmaker, transaction  # noqa: E402
from tuneq.ids import new_id  # noqa: E402
from tuneq.jobs.lease import Claim, fenced_update  # noqa: E402
from tuneq.jobs.models import Job, OutboxMessage  # noqa: E402
from tuneq.jobs.states import JobState  # noqa: E402
from tuneq.quotas.fair_share import claim_next  # noqa: E402
from tuneq.settings import Settings  # noqa: E402
from tuneq.teams.models import Team  # noqa: E402
from worker.heartbeat import Heartbeat  # noqa: E402
from worker.history import History  # noqa: E402

GROUP = 10  # connections a make_engine pool holds without overflow: one worker host's
EMPTY_BACKOFF = 0.2  # seconds before a worker whose claim found nothing tries again
# A job as POST /jobs stores it: the spec as sent, the plan resolved, the estimate.
SPEC = {"model": "smollm2-135m-instruct", "task": "causal_lm", "training_file": "file-x",
        "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate": 0.0002}}  # fmt: skip
RESOLVED = {"method": SPEC["method"] | {"target_modules": "all-linear"}, "hyperparameters": {
    "n_epochs": 3, "batch_size": 8, "learning_rate": 0.0002, "warmup_ratio": 0.03,
    "max_seq_length": 2048, "gradient_accumulation_steps": 1, "weight_decay": 0.0,
    "lr_scheduler": "cosine", "eval_every_steps": 50, "checkpoint_every_steps": 100}}  # fmt: skip
ESTIMATE = {"examples": 5000, "trained_tokens": 2_400_000, "total_steps": 1875,
            "duration_seconds": 5400.0, "peak_memory_bytes": 6_000_000_000}  # fmt: skip
PROGRESS = {"step": 120, "total_steps": 1875, "epoch": 0.192, "percent": 6.4,
            "eta_seconds": 5012.3, "train_loss": 1.734, "tokens_per_second": 4412.7}  # fmt: skip


@dataclass
class Group:
    """One worker host's pool (tuneq.db.make_engine) and its threads' timer heap."""

    sessions: sessionmaker[Session]
    threads: int
    heap: list[tuple[float, int, Any, str]] = field(default_factory=list)
    cv: threading.Condition = field(default_factory=threading.Condition)
    order: itertools.count[int] = field(default_factory=itertools.count)

    def push(self, due: float, worker: Worker, action: str) -> None:
        with self.cv:
            heapq.heappush(self.heap, (due, next(self.order), worker, action))
            self.cv.notify()

    def next_due(self, stop: Callable[[], float]) -> tuple[float, Worker, str] | None:
        with self.cv:
            while (now := time.monotonic()) < stop():
                if self.heap and self.heap[0][0] <= now:
                    due, _, worker, action = heapq.heappop(self.heap)
                    return due, worker, action
                wake = min(self.heap[0][0] if self.heap else math.inf, stop(), now + 0.2)
                self.cv.wait(wake - now)
            return None


@dataclass
class Worker:
    name: str
    group: Group
    claim: Claim | None = None
    heartbeat: Heartbeat | None = None
    ends_at: float = math.inf


@dataclass
class Tally:
    """What one phase did; `claims` and `renewals` are what the invariants are checked on."""

    claims: list[tuple[str, Claim]] = field(default_factory=list)  # (worker, claim)
    renewals: list[tuple[str, Claim, bool]] = field(default_factory=list)  # (.., held)
    claim_ms: list[float] = field(default_factory=list)
    beat_ms: list[float] = field(default_factory=list)  # due → commit
    empty: int = 0
    errors: int = 0  # claims, beats or ends that could not reach the database
    lost: int = 0  # leases a renewal found lost
    start_s: float | None = None  # steady: until every worker held a job
    beat_updates: int = 0  # renewals whose UPDATE matched, the whole phase (its start too)
    hot: int = 0  # of the jobs table's HOT updates in the phase (lease_scale.py reads them)
    window_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)


def open_groups(url: str, connections: int) -> list[Group]:
    """`connections` connections as pools of at most GROUP, each served by as many threads."""
    sizes = [GROUP] * (connections // GROUP) + (
        [connections % GROUP] if connections % GROUP else []
    )
    return [Group(make_sessionmaker(make_engine(url)), size) for size in sizes]


def close_groups(groups: list[Group]) -> None:
    for group in groups:
        engine = group.sessions.kw["bind"]
        engine.dispose()


def add_teams(sessions: sessionmaker[Session], count: int) -> list[str]:
    with transaction(sessions) as db:
        teams = [Team(id=new_id("team"), name=f"team-{n}") for n in range(count)]
        db.add_all(teams)
    return [team.id for team in teams]


def top_up(sessions: sessionmaker[Session], teams: list[str], backlog: int) -> list[str]:
    """Queued jobs up to `backlog`, round the teams, each with its outbox row sent."""
    with sessions() as db:
        queued = db.scalar(select(func.count()).where(Job.state == JobState.QUEUED)) or 0
    ids = []
    for start in range(0, max(0, backlog - queued), 1000):
        with transaction(sessions) as db:
            jobs = [
                _job(teams[(start + n) % len(teams)])
                for n in range(min(1000, backlog - queued - start))
            ]
            db.add_all(jobs)
            db.flush()
            db.add_all(OutboxMessage(job_id=job.id, sent_at=db_now()) for job in jobs)
        ids += [job.id for job in jobs]
    return ids


def _job(team_id: str) -> Job:
    return Job(id=new_id("job"), team_id=team_id, state=JobState.QUEUED, model=SPEC["model"],
               queue="training", task="causal_lm", training_file_id=new_id("file"), spec=SPEC,
               resolved=RESOLVED, estimate=ESTIMATE, max_attempts=3)  # fmt: skip


def claim(sessions: sessionmaker[Session], settings: Settings, history: History, *,
          job_id: str, owner: str) -> Claim | None:  # fmt: skip
    """The worker's claim, as JobRunner._claim makes it (a message naming `job_id`)."""
    with transaction(sessions) as db:
        got = claim_next(db, job_id=job_id, owner=owner, lease_ttl=settings.lease_ttl_seconds,
                         settings=settings)  # fmt: skip
        if got is not None:
            history.note(db, "claim", got, expires=got.expires_at)
        return got


def end(sessions: sessionmaker[Session], history: History, job: Claim) -> bool:
    """The attempt's last write, as worker/outcomes.py's `succeed` records it (its artifacts,
    events and webhooks left out): succeeded under the fence."""
    with transaction(sessions) as db:
        done = fenced_update(db, job, state=JobState.SUCCEEDED, finished_at=db_now(),
                             lease_expires_at=None)  # fmt: skip
        if done:
            history.note(db, "end", job, state=JobState.SUCCEEDED.value)
        return done


@dataclass
class Simulation:
    """N workers' claims, beats and job ends for one phase, served by the groups' threads."""

    groups: list[Group]
    settings: Settings  # its lease_ttl_seconds / 3 is the heartbeat's interval
    broker: deque[str]  # the messages: one job id each
    steady: bool  # False: the claims phase
    job_seconds: float = 120.0  # a steady job's mean length
    history: History = field(default_factory=lambda: History(None))
    seed: int = 19

    def __post_init__(self) -> None:
        self.interval = self.settings.lease_ttl_seconds / 3  # worker/heartbeat.py's
        self.rng, self.tally, self.lock = random.Random(self.seed), Tally(), threading.Lock()
        self.any_job = self.broker[0] if self.broker else ""
        self.window = (math.inf, math.inf)  # (start, stop) by time.monotonic()
        self.holding = 0

    def run(
        self, workers: int, seconds: float, cpu: Callable[[], dict[str, float]] = dict
    ) -> Tally:
        crew = [Worker(f"sim-{n}", self.groups[n % len(self.groups)]) for n in range(workers)]
        self.workers, self.seconds, self.started = workers, seconds, time.monotonic()
        if not self.steady:
            self._open_window(self.started)
        for worker in crew:
            worker.group.push(self.started, worker, "claim")
        threads = [threading.Thread(target=self._serve, args=(group,)) for group in self.groups
                   for _ in range(group.threads)]  # fmt: skip
        before = cpu()
        for thread in threads:
            thread.start()
        if self.steady:  # the cold start: every worker claims its first job
            while self.window[0] == math.inf and time.monotonic() < self.started + 120:
                time.sleep(0.02)
            self._open_window(time.monotonic())  # (already open unless the start timed out)
            before = cpu()
        for thread in threads:
            thread.join()
        after = cpu()
        self.tally.window_s = time.monotonic() - self.window[0]
        self.tally.cpu = {k: (after[k] - before.get(k, 0.0)) / self.tally.window_s for k in after}
        self._release(crew)
        return self.tally

    def _open_window(self, now: float) -> None:
        with self.lock:
            if self.window[0] == math.inf:
                self.window = (now, now + self.seconds)

    def _serve(self, group: Group) -> None:
        actions = {"claim": self._claim, "beat": self._beat, "end": self._end}
        while (due_action := group.next_due(lambda: self.window[1])) is not None:
            due, worker, action = due_action
            try:
                actions[action](worker, due)
            except Exception:  # noqa: BLE001 - counted; the worker tries again
                with self.lock:
                    self.tally.errors += 1
                worker.group.push(time.monotonic() + EMPTY_BACKOFF, worker, action)

    def _counted(self, due: float) -> bool:
        return self.window[0] <= due < self.window[1]

    def _claim(self, worker: Worker, due: float) -> None:
        job_id = self._message()
        began = time.monotonic()
        got = claim(worker.group.sessions, self.settings, self.history, job_id=job_id,
                    owner=worker.name)  # fmt: skip
        done = time.monotonic()
        with self.lock:
            if got is not None:
                self.tally.claims.append((worker.name, got))
            if self._counted(due):
                self.tally.claim_ms.append((done - (began if not self.steady else due)) * 1e3)
                self.tally.empty += got is None
        if got is None:
            worker.group.push(done + EMPTY_BACKOFF, worker, "claim")
            return
        worker.claim = got
        if not self.steady:
            self._end(worker, done)
            return
        worker.heartbeat = Heartbeat(worker.group.sessions, got, lease_ttl=self.interval * 3,
                                     claimed_at=began, history=self.history)  # fmt: skip
        worker.heartbeat.progress = PROGRESS
        if self.window[0] == math.inf:  # the cold start: first beats spread over an interval
            worker.ends_at = math.inf
            self._schedule(worker, done + self.interval * self.rng.random())
            with self.lock:
                self.holding += 1
                everyone = self.holding == self.workers
                if everyone:
                    self.tally.start_s = done - self.started
            if everyone:
                self._open_window(done)
            return
        worker.ends_at = done + self.rng.expovariate(1 / self.job_seconds)
        self._schedule(worker, done + self.interval)

    def _beat(self, worker: Worker, due: float) -> None:
        assert worker.heartbeat is not None and worker.claim is not None
        if worker.ends_at == math.inf:  # its job's end is drawn once the window opens
            worker.ends_at = self.window[0] + self.rng.expovariate(1 / self.job_seconds)
        reached = worker.heartbeat.beat()
        done = time.monotonic()
        held = reached and not worker.heartbeat.lost.is_set()
        with self.lock:
            self.tally.renewals.append((worker.name, worker.claim, held))
            self.tally.beat_updates += held
            if self._counted(due):
                self.tally.beat_ms.append((done - due) * 1e3)
            self.tally.errors += not reached
            self.tally.lost += worker.heartbeat.lost.is_set()
        if worker.heartbeat.lost.is_set():
            worker.claim = worker.heartbeat = None
            worker.group.push(done, worker, "claim")
            return
        self._schedule(worker, done + (self.interval if reached else self.interval / 4))

    def _end(self, worker: Worker, due: float) -> None:
        assert worker.claim is not None
        end(worker.group.sessions, self.history, worker.claim)
        worker.claim = worker.heartbeat = None
        worker.group.push(time.monotonic(), worker, "claim")

    def _schedule(self, worker: Worker, beat_at: float) -> None:
        if worker.ends_at <= beat_at:
            worker.group.push(worker.ends_at, worker, "end")
        else:
            worker.group.push(beat_at, worker, "beat")

    def _message(self) -> str:
        """The next message's job (a message whose job another claim took claims the next)."""
        try:
            return self.broker.popleft()
        except IndexError:
            return self.any_job

    def _release(self, crew: list[Worker]) -> None:
        """Every job still held ends (not measured): the next phase starts clean."""
        for group in self.groups:
            held = [w.claim for w in crew if w.group is group and w.claim is not None]
            with ThreadPoolExecutor(group.threads) as pool:
                list(pool.map(lambda job, g=group: end(g.sessions, self.history, job), held))

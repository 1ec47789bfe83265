"""A deployment for the fault runs (issue 17): tests/test_faults.py and bench/faults.py.

A production stack (a fresh PostgreSQL database, S3 over HTTP from moto) with what the
faults need beyond tests/stack.py's:

- its own `redis-server` on a free port, so that a fault can restart or flush it without
  touching the Redis other tests share;
- a FlakyProxy in front of the S3 server for everyone, and one in front of PostgreSQL for
  each worker (the API and beat reach the database directly): any worker, the one that
  holds a job included, can be cut off from the database and healed;
- the history log (TUNEQ_HISTORY_LOG) the workers append their lease writes to, and the
  job hooks armed in every worker (TUNEQ_FAULTS, tuneq/faults.py).

The API runs in-process (its ASGI app); beat, the workers and an API that must die run
as `tuneq` subprocesses. Workers stay up from one scenario to the next: starting one
(torch, transformers, peft) is the slowest thing here; `use_workers` starts only those a
scenario lacks.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from tests.api_helpers import jsonl
from tests.conftest import build_tiny_llama, build_tiny_tokenizer
from tests.fault_history import read_history
from tests.flaky_proxy import FlakyProxy
from tests.infra import (
    _free_port,
    drop_postgres_database,
    fresh_postgres_database,
    postgres_url,
    require,
)
from tests.s3server import s3_client, start_moto_server
from tests.service_fixtures import auth
from tests.stack import Stack, all_events, wait_for

BUCKET = "tuneq-faults"
READY_TIMEOUT_S = 180.0
DOWN = 10**9  # FlakyProxy.fail(DOWN): every connection refused until healed
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# Short enough that a lost worker is noticed in seconds, long enough for two busy cores.
SETTINGS: dict[str, Any] = {
    "lease_ttl_seconds": 3.0,
    "reaper_interval_seconds": 0.5,
    "relay_interval_seconds": 0.5,
    "requeue_after_seconds": 3.0,
    "handback_delay_seconds": 0.5,
    "max_attempts": 3,
    "store_retry_base_seconds": 0.2,
    "store_retry_cap_seconds": 1.0,
    "estimated_tokens_per_second": 1000.0,
}


class RedisServer:
    """A redis-server of the fault stack's own, on one port across restarts."""

    def __init__(self, home: Path) -> None:
        self.port = _free_port()
        self.home = home
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        log = (self.home / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(self._answers, timeout=30, interval=0.05, what=f"redis-server on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # as a crash does: nothing saved (no persistence either)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def flushall(self) -> None:
        with redis.Redis.from_url(self.url) as client:
            client.flushall()

    def _answers(self) -> bool:
        try:
            with redis.Redis.from_url(self.url, socket_connect_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    db_proxy: FlakyProxy  # its own way to the database: fail() cuts this worker off
    kind: str  # its settings and hooks beyond the stack's, as JSON: "{}" for a plain one

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class FaultStack:
    stack: Stack
    redis: RedisServer
    store_proxy: FlakyProxy  # in front of the S3 server, for everyone
    api: Any  # the in-process API's client
    key: str
    engine: Engine  # the test's own way to the database, for what the API does not show
    beats: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    started: int = 0
    training_file: str = ""

    # -- workers -----------------------------------------------------------------------

    def use_workers(self, *kinds: dict[str, Any]) -> list[Worker]:
        """Exactly one worker of each kind, ready: those already up are kept, the others
        killed, the missing ones started. A kind is the worker's own settings (e.g.
        `{"lease_ttl_seconds": 6}`) and hooks (`{"faults": {...}}`); `{}` is a plain one."""
        wanted = [json.dumps(k, sort_keys=True) for k in kinds]
        kept: list[Worker] = []
        for worker in [w for w in self.workers if w.alive()]:
            if worker.kind in wanted:
                wanted.remove(worker.kind)
                kept.append(worker)
            else:
                self.kill(worker)
        started = [self._start_worker(json.loads(kind)) for kind in wanted]
        for worker in started:
            self._wait_ready(worker)
        return kept + started

    def add_worker(self, kind: dict[str, Any] | None = None) -> Worker:
        worker = self._start_worker(kind or {})
        self._wait_ready(worker)
        return worker

    def owner(self, job_id: str) -> Worker:
        """The worker whose claim of the job is the latest (by the history log)."""
        claims = [r for r in self.history({job_id}) if r["kind"] == "claim"]
        assert claims, f"job {job_id} was never claimed"
        pid = max(claims, key=lambda r: r["fence"])["pid"]
        return next(w for w in self.workers if w.pid == pid)

    def kill(self, worker: Worker, sig: int = signal.SIGKILL) -> None:
        self.stack.kill(worker.process, sig)

    def stop(self, worker: Worker) -> int:
        """SIGTERM, as a deploy does; the worker's exit status once it has gone."""
        worker.process.send_signal(signal.SIGTERM)
        return worker.process.wait(timeout=120)

    def _start_worker(self, kind: dict[str, Any]) -> Worker:
        self.started += 1
        name = f"worker-{self.started}"
        database = make_url(self.stack.overrides["database_url"])
        proxy = FlakyProxy((database.host or "127.0.0.1", database.port or 5432))
        settings = {k: v for k, v in kind.items() if k != "faults"}
        env = _env(kind.get("faults", {}), settings)
        env["TUNEQ_DATABASE_URL"] = database.set(port=proxy.port).render_as_string(False)
        process = self.stack.start("worker", name, env)
        worker = Worker(name, process, proxy, json.dumps(kind, sort_keys=True))
        self.workers.append(worker)  # every one ever started, its proxy closed at the end
        return worker

    def _wait_ready(self, worker: Worker) -> None:
        wait_for(
            lambda: " ready." in self.stack.log(worker.name) or not worker.alive(),
            timeout=READY_TIMEOUT_S,
            interval=0.1,
            what=f"{worker.name} to be ready",
        )
        assert worker.alive(), self.stack.log(worker.name)[-3000:]

    # -- beat and a subprocess API -----------------------------------------------------

    def replace_beats(self, count: int = 1, faults: dict[str, Any] | None = None) -> None:
        """Stop every beat, start `count` new ones with these hooks."""
        for process in self.beats:
            self.stack.kill(process, signal.SIGTERM)
        self.started += count
        self.beats = [
            self.stack.start("beat", f"beat-{self.started}-{n}", _env(faults or {}, {}))
            for n in range(count)
        ]

    def api_process(self, faults: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str]:
        """A `tuneq api` with these hooks on a free port, answering; and its URL."""
        self.started += 1
        port = _free_port()
        env = _env(faults, {}) | {"TUNEQ_PORT": str(port)}
        process = self.stack.start("api", f"api-{self.started}", env)
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            return process.poll() is not None

        wait_for(answers, timeout=READY_TIMEOUT_S, interval=0.1, what="the API subprocess")
        assert process.poll() is None, self.stack.log(f"api-{self.started}")[-3000:]
        return process, url

    # -- jobs --------------------------------------------------------------------------

    def upload(self, rows: list[dict[str, Any]]) -> str:
        response = self.api.post(
            "/files", headers=auth(self.key), files={"file": ("train.jsonl", jsonl(rows))}
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def submit(self, spec: dict[str, Any]) -> str:
        created = self.api.post("/jobs", headers=auth(self.key), json=spec)
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    def get(self, path: str) -> Any:
        response = self.api.get(path, headers=auth(self.key))
        assert response.status_code == 200, response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.get(f"/jobs/{job_id}"))

    def step(self, job_id: str) -> int:
        return int((self.job(job_id)["progress"] or {}).get("step", 0))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return all_events(self.api, self.key, job_id)

    def wait_step(self, job_id: str, step: int, timeout: float = 120) -> int:
        """Wait until the job has trained `step` steps, or ended, or `timeout` s passed; the
        step it is at. (The outcome, not this wait, tells whether the fault went right.)"""
        with contextlib.suppress(AssertionError):
            wait_for(
                lambda: self.step(job_id) >= step or self.job(job_id)["status"] in TERMINAL,
                timeout=timeout,
                interval=0.05,
                what=f"job {job_id} to train step {step}",
            )
        return self.step(job_id)

    def settle(self, job_ids: list[str], timeout: float = 180) -> dict[str, dict[str, Any]]:
        """Each job once it ended, or as it is after `timeout` s (then cancelled, so that
        it does not hold a worker in the next scenario)."""
        with contextlib.suppress(AssertionError):
            wait_for(
                lambda: all(self.job(j)["status"] in TERMINAL for j in job_ids),
                timeout=timeout,
                interval=0.2,
                what="the jobs to end",
            )
        jobs = {j: self.job(j) for j in job_ids}
        for job_id, job in jobs.items():
            if job["status"] not in TERMINAL:
                self.api.post(f"/jobs/{job_id}/cancel", headers=auth(self.key))
        return jobs

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(text(query), params).all())

    def db_time(self) -> float:
        """The database's clock, as the history log's db_time."""
        return float(self.sql("SELECT extract(epoch FROM clock_timestamp())")[0][0])

    def train_steps(self, job_id: str) -> list[tuple[int, int]]:
        """The job's (attempt, step) training-metric rows."""
        rows = self.sql(
            "SELECT attempt, step FROM job_metrics WHERE job_id = :job AND kind = 'train' "
            "ORDER BY id",
            job=job_id,
        )
        return [(int(a), int(s)) for a, s in rows]

    def history(self, job_ids: set[str]) -> list[dict[str, Any]]:
        path = Path(self.stack.overrides["history_log"])
        return [r for r in read_history(path) if r["job"] in job_ids]

    def log(self, worker: Worker) -> str:
        return self.stack.log(worker.name)

    def logs_tail(self, chars: int = 2000) -> str:
        """The end of the latest workers' logs, for a failure's message."""
        return "\n".join(f"--- {w.name}\n{self.log(w)[-chars:]}" for w in self.workers[-3:])


def _env(faults: dict[str, Any], settings: dict[str, Any]) -> dict[str, str]:
    env = {f"TUNEQ_{k.upper()}": str(v) for k, v in settings.items()}
    # one thread each: several processes share the cores, and a tiny model gains nothing
    # from more (oversubscribed, a job took minutes on a busy CI machine)
    return env | {"TUNEQ_FAULTS": json.dumps(faults), "OMP_NUM_THREADS": "1"}


@contextmanager
def fault_stack(home: Path, registry: Path, **overrides: Any) -> Iterator[FaultStack]:
    """A migrated fault stack under `home` with one beat running and no worker yet;
    everything stopped and dropped at exit."""
    home.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        database = fresh_postgres_database(require(postgres_url))
        cleanup.callback(drop_postgres_database, database)
        server, endpoint = start_moto_server()
        cleanup.callback(server.stop)
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        s3 = urlparse(endpoint)
        store_proxy = FlakyProxy((s3.hostname or "127.0.0.1", s3.port or 80))
        cleanup.callback(store_proxy.close)
        broker = RedisServer(home)
        broker.start()
        cleanup.callback(broker.stop)
        settings = SETTINGS | {
            "model_registry": str(registry),
            "database_url": database,
            "broker_url": broker.url,
            "store": "s3",
            "s3_endpoint_url": store_proxy.url,
            "s3_bucket": BUCKET,
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
            "history_log": str(home / "history.jsonl"),
        }
        stack = Stack("faults", home, settings | overrides)
        stack.setup()
        api = cleanup.enter_context(stack.client())
        engine = create_engine(database, pool_size=2)
        cleanup.callback(engine.dispose)
        faults = FaultStack(stack, broker, store_proxy, api, stack.team_key("faults"), engine)
        cleanup.callback(_stop_processes, faults)
        faults.replace_beats()
        yield faults


def _stop_processes(faults: FaultStack) -> None:
    for worker in faults.workers:
        if worker.alive():
            faults.kill(worker)
        worker.db_proxy.close()
    faults.stack.stop_all()


def tiny_registry(directory: Path) -> Path:
    """A registry file naming a tiny random Llama ("tiny-llama") built under `directory`,
    as tests/conftest.py's fixture does, for the bench."""
    tokenizer = build_tiny_tokenizer()
    model = directory / "tiny-llama"
    tokenizer.save_pretrained(model)
    build_tiny_llama(model, vocab_size=len(tokenizer))
    path = directory / "models.json"
    entry = {"source": {"type": "local", "path": str(model)}, "tasks": ["causal_lm"]}
    path.write_text(json.dumps({"models": {"tiny-llama": entry}}))
    return path

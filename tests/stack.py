"""A whole tuneq deployment for end-to-end tests: real processes on real services.

`Stack` holds the settings of one deployment (embedded: SQLite, filesystem broker, local
store; or production: PostgreSQL, Redis, S3 over HTTP) and starts `tuneq worker` and
`tuneq beat` as subprocesses with the same settings in their environment. The API runs
in-process through its ASGI app, with the very same settings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.infra import (
    drop_postgres_database,
    fresh_postgres_database,
    postgres_url,
    redis_url,
    require,
)
from tests.s3server import s3_client, start_moto_server
from tests.service_fixtures import api_client, make_settings, migrate, new_team_key
from tuneq.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    name: str
    home: Path
    overrides: dict[str, Any]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return make_settings(self.home, **self.overrides)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEQ_")}
        env["TUNEQ_CACHE_DIR"] = os.environ.get("TUNEQ_CACHE_DIR", str(self.home / "cache"))
        env["TUNEQ_HOME"] = str(self.home)
        for key, value in self.overrides.items():
            if value is not None:
                env[f"TUNEQ_{key.upper()}"] = str(value)
        env.setdefault("TUNEQ_LEASE_TTL_SECONDS", "3")
        env.setdefault("TUNEQ_HANDBACK_DELAY_SECONDS", "0.5")  # a lost job back in seconds
        env.setdefault("TUNEQ_RATE_LIMIT_PER_SECOND", "0")  # as make_settings: tests poll fast
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def setup(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        migrate(self.settings)

    def team_key(self, name: str) -> str:
        return new_team_key(self.settings, name)

    def client(self) -> Any:
        return api_client(self.settings)

    def start(
        self,
        command: str,
        log_name: str | None = None,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:
        """Start `tuneq <command> <args...>`; `env` adds to (or overrides) this process's
        environment only: one worker partitioned from the database, one beat relaying twice."""
        log = (self.home / f"{log_name or command}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "tuneq.cli", command, *args],
            cwd=REPO,
            env=self.env() | (env or {}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a kill takes its children too
        )
        self.processes.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                self.kill(process, signal.SIGTERM)
        self.processes.clear()

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def production_services(bucket: str) -> Iterator[dict[str, Any]]:
    """A fresh PostgreSQL database, Redis, and an S3 server (moto) with `bucket`: the
    settings overrides of a production deployment on them. The database and server go
    at exit."""
    database = fresh_postgres_database(require(postgres_url))
    server, endpoint = start_moto_server()
    try:
        s3_client(endpoint).create_bucket(Bucket=bucket)
        yield {
            "database_url": database,
            "broker_url": require(redis_url),
            "store": "s3",
            "s3_endpoint_url": endpoint,
            "s3_bucket": bucket,
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
        }
    finally:
        server.stop()
        drop_postgres_database(database)


@contextmanager
def running_stack(kind: str, home: Path, overrides: dict[str, Any]) -> Iterator[Stack]:
    """A deployment of `kind` ("embedded" or "production", on `production_services`) with
    beat running and no worker yet; everything stopped at exit."""
    with contextlib.ExitStack() as services:
        if kind == "production":
            overrides = overrides | services.enter_context(production_services(f"tuneq-{kind}"))
        deployment = Stack(kind, home, overrides)
        deployment.setup()
        deployment.start("beat")
        try:
            yield deployment
        finally:
            deployment.stop_all()


def trained_job(
    stack: Stack, api: Any, key: str, spec: dict[str, Any], timeout: float = 300
) -> Any:
    """Create the job and wait for it to succeed; the job as `GET /jobs/{id}` shows it."""
    headers = {"Authorization": f"Bearer {key}"}
    created = api.post("/jobs", headers=headers, json=spec)
    assert created.status_code == 201, created.text
    job = job_ended(api, key, created.json()["id"], timeout)
    assert job["status"] == "succeeded", (job, stack.log("worker")[-3000:])
    return job


def job_ended(api: Any, key: str, job_id: str, timeout: float = 300) -> Any:
    """Wait for the job to succeed or fail; the job as `GET /jobs/{id}` shows it then."""
    headers = {"Authorization": f"Bearer {key}"}
    return wait_for(
        lambda: (
            (job := api.get(f"/jobs/{job_id}", headers=headers).json())["status"]
            in {"succeeded", "failed"}
            and job
        ),
        timeout=timeout,
        what=f"job {job_id} to end",
    )


def all_events(api: Any, key: str, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job, oldest first, page by page."""
    events: list[dict[str, Any]] = []
    after, url, headers = 0, f"/jobs/{job_id}/events", {"Authorization": f"Bearer {key}"}
    while page := api.get(url, headers=headers, params={"after": after}).json()["data"]:
        events, after = events + page, page[-1]["id"]
    return events


def wait_for(
    check: Callable[[], Any], *, timeout: float, interval: float = 0.5, what: str = ""
) -> Any:
    """Poll until `check()` returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)

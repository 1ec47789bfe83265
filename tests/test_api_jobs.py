"""`/jobs` through the real app on SQLite and PostgreSQL: bad input refused with the field
named and nothing written, the dry run, create/read/list/filter/paginate, cancel/pause/resume,
Idempotency-Key (also under 10 concurrent requests to real `tuneq api` servers), `/models`,
and problem+json for unknown routes and methods.

No worker runs here: created jobs stay `queued`, as they would until one claims them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from tests.api_helpers import (
    TRAIN_ROWS,
    assert_problem,
    deployed_api,
    job_spec,
    jsonl,
    upload,
)
from tests.conftest import chat
from tests.service_fixtures import auth, new_team_key
from tuneq.models import IdempotencyKey, Job, JobEvent, OutboxMessage, Team
from tuneq.settings import Settings

REPO = Path(__file__).resolve().parent.parent
VALIDATION_ROWS = [
    chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40, 44)
]
MISSING_FILE = "file-" + "0" * 26


@dataclass
class Env:
    settings: Settings
    client: TestClient
    engine: Engine
    key_a: str
    key_b: str
    train_a: str
    validation_a: str
    train_b: str

    def count(self, model: Any, *where: Any) -> int:
        with self.engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(model).where(*where))

    def written(self) -> dict[str, int]:
        """Rows a job creation writes, and the idempotency keys a request may claim."""
        tables = (Job, OutboxMessage, JobEvent, IdempotencyKey)
        return {t.__tablename__: self.count(t) for t in tables}

    def create(self, key: str, spec: dict[str, Any], **headers: str) -> dict[str, Any]:
        response = self.client.post("/jobs", headers=auth(key) | headers, json=spec)
        assert response.status_code == 201, response.text
        return response.json()

    def new_team(self, name: str) -> tuple[str, str]:
        """A team of its own (a key, and a training file), for tests that read whole lists."""
        key = new_team_key(self.settings, name)
        return key, upload(self.client, key, TRAIN_ROWS)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, tmp_path_factory, tiny_registry_file) -> Iterator[Env]:
    home = tmp_path_factory.mktemp(f"jobs-{request.param}")
    with deployed_api(request.param, home, tiny_registry_file, "team-a", "team-b") as api:
        key_a, key_b = api.keys
        yield Env(
            settings=api.settings,
            client=api.client,
            engine=api.engine,
            key_a=key_a,
            key_b=key_b,
            train_a=upload(api.client, key_a, TRAIN_ROWS),
            validation_a=upload(api.client, key_a, VALIDATION_ROWS, "v.jsonl"),
            train_b=upload(api.client, key_b, TRAIN_ROWS),
        )


def with_hp(env: Env, **hyperparameters: Any) -> dict[str, Any]:
    spec = job_spec(env.train_a)
    return spec | {"hyperparameters": spec["hyperparameters"] | hyperparameters}


def without(spec: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != field}


# ------------------------------------------------------------------------------ bad input

# (body, the problem's code, the field it names; None where the body has no fields at all)
BadInput = tuple[Callable[[Env], Any], str, str | None]
BAD_INPUT: dict[str, BadInput] = {
    "body not JSON": (lambda env: b'{"model": "tiny-llama",', "invalid_request", None),
    "body a JSON array": (lambda env: b'[{"model": "tiny-llama"}]', "invalid_request", None),
    "unknown top-level field": (
        lambda env: job_spec(env.train_a) | {"colour": "blue"},
        "invalid_request",
        "colour",
    ),
    "unknown hyperparameter": (
        lambda env: with_hp(env, epochs=3),
        "invalid_hyperparameters",
        "hyperparameters.epochs",
    ),
    "learning_rate 5": (
        lambda env: with_hp(env, learning_rate=5),
        "invalid_hyperparameters",
        "hyperparameters.learning_rate",
    ),
    "batch_size 0": (
        lambda env: with_hp(env, batch_size=0),
        "invalid_hyperparameters",
        "hyperparameters.batch_size",
    ),
    "lora r 0": (
        lambda env: job_spec(env.train_a, method={"type": "lora", "r": 0, "alpha": 8}),
        "invalid_request",
        "method.r",
    ),
    "unknown method": (
        lambda env: job_spec(env.train_a, method={"type": "magic"}),
        "invalid_request",
        "method",
    ),
    "n_epochs a string": (
        lambda env: with_hp(env, n_epochs="three"),
        "invalid_hyperparameters",
        "hyperparameters.n_epochs",
    ),
    "unknown model": (
        lambda env: job_spec(env.train_a, model="gpt-17"),
        "model_not_found",
        "model",
    ),
    "no model": (lambda env: without(job_spec(env.train_a), "model"), "invalid_request", "model"),
    "no training_file": (
        lambda env: without(job_spec(env.train_a), "training_file"),
        "invalid_request",
        "training_file",
    ),
    "training_file that does not exist": (
        lambda env: job_spec(MISSING_FILE),
        "invalid_request",
        "training_file",
    ),
    "training_file of another team": (
        lambda env: job_spec(env.train_b),
        "invalid_request",
        "training_file",
    ),
    "validation_file of another team": (
        lambda env: job_spec(env.train_a, validation_file=env.train_b),
        "invalid_request",
        "validation_file",
    ),
    "max_seq_length past the model's context": (
        lambda env: with_hp(env, max_seq_length=4096),  # the tiny Llama has 512 positions
        "invalid_hyperparameters",
        "hyperparameters.max_seq_length",
    ),
    "batch_size larger than the examples": (
        lambda env: with_hp(env, batch_size=64),  # 10 examples, 9 after the validation split
        "invalid_hyperparameters",
        "hyperparameters.batch_size",
    ),
    "suffix with a slash": (
        lambda env: job_spec(env.train_a, suffix="../etc"),
        "invalid_request",
        "suffix",
    ),
    # metadata is capped as Stripe caps it: 50 keys, keys of 40 characters, values of 500
    "metadata with 51 keys": (
        lambda env: job_spec(env.train_a, metadata={f"k{i}": "v" for i in range(51)}),
        "invalid_request",
        "metadata",
    ),
    "metadata key of 41 characters": (
        lambda env: job_spec(env.train_a, metadata={"k" * 41: "v"}),
        "invalid_request",
        "metadata." + "k" * 41,
    ),
    "metadata value of 501 characters": (
        lambda env: job_spec(env.train_a, metadata={"team": "v" * 501}),
        "invalid_request",
        "metadata.team",
    ),
    "r as a string": (  # a spec's JSON types are what they say: "4" is no number
        lambda env: job_spec(env.train_a, method={"type": "lora", "r": "4"}),
        "invalid_request",
        "method.r",
    ),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["create", "dry_run"])
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_problem_naming_the_field_and_writes_nothing(env, case, dry_run):
    make_body, code, field = BAD_INPUT[case]
    body = make_body(env)
    before = env.written()

    response = env.client.post(
        "/jobs?dry_run=true" if dry_run else "/jobs",
        headers=auth(env.key_a) | {"Idempotency-Key": f"bad-{case}-{dry_run}"},
        **({"content": body} if isinstance(body, bytes) else {"json": body}),
    )

    problem = assert_problem(response, 422)
    assert problem["code"] == code
    if field is not None:
        named = {e.get("field") for e in problem.get("errors", [])} | {problem.get("param")}
        assert field in named, problem
    assert env.written() == before  # no job, no outbox row, no event, no key kept


def test_another_teams_file_is_refused_exactly_like_a_missing_one(env):
    theirs = env.client.post("/jobs", headers=auth(env.key_a), json=job_spec(env.train_b))
    missing = env.client.post("/jobs", headers=auth(env.key_a), json=job_spec(MISSING_FILE))

    got, never = assert_problem(theirs, 422), assert_problem(missing, 422)
    assert json.dumps(got).replace(env.train_b, "<id>") == json.dumps(never).replace(
        MISSING_FILE, "<id>"
    )


def test_a_bad_query_parameter_is_a_problem_naming_it(env):
    problem = assert_problem(env.client.get("/jobs?limit=0", headers=auth(env.key_a)), 422)

    assert problem["param"] == "limit"
    assert [e["field"] for e in problem["errors"]] == ["limit"]


# ------------------------------------------------------------------------------ dry run


# "auto" left for the worker: they depend on the device that runs the job, which the plan
# does not know (its first event says what it chose).
DEVICE_CHOICES = {"precision", "gradient_checkpointing", "base_precision"}


def _autos(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [a for k, v in value.items() if k not in DEVICE_CHOICES for a in _autos(v)]
    return ["auto"] if value == "auto" else []


def test_dry_run_estimates_and_resolves_without_creating_anything(env):
    spec = job_spec(env.train_a, validation_file=env.validation_a) | {
        "hyperparameters": {
            "n_epochs": "auto",
            "batch_size": "auto",
            "learning_rate": "auto",
            "max_seq_length": "auto",
        }
    }
    before = env.written()

    response = env.client.post("/jobs?dry_run=true", headers=auth(env.key_a), json=spec)

    assert response.status_code == 200, response.text
    body = response.json()
    estimate, hp = body["estimate"], body["hyperparameters"]
    assert estimate["n_train_examples"] == len(TRAIN_ROWS)  # the validation file is separate
    assert estimate["tokens_exact"] is True  # counted with the tiny Llama's own tokenizer
    assert estimate["trained_tokens"] > 0 and estimate["estimated_seconds"] > 0
    assert estimate["total_steps"] == hp["total_steps"] == hp["steps_per_epoch"] * hp["n_epochs"]
    # the duration by phase, from the settings' figures until a job of the model finished
    phases = estimate["seconds_by_phase"]
    assert set(phases) == {"load", "train", "eval", "checkpoint"}
    assert phases["eval"] > 0 and estimate["evaluations"] >= 2  # the base model and the final
    assert estimate["estimated_seconds"] == pytest.approx(sum(phases.values()), abs=0.3)
    assert estimate["basis"].startswith("default:")
    memory = estimate["memory"]  # peft_engine/memory.py; tests/test_memory_estimate.py
    assert memory["peak_bytes"] > memory["weights_bytes"] > memory["trained_state_bytes"] > 0
    assert _autos(body) == [], body
    assert isinstance(hp["learning_rate"], float) and 16 <= hp["max_seq_length"] <= 512
    assert env.written() == before


def test_dry_run_with_fixed_hyperparameters_counts_steps_from_them(env):
    response = env.client.post(
        "/jobs?dry_run=true",
        headers=auth(env.key_a),
        json=job_spec(env.train_a, validation_file=env.validation_a),
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["hyperparameters"]["batch_size"] == 4
    assert body["estimate"]["total_steps"] == 3 * 2  # ceil(10 / 4) steps × 2 epochs


def test_a_deleted_file_leaves_no_copy_on_the_api_host(env):
    """A dry run reads the file on the API host (its tokens counted), so the host keeps a
    copy (tuneq/files/cache.py); deleting the file removes it there too."""
    file_id = upload(env.client, env.key_a, TRAIN_ROWS, "gone.jsonl")
    planned = env.client.post("/jobs?dry_run=true", headers=auth(env.key_a), json=job_spec(file_id))
    assert planned.status_code == 200, planned.text
    files = env.settings.resolved_work_dir / "files"
    assert [p.name for p in files.glob(f"{file_id}*")] == [f"{file_id}.jsonl"]

    deleted = env.client.delete(f"/files/{file_id}", headers=auth(env.key_a))

    assert deleted.status_code == 200, deleted.text
    assert list(files.glob(f"{file_id}*")) == [] and not (files / ".locks" / file_id).exists()


# ------------------------------------------------------------------------------ create, read


def test_create_queues_the_job_with_exactly_one_outbox_row(env):
    jobs_before = env.count(Job)

    job = env.create(env.key_a, job_spec(env.train_a, suffix="bot", metadata={"team": "x"}))

    assert job["status"] == "queued" and job["id"].startswith("job-")
    assert job["training_file"] == env.train_a and job["suffix"] == "bot"
    assert job["metadata"] == {"team": "x"}
    assert job["hyperparameters"]["total_steps"] == job["estimate"]["total_steps"] > 0
    assert _autos(job) == []
    assert env.count(Job) == jobs_before + 1
    assert env.count(OutboxMessage, OutboxMessage.job_id == job["id"]) == 1
    read = env.client.get(f"/jobs/{job['id']}", headers=auth(env.key_a))
    assert read.status_code == 200
    assert read.json() == job


def test_list_is_newest_first_paginated_and_filtered(env):
    key, train = env.new_team(f"lister-{time.monotonic_ns()}")
    metadata = [{"team": "search"}, {"team": "ads"}, {"team": "search", "env": "prod"}]
    created = [env.create(key, job_spec(train, metadata=m))["id"] for m in metadata]
    newest_first = created[::-1]

    def ids(query: str) -> list[str]:
        response = env.client.get(f"/jobs{query}", headers=auth(key))
        assert response.status_code == 200, response.text
        return [j["id"] for j in response.json()["data"]]

    whole = env.client.get("/jobs", headers=auth(key)).json()
    assert whole["object"] == "list" and whole["has_more"] is False
    assert [j["id"] for j in whole["data"]] == newest_first

    pages, after = [], ""
    while True:
        page = env.client.get(f"/jobs?limit=1{after}", headers=auth(key)).json()
        pages.append([j["id"] for j in page["data"]])
        if not page["has_more"]:
            break
        after = f"&after={page['data'][-1]['id']}"
    assert pages == [[job_id] for job_id in newest_first]

    assert env.client.post(f"/jobs/{created[1]}/cancel", headers=auth(key)).status_code == 200
    assert ids("?status=queued") == [created[2], created[0]]
    assert ids("?status=cancelled") == [created[1]]
    assert ids("?model=tiny-llama") == newest_first
    assert ids("?model=smollm2-135m-instruct") == []
    assert ids("?metadata[team]=search") == [created[2], created[0]]
    assert ids("?metadata[team]=ads") == [created[1]]
    assert ids("?metadata[team]=search&metadata[env]=prod") == [created[2]]
    assert ids("?metadata[team]=nobody") == []
    assert ids("?metadata[team]=search&status=cancelled") == []


def test_the_metadata_filter_finds_any_valid_key(env):
    owner, train = env.new_team(f"meta-{time.monotonic_ns()}")
    job = env.create(owner, job_spec(train, metadata={"équipe": "x"}))

    response = env.client.get("/jobs", params={"metadata[équipe]": "x"}, headers=auth(owner))

    assert response.status_code == 200, response.text
    assert [j["id"] for j in response.json()["data"]] == [job["id"]]


@pytest.mark.parametrize("key", ['say "hi"', "a]b", "", "x" * 65])
def test_metadata_keys_that_could_not_be_filtered_are_refused(env, key):
    owner, train = env.new_team(f"meta-bad-{time.monotonic_ns()}")
    response = env.client.post(
        "/jobs", headers=auth(owner), json=job_spec(train, metadata={key: "x"})
    )
    problem = assert_problem(response, 422)
    assert problem["param"].startswith("metadata")


# ------------------------------------------------------------------------------ steering


def test_cancel_a_queued_job_at_once_and_again_is_a_conflict(env):
    job = env.create(env.key_a, job_spec(env.train_a))
    url = f"/jobs/{job['id']}"

    cancelled = env.client.post(f"{url}/cancel", headers=auth(env.key_a))

    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["cancel_requested"] is True
    assert cancelled.json()["finished_at"] is not None
    # The code refuses a second cancel of a finished job rather than repeating the answer.
    again = assert_problem(env.client.post(f"{url}/cancel", headers=auth(env.key_a)), 409)
    assert again["code"] == "conflict" and again["param"] == "job_id"
    assert env.client.get(url, headers=auth(env.key_a)).json()["status"] == "cancelled"
    for action in ("pause", "resume"):
        assert_problem(env.client.post(f"{url}/{action}", headers=auth(env.key_a)), 409)


def test_pause_and_resume_a_queued_job(env):
    job = env.create(env.key_a, job_spec(env.train_a))
    url, a = f"/jobs/{job['id']}", auth(env.key_a)

    refused = assert_problem(env.client.post(f"{url}/resume", headers=a), 409)
    assert refused["code"] == "conflict"

    paused = env.client.post(f"{url}/pause", headers=a)
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    again = env.client.post(f"{url}/pause", headers=a)  # already paused: the same answer
    assert again.status_code == 200 and again.json()["status"] == "paused"

    resumed = env.client.post(f"{url}/resume", headers=a)
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert env.count(OutboxMessage, OutboxMessage.job_id == job["id"]) == 2  # enqueued again

    assert_problem(env.client.post(f"{url}/resume", headers=a), 409)
    assert env.client.post(f"{url}/pause", headers=a).json()["status"] == "paused"
    cancelled = env.client.post(f"{url}/cancel", headers=a)  # a paused job cancels at once
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_steering_a_job_that_does_not_exist_is_a_404(env):
    for action in ("cancel", "pause", "resume"):
        response = env.client.post(f"/jobs/job-{'0' * 26}/{action}", headers=auth(env.key_a))
        assert assert_problem(response, 404)["param"] == "job_id"


# ------------------------------------------------------------------------------ idempotency


def test_same_key_and_body_replays_the_first_response(env):
    spec = job_spec(env.train_a, metadata={"run": "replay"})
    jobs_before = env.count(Job)

    first = env.create(env.key_a, spec, **{"Idempotency-Key": "replay-1"})
    # The same body with its keys in another order is the same request.
    reordered = dict(reversed(list(spec.items())))
    reordered["hyperparameters"] = dict(reversed(list(spec["hyperparameters"].items())))
    second = env.create(env.key_a, reordered, **{"Idempotency-Key": "replay-1"})

    assert second == first
    assert env.count(Job) == jobs_before + 1
    assert env.count(OutboxMessage, OutboxMessage.job_id == first["id"]) == 1


def test_same_key_with_another_body_is_refused(env):
    first = env.create(env.key_a, job_spec(env.train_a), **{"Idempotency-Key": "reuse-1"})
    jobs_before = env.count(Job)

    response = env.client.post(
        "/jobs",
        headers=auth(env.key_a) | {"Idempotency-Key": "reuse-1"},
        json=job_spec(env.train_a, suffix="other"),
    )

    problem = assert_problem(response, 422)
    assert problem["code"] == "idempotency_key_reused"
    assert problem["param"] == "Idempotency-Key"
    assert env.count(Job) == jobs_before
    assert env.client.get(f"/jobs/{first['id']}", headers=auth(env.key_a)).status_code == 200


def test_teams_use_the_same_key_independently(env):
    key = "shared-key-1"
    job_a = env.create(env.key_a, job_spec(env.train_a), **{"Idempotency-Key": key})
    job_b = env.create(env.key_b, job_spec(env.train_b), **{"Idempotency-Key": key})

    assert job_b["id"] != job_a["id"]
    assert job_b["training_file"] == env.train_b
    assert env.count(Job, Job.id.in_([job_a["id"], job_b["id"]])) == 2
    replay_a = env.create(env.key_a, job_spec(env.train_a), **{"Idempotency-Key": key})
    assert replay_a["id"] == job_a["id"]


def test_a_key_used_to_upload_a_file_cannot_create_a_job(env):
    a = auth(env.key_a) | {"Idempotency-Key": "cross-endpoint-1"}
    uploaded = env.client.post("/files", headers=a, files={"file": ("c.jsonl", jsonl(TRAIN_ROWS))})
    assert uploaded.status_code == 201, uploaded.text
    jobs_before = env.count(Job)

    response = env.client.post("/jobs", headers=a, json=job_spec(uploaded.json()["id"]))

    assert assert_problem(response, 422)["code"] == "idempotency_key_reused"
    assert env.count(Job) == jobs_before


def test_an_empty_or_overlong_key_is_refused(env):
    for bad in ("", "k" * 256):
        response = env.client.post(
            "/jobs",
            headers=auth(env.key_a) | {"Idempotency-Key": bad},
            json=job_spec(env.train_a),
        )
        assert assert_problem(response, 422)["param"] == "Idempotency-Key"


def test_a_replay_returns_the_stored_response_even_after_the_file_is_gone(env):
    a = auth(env.key_a)
    train = upload(env.client, env.key_a, TRAIN_ROWS, "gone.jsonl")
    spec = job_spec(train)
    first = env.create(env.key_a, spec, **{"Idempotency-Key": "gone-1"})
    assert env.client.post(f"/jobs/{first['id']}/cancel", headers=a).status_code == 200
    assert env.client.delete(f"/files/{train}", headers=a).status_code == 200

    replay = env.client.post("/jobs", headers=a | {"Idempotency-Key": "gone-1"}, json=spec)

    assert replay.status_code == 201, replay.text
    assert replay.json() == first


# ------------------------------------------------------------------------------ concurrency


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEQ_")}
    for name in ("home", "database_url", "model_registry", "lease_ttl_seconds"):
        value = getattr(settings, name)
        if value is not None:
            env[f"TUNEQ_{name.upper()}"] = str(value)
    return env | {"PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def api_servers(env) -> Iterator[list[str]]:
    """Two `tuneq api` processes on the test's database: requests really race on it."""
    started: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for port in (_free_port(), _free_port()):
            with (env.settings.home / f"api-{port}.log").open("ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "tuneq.cli", "api", "--port", str(port)],
                    cwd=REPO,
                    env=_server_env(env.settings),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started.append((process, f"http://127.0.0.1:{port}"))
        for process, url in started:
            _wait_healthy(process, url)
        yield [url for _, url in started]
    finally:
        for process, _ in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


def _wait_healthy(process: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"tuneq api exited with {process.returncode}"
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"tuneq api at {url} did not answer /healthz within 60 s")


def test_ten_concurrent_creates_with_one_key_make_one_job(env, api_servers):
    name = f"racer-{time.monotonic_ns()}"
    key, train = env.new_team(name)
    with env.engine.connect() as connection:
        team_id = connection.scalar(select(Team.id).where(Team.name == name))
    spec = job_spec(train, metadata={"run": "race"})
    headers = auth(key) | {"Idempotency-Key": "race-1"}
    start = threading.Barrier(10)
    responses: list[httpx.Response | BaseException] = [None] * 10  # type: ignore[list-item]

    def fire(i: int) -> None:
        try:
            with httpx.Client(base_url=api_servers[i % len(api_servers)], timeout=120) as http:
                start.wait()
                responses[i] = http.post("/jobs", headers=headers, json=spec)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            responses[i] = err

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)

    assert all(isinstance(r, httpx.Response) for r in responses), responses
    assert env.count(Job, Job.team_id == team_id) == 1
    (job_id,) = [j["id"] for j in env.client.get("/jobs", headers=auth(key)).json()["data"]]
    assert env.count(OutboxMessage, OutboxMessage.job_id == job_id) == 1
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}, [(r.status_code, r.text) for r in responses]
    for response in responses:
        if response.status_code == 201:
            assert response.json()["id"] == job_id
        else:
            assert assert_problem(response, 409)["code"] == "idempotency_key_in_use"
    # Once the first request has finished, a retry gets its stored response.
    retry = httpx.post(f"{api_servers[0]}/jobs", headers=headers, json=spec, timeout=60)
    assert retry.status_code == 201 and retry.json()["id"] == job_id


@contextmanager
def create_held_mid_way(env: Env, server: str, key: str, spec: dict[str, Any]) -> Iterator[Any]:
    """A real POST /jobs that has claimed its Idempotency-Key and waits to insert its job.

    A PostgreSQL table lock on `jobs` holds it there: the claim commits in its own
    transaction, then the job's INSERT waits for the lock. Yields a function that releases
    the lock and returns the held request's response.
    """
    if env.engine.dialect.name != "postgresql":
        pytest.skip("holding a request mid-way uses a PostgreSQL table lock")
    headers = auth(key) | {"Idempotency-Key": spec["suffix"]}
    outcome: list[httpx.Response | BaseException] = []

    def send() -> None:
        try:
            outcome.append(httpx.post(f"{server}/jobs", headers=headers, json=spec, timeout=120))
        except BaseException as err:  # noqa: BLE001 - reported by finish()
            outcome.append(err)

    with env.engine.connect() as lock:
        held = lock.begin()
        lock.exec_driver_sql("LOCK TABLE jobs IN EXCLUSIVE MODE")
        sender = threading.Thread(target=send)
        sender.start()

        def finish() -> httpx.Response:
            if held.is_active:
                held.rollback()
            sender.join(timeout=120)
            assert outcome and isinstance(outcome[0], httpx.Response), outcome
            return outcome[0]

        try:
            deadline = time.monotonic() + 60
            while not env.count(IdempotencyKey, IdempotencyKey.key == spec["suffix"]):
                assert time.monotonic() < deadline and sender.is_alive(), outcome
                time.sleep(0.05)
            time.sleep(0.5)  # past the claim's commit, into the INSERT that waits
            yield finish
        finally:
            finish()


def test_a_duplicate_while_the_first_create_is_in_flight_is_a_409(env, api_servers):
    key, train = env.new_team(f"inflight-{time.monotonic_ns()}")
    spec = job_spec(train, suffix=f"inflight-{time.monotonic_ns()}")
    headers = auth(key) | {"Idempotency-Key": spec["suffix"]}

    with create_held_mid_way(env, api_servers[0], key, spec) as finish:
        start = threading.Barrier(9)

        def duplicate(_: int) -> httpx.Response:
            start.wait()
            return httpx.post(f"{api_servers[1]}/jobs", headers=headers, json=spec, timeout=60)

        with ThreadPoolExecutor(9) as pool:
            duplicates = list(pool.map(duplicate, range(9)))
        first = finish()

    for response in duplicates:
        problem = assert_problem(response, 409)
        assert problem["code"] == "idempotency_key_in_use"
        assert problem["param"] == "Idempotency-Key"
    assert first.status_code == 201, first.text
    listed = env.client.get("/jobs", headers=auth(key)).json()["data"]
    assert [j["id"] for j in listed] == [first.json()["id"]]
    assert env.count(OutboxMessage, OutboxMessage.job_id == first.json()["id"]) == 1
    replay = httpx.post(f"{api_servers[1]}/jobs", headers=headers, json=spec, timeout=60)
    assert replay.status_code == 201 and replay.json() == first.json()


def test_a_create_waiting_on_the_database_does_not_stall_the_server(env, api_servers):
    key, train = env.new_team(f"stall-{time.monotonic_ns()}")
    spec = job_spec(train, suffix=f"stall-{time.monotonic_ns()}")

    with create_held_mid_way(env, api_servers[0], key, spec):
        try:
            health = httpx.get(f"{api_servers[0]}/healthz", timeout=5)
        except httpx.TimeoutException:
            health = None

    assert health is not None and health.status_code == 200


# ------------------------------------------------------------------------------ models, routing


def test_models_lists_the_registry_and_the_built_ins(env):
    response = env.client.get("/models", headers=auth(env.key_a))

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["has_more"] is False
    models = {m["id"]: m for m in body["data"]}
    assert {"tiny-llama", "smollm2-135m-instruct", "all-minilm-l6-v2"} <= set(models)
    tiny = models["tiny-llama"]
    assert tiny["tasks"] == ["causal_lm"] and "lora" in tiny["methods"]
    assert tiny["max_seq_length"] == 512 and tiny["available"] is True
    assert "lora" in models["smollm2-135m-instruct"]["methods"]
    assert set(models["all-minilm-l6-v2"]["tasks"]) == {
        "seq_classification",
        "token_classification",
    }
    for model in models.values():
        assert model["object"] == "model" and model["tasks"]
        assert isinstance(model["methods"], list)
    one = env.client.get("/models/tiny-llama", headers=auth(env.key_a))
    assert one.status_code == 200 and one.json() == tiny


def test_an_unknown_model_is_a_404_problem(env):
    response = env.client.get("/models/gpt-17", headers=auth(env.key_a))

    assert assert_problem(response, 404)["param"] == "model"


def test_an_unknown_route_is_a_404_problem(env):
    body = assert_problem(env.client.get("/no/such/route", headers=auth(env.key_a)), 404)

    assert body["code"] == "not_found"


def test_a_wrong_method_is_a_405_problem(env):
    response = env.client.delete("/jobs", headers=auth(env.key_a))

    assert assert_problem(response, 405)["code"] == "method_not_allowed"
    assert "allow" in response.headers


def test_a_405_allows_every_method_of_the_resource(env):
    response = env.client.delete("/jobs", headers=auth(env.key_a))

    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}

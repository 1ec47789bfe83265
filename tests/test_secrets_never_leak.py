"""Secrets never leak: a whole job on the production stack (a `tuneq api` process under
uvicorn, a `tuneq worker` and `tuneq beat` on PostgreSQL, Redis and S3 over HTTP), then
every line the three processes logged, and every answer the API gave but the presigned
URLs it was asked for, are searched for the API key (whole, after its `tq_`, and its
SHA-256) and for presigned signatures (`X-Amz-Signature` and the signature itself).

Trained on a tiny random model: seconds of training.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.api_helpers import TRAIN_ROWS, job_spec, jsonl
from tests.service_fixtures import auth
from tests.sse_helpers import api_server, free_port
from tests.stack import Stack, running_stack, wait_for
from tuneq.client import Client, RetryPolicy, TuneqAPIError
from tuneq.teams.service import hash_key

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SIGNATURE = "X-Amz-Signature"


@dataclass
class Seen:
    """What the API answered: bodies and headers to search, presigned URLs to keep apart."""

    answers: list[str] = field(default_factory=list)
    presigned: list[str] = field(default_factory=list)

    def record(self, response: httpx.Response) -> httpx.Response:
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items() if k != "location")
        self.answers.append(f"{response.request.method} {response.request.url}\n{headers}")
        if response.request.url.params.get("redirect") != "false":
            self.answers.append(response.text)  # a presigned URL's own answer is kept apart
        return response


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_registry_file) -> Iterator:
    overrides = {
        "model_registry": str(tiny_registry_file),
        "relay_interval_seconds": 1.0,  # the job published within a second
        "rate_limit_per_second": 20.0,  # on, as deployed (the test harness turns it off)
    }
    home = tmp_path_factory.mktemp("secrets")
    with running_stack("production", home, overrides) as deployment:
        yield deployment


def _run_a_job(client: httpx.Client, key: str, seen: Seen) -> str:
    """Upload, train, follow and download, as a user would; the job's id."""
    uploaded = seen.record(
        client.post("/files", headers=auth(key), files={"file": ("t.jsonl", jsonl(TRAIN_ROWS))})
    )
    assert uploaded.status_code == 201, uploaded.text
    spec = job_spec(uploaded.json()["id"], validation_split=0.2)
    spec["hyperparameters"] |= {"checkpoint_every_steps": 2, "eval_every_steps": 2}
    created = seen.record(client.post("/jobs", headers=auth(key), json=spec))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    def ended() -> dict | None:
        job = seen.record(client.get(f"/jobs/{job_id}", headers=auth(key))).json()
        return job if job["status"] in {"succeeded", "failed", "cancelled"} else None

    job = wait_for(ended, timeout=300, interval=1.0, what=f"job {job_id} to end")
    assert job["status"] == "succeeded", job
    for path in ("events", "metrics", "checkpoints", "artifacts", "events/stream"):
        assert seen.record(client.get(f"/jobs/{job_id}/{path}", headers=auth(key))).is_success
    facade = f"/openai/v1/fine_tuning/jobs/{job_id}"
    for path in (facade, f"{facade}/events", f"{facade}/checkpoints"):
        assert seen.record(client.get(path, headers=auth(key))).status_code == 200
    return job_id


def _download(client: httpx.Client, key: str, path: str, seen: Seen) -> None:
    """Both ways a presigned URL is handed out, each fetched as a client would."""
    redirect = seen.record(client.get(path, headers=auth(key), follow_redirects=False))
    assert redirect.status_code == 307
    as_json = seen.record(client.get(path, params={"redirect": "false"}, headers=auth(key)))
    seen.presigned += [redirect.headers["location"], as_json.json()["url"]]
    for url in seen.presigned[-2:]:
        assert httpx.get(url).status_code == 200  # a real, working signature


def _refusals(client: httpx.Client, key: str, job_id: str, seen: Seen) -> str:
    """The errors a user meets, with the key and near misses of it; the wrong key sent."""
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    for headers in (auth(wrong), {"Authorization": key}, {}):
        assert seen.record(client.get(f"/jobs/{job_id}", headers=headers)).status_code == 401
    facade = seen.record(client.get("/openai/v1/files", headers=auth(wrong)))
    assert facade.status_code == 401
    assert seen.record(client.get("/jobs/job-nope", headers=auth(key))).status_code == 404
    bad = seen.record(client.post("/jobs", headers=auth(key), json={"model": "nope"}))
    assert bad.status_code == 422
    return wrong


def _misdirected_download(stack: Stack, key: str, file_id: str, target: Path) -> str:
    """What the SDK says when the store's public address is wrong (the presigned URL points
    where the client cannot connect): its error, as `tuneq files download` prints it."""
    elsewhere = {"s3_public_endpoint_url": f"http://127.0.0.1:{free_port()}"}
    misdirected = Stack(stack.name, stack.home, stack.overrides | elsewhere)
    with (
        api_server(misdirected, "api-misdirected") as server,
        Client(server.url, key, retry=RetryPolicy(max_retries=0)) as client,
        pytest.raises(TuneqAPIError) as failed,
    ):
        client.files.download(file_id, target)
    assert failed.value.code == "connection_error"
    return str(failed.value)


def test_no_key_or_signature_in_logs_events_or_answers(stack, tmp_path):
    key = stack.team_key("secretive")
    worker = stack.start("worker")
    seen = Seen()
    with api_server(stack) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        job_id = _run_a_job(client, key, seen)
        adapter = f"/jobs/{job_id}/artifacts/adapter.tar.gz"
        _download(client, key, adapter, seen)
        file_id = _training_file(client, key, job_id)
        _download(client, key, f"/files/{file_id}/content", seen)
        wrong = _refusals(client, key, job_id, seen)
    seen.answers.append(_misdirected_download(stack, key, file_id, tmp_path / "t.jsonl"))
    stack.kill(worker, signal.SIGTERM)
    stack.stop_all()  # beat: every log complete

    logs = {path.name: path.read_text(errors="replace") for path in stack.home.glob("*.log")}
    # the capture is real: the access log saw the downloads, the worker trained the job
    assert f'"GET {adapter} HTTP/1.1" 307' in logs[server.log.name]
    assert job_id in logs["worker.log"] and "beat.log" in logs
    # and the needles are the right ones: the URLs handed out do carry signatures
    signatures = [parse_qs(urlsplit(url).query)[SIGNATURE][0] for url in seen.presigned]
    assert len(signatures) == 4 and all(len(s) == 64 for s in signatures)

    needles = {
        "the API key": key,
        "the API key's random part": key.removeprefix("tq_"),
        "the API key's SHA-256": hash_key(key),
        "a wrong key sent": wrong,
        "a presigned signature": SIGNATURE,
        **{f"signature {n}": s for n, s in enumerate(signatures)},
    }
    places = {**logs, **{f"answer {n}": text for n, text in enumerate(seen.answers)}}
    leaks = [
        f"{what} in {where}"
        for where, text in places.items()
        for what, needle in needles.items()
        if needle.lower() in text.lower()
    ]
    assert leaks == []


def _training_file(client: httpx.Client, key: str, job_id: str) -> str:
    return client.get(f"/jobs/{job_id}", headers=auth(key)).json()["training_file"]

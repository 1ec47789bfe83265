"""The Python SDK (tuneq.client) against the real API served over HTTP, and against test
peers on loopback for what the real API cannot be made to do on demand (fail with 429/503,
lose an answer, redirect a download elsewhere)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import httpx
import pytest

from tests.api_helpers import TRAIN_ROWS, job_spec, jsonl
from tests.client_servers import Peer, Seen, sdk_deployment, send
from tuneq.client import (
    Client,
    Estimate,
    Event,
    File,
    Job,
    Metrics,
    MissingSetting,
    Model,
    RetryPolicy,
    TuneqAPIError,
)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_registry_file):
    """The real app over HTTP on a migrated SQLite deployment, and two teams' keys."""
    home = tmp_path_factory.mktemp("sdk")
    with sdk_deployment(home, tiny_registry_file, "sdk", "other") as (url, keys):
        yield url, keys


@pytest.fixture
def client(deployment):
    url, (key, _) = deployment
    with Client(url, key) as client:
        yield client


class Sleeps(list):
    """A RetryPolicy's sleep that records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_files_models_and_jobs_come_back_typed(client, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(TRAIN_ROWS))
    uploaded = client.files.upload(train)
    assert isinstance(uploaded, File) and uploaded.filename == "train.jsonl"
    assert (uploaded.format, uploaded.examples) == ("chat", len(TRAIN_ROWS))
    assert uploaded.report["messages_by_role"] == {"assistant": 10, "user": 10}
    assert client.files.get(uploaded.id) == uploaded
    assert uploaded.id in [f.id for f in client.files.list(limit=100).data]
    copy = client.files.download(uploaded.id, tmp_path / "copy.jsonl")
    assert copy.read_bytes() == train.read_bytes()

    models = client.models.list()
    assert all(isinstance(m, Model) for m in models)
    tiny = next(m for m in models if m.id == "tiny-llama")
    assert tiny.tasks == ["causal_lm"] and "lora" in tiny.methods

    estimate = client.jobs.create(job_spec(uploaded.id), dry_run=True)
    assert isinstance(estimate, Estimate) and estimate.estimate["total_steps"] == 6
    job = client.jobs.create(job_spec(uploaded.id, suffix="typed"))
    assert isinstance(job, Job) and job.status == "queued" and job.suffix == "typed"
    assert not job.done and client.jobs.get(job.id).id == job.id
    assert [j.id for j in client.jobs.list(status="queued").data][0] == job.id

    cancelled = client.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.done
    events = client.jobs.events(job.id)
    assert all(isinstance(e, Event) for e in events.data) and not events.has_more
    assert events.data[-1].message == "cancelled before it ran"
    assert client.jobs.checkpoints(job.id) == [] and client.jobs.artifacts(job.id) == []
    assert client.jobs.metrics(job.id) == Metrics(raw={}, train=[], eval=[])


def test_a_bad_file_raises_with_its_line_numbers(client, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(TRAIN_ROWS[:2]) + b"not json\n" + b'{"messages": []}\n')
    with pytest.raises(TuneqAPIError) as raised:
        client.files.upload(bad)
    err = raised.value
    assert (err.status, err.code, err.param) == (422, "invalid_training_file", "file")
    assert [(e.line, e.field) for e in err.errors] == [(3, None), (4, "messages")]
    assert "not valid JSON" in err.errors[0].message


def test_another_teams_job_is_not_found(deployment, client, tmp_path):
    url, (_, other_key) = deployment
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(TRAIN_ROWS))
    job = client.jobs.create(job_spec(client.files.upload(train).id))
    with Client(url, other_key) as other, pytest.raises(TuneqAPIError) as raised:
        other.jobs.get(job.id)
    assert (raised.value.status, raised.value.code, raised.value.param) == (
        404,
        "not_found",
        "job_id",
    )
    client.jobs.cancel(job.id)


def test_url_and_key_come_from_the_environment(deployment, monkeypatch):
    url, (key, _) = deployment
    monkeypatch.delenv("TUNEQ_URL", raising=False)
    monkeypatch.delenv("TUNEQ_API_KEY", raising=False)
    with pytest.raises(MissingSetting, match="TUNEQ_URL and TUNEQ_API_KEY not set"):
        Client()
    monkeypatch.setenv("TUNEQ_URL", url)
    monkeypatch.setenv("TUNEQ_API_KEY", key)
    with Client() as client:
        assert "tiny-llama" in [m.id for m in client.models.list()]


def test_retries_honour_retry_after_and_reuse_the_idempotency_key():
    answers = iter(
        [
            (429, b"", {"Retry-After": "2"}),
            (503, b"", {"Retry-After": "1"}),
            (201, json.dumps({"id": "job-1", "status": "queued"}).encode(), {}),
        ]
    )

    def reply(handler, _: Seen) -> None:
        status, body, headers = next(answers)
        send(handler, status, body, headers=headers)

    sleeps = Sleeps()
    with Peer(reply).running() as peer, Client(peer.url, "k", retry=RetryPolicy(sleep=sleeps)) as c:
        job = c.jobs.create({"model": "m"})
    assert job.id == "job-1" and sleeps == [2.0, 1.0]
    keys = {seen.headers["idempotency-key"] for seen in peer.seen}
    assert len(peer.seen) == 3 and len(keys) == 1  # one key, made once for the call
    assert all(json.loads(seen.body) == {"model": "m"} for seen in peer.seen)


def test_server_errors_back_off_then_give_up_with_the_problem():
    problem = {"type": "t", "title": "Unavailable", "status": 500, "detail": "db down", "code": "x"}

    def reply(handler, _: Seen) -> None:
        send(handler, 500, json.dumps(problem).encode(), content_type="application/problem+json")

    sleeps = Sleeps()
    policy = RetryPolicy(max_retries=3, backoff_seconds=0.5, max_backoff_seconds=1.0, sleep=sleeps)
    with Peer(reply).running() as peer, Client(peer.url, "k", retry=policy) as c:
        with pytest.raises(TuneqAPIError) as raised:
            c.jobs.get("job-1")
        assert (raised.value.status, raised.value.detail) == (500, "db down")
        assert len(peer.seen) == 4 and len(sleeps) == 3
        # exponential (0.5, 1, 2) capped at 1, each with jitter of up to half
        assert 0.25 <= sleeps[0] <= 0.5 and all(0.5 <= s <= 1.0 for s in sleeps[1:])

        # steering is no create: a 500 may mean it was done, so it is not sent again
        peer.seen.clear()
        with pytest.raises(TuneqAPIError):
            c.jobs.cancel("job-1")
        assert len(peer.seen) == 1


def test_a_server_that_is_not_there_is_a_connection_error():
    sleeps = Sleeps()
    with (
        socket_nobody_listens_on() as url,
        Client(url, "k", retry=RetryPolicy(max_retries=2, sleep=sleeps)) as c,
        pytest.raises(TuneqAPIError) as raised,
    ):
        c.files.list()
    assert raised.value.status is None and raised.value.code == "connection_error"
    assert len(sleeps) == 2


def socket_nobody_listens_on():
    import contextlib
    import socket

    @contextlib.contextmanager
    def closed_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening

    return closed_port()


def test_a_create_whose_answer_was_lost_is_retried_without_a_second_job(deployment, tmp_path):
    """A proxy forwards the first POST to the real API, then loses its answer (502): the
    retry carries the same Idempotency-Key, so the API answers with the job it made."""
    url, (key, _) = deployment
    with Client(url, key) as direct:
        train = tmp_path / "train.jsonl"
        train.write_bytes(jsonl(TRAIN_ROWS))
        spec = job_spec(direct.files.upload(train).id, suffix="lost-answer")
    lost = []

    def forward(handler, seen: Seen) -> None:
        headers = {k: v for k, v in seen.headers.items() if k not in ("host", "content-length")}
        answer = httpx.request(seen.method, url + seen.path, headers=headers, content=seen.body)
        if seen.method == "POST" and not lost:
            lost.append(answer.json()["id"])
            send(handler, 502, b"bad gateway", content_type="text/plain")
            return
        send(handler, answer.status_code, answer.content)

    sleeps = Sleeps()
    with (
        Peer(forward).running() as proxy,
        Client(proxy.url, key, retry=RetryPolicy(sleep=sleeps)) as client,
    ):
        job = client.jobs.create(spec)
        assert job.id == lost[0] and len(sleeps) == 1
        made = client.jobs.list(limit=100).data
        assert [j.id for j in made if j.suffix == "lost-answer"] == [job.id]
        client.jobs.cancel(job.id)


def _archive(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _artifact_server(archive: bytes, sha256: str, store_url: str):
    """An API that lists one adapter and redirects its download to `store_url`."""

    def reply(handler, seen: Seen) -> None:
        if seen.path == "/jobs/job-1/artifacts":
            listed = {"name": "adapter.tar.gz", "sha256": sha256, "bytes": len(archive)}
            send(handler, 200, json.dumps({"object": "list", "data": [listed]}).encode())
        else:
            send(handler, 307, headers={"Location": f"{store_url}/bucket/adapter?sig=x"})

    return Peer(reply)


def test_download_follows_the_redirect_without_the_key_and_checks_the_sha256(tmp_path):
    archive = _archive({"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights"})
    store = Peer(lambda handler, _: send(handler, 200, archive, content_type="application/gzip"))
    with store.running():
        good = _artifact_server(archive, hashlib.sha256(archive).hexdigest(), store.url)
        with good.running() as api, Client(api.url, "secret-key") as client:
            out = client.jobs.download("job-1", out=tmp_path / "adapter")
        assert sorted(p.name for p in out.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert api.seen[0].headers["authorization"] == "Bearer secret-key"
        assert store.seen[0].path == "/bucket/adapter?sig=x"
        assert "authorization" not in store.seen[0].headers  # the key stays with the API

        bad = _artifact_server(archive, "0" * 64, store.url)
        with (
            bad.running() as api,
            Client(api.url, "k") as client,
            pytest.raises(TuneqAPIError) as raised,
        ):
            client.jobs.download("job-1", out=tmp_path / "corrupt")
        assert raised.value.code == "checksum_mismatch"
        assert not (tmp_path / "corrupt").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no scratch left behind


def test_an_archive_that_escapes_its_directory_is_refused(tmp_path):
    archive = _archive({"../escaped.txt": b"nope"})
    store = Peer(lambda handler, _: send(handler, 200, archive))
    with store.running():
        api = _artifact_server(archive, hashlib.sha256(archive).hexdigest(), store.url)
        with api.running(), Client(api.url, "k") as client, pytest.raises(tarfile.FilterError):
            client.jobs.download("job-1", out=tmp_path / "out" / "adapter")
    assert not (tmp_path / "out" / "escaped.txt").exists()
    assert not (tmp_path / "out" / "adapter").exists()

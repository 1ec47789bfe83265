"""`/files` through the real app on SQLite and a local store: upload, read, page, delete,
the line-numbered rejections, and the Idempotency-Key."""

from __future__ import annotations

import hashlib
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
from tests.s3server import s3_client, start_moto_server
from tests.service_fixtures import (
    api_client,
    asgi_client,
    auth,
    make_settings,
    migrate,
    new_team_key,
)
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.files.models import File
from tuneq.files.service import UPLOAD_METHOD_PATH
from tuneq.idempotency.service import claim_key, request_hash
from tuneq.jobs.models import Job
from tuneq.settings import Settings
from tuneq.teams.service import get_team_by_name

PROBLEM = "application/problem+json"


def _chat(user: str, assistant: str | None) -> dict[str, Any]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return {"messages": messages}


def _jsonl(*records: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


CHAT = _jsonl(
    _chat("What is 2+2?", "4"),
    _chat("Capital of France?", "Paris"),
    _chat("Say hi", "Hi!"),
)


class Service:
    """The app with a migrated database, and a key for each of two teams."""

    def __init__(self, settings: Settings, client: TestClient) -> None:
        self.settings = settings
        self.client = client
        self.key = new_team_key(settings, "search")
        self.other_key = new_team_key(settings, "ads")
        self.engine = make_engine(settings.resolved_database_url)
        self.sessions = make_sessionmaker(self.engine)

    def upload(
        self,
        data: bytes,
        *,
        filename: str = "train.jsonl",
        key: str | None = None,
        headers: dict[str, str] | None = None,
        **fields: str,
    ) -> Any:
        return self.client.post(
            "/files",
            headers=auth(key or self.key) | (headers or {}),
            files={"file": (filename, data, "application/jsonl")},
            data=fields,
        )

    def file_rows(self) -> int:
        with self.sessions() as db:
            return db.scalar(select(func.count()).select_from(File)) or 0

    def stored_objects(self) -> list[Path]:
        root = self.settings.resolved_store_dir / "files"
        return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []

    def temp_files(self) -> list[Path]:
        tmp = self.settings.home / "tmp"
        return list(tmp.iterdir()) if tmp.exists() else []


def _service(tmp_path: Path, **overrides: Any) -> Iterator[Service]:
    settings = make_settings(tmp_path, **overrides)
    migrate(settings)
    with api_client(settings) as client:
        service = Service(settings, client)
        yield service
        service.engine.dispose()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Service]:
    yield from _service(tmp_path)


@pytest.fixture
def small_api(tmp_path: Path) -> Iterator[Service]:
    yield from _service(tmp_path, max_line_bytes=200, max_upload_bytes=2000)


def assert_nothing_kept(api: Service) -> None:
    assert api.file_rows() == 0
    assert api.stored_objects() == []
    assert api.temp_files() == []


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    return response.json()


def test_upload_validates_and_reports(api: Service) -> None:
    response = api.upload(CHAT)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["bytes"] == len(CHAT)
    assert body["filename"] == "train.jsonl"
    assert body["purpose"] == "fine-tune"
    assert body["format"] == "chat"
    assert body["examples"] == 3
    assert body["status"] == "processed"
    assert isinstance(body["created_at"], int)
    assert body["report"]["lines"] == 3
    assert body["report"]["messages_by_role"] == {"assistant": 3, "system": 3, "user": 3}
    assert api.temp_files() == []


def test_read_back_one_list_and_content(api: Service) -> None:
    created = api.upload(CHAT).json()

    one = api.client.get(f"/files/{created['id']}", headers=auth(api.key))
    listed = api.client.get("/files", headers=auth(api.key))
    content = api.client.get(f"/files/{created['id']}/content", headers=auth(api.key))

    assert one.status_code == 200 and one.json() == created
    assert listed.json() == {"object": "list", "data": [created], "has_more": False}
    assert content.status_code == 200
    assert content.content == CHAT
    assert "train.jsonl" in content.headers["content-disposition"]


def test_list_pages_newest_first(api: Service) -> None:
    ids = [api.upload(CHAT, filename=f"{n}.jsonl").json()["id"] for n in range(3)]

    first = api.client.get("/files", params={"limit": 1}, headers=auth(api.key)).json()
    rest = api.client.get(
        "/files", params={"limit": 2, "after": first["data"][0]["id"]}, headers=auth(api.key)
    ).json()

    assert [f["id"] for f in first["data"]] == [ids[2]]
    assert first["has_more"] is True
    assert [f["id"] for f in rest["data"]] == [ids[1], ids[0]]
    assert rest["has_more"] is False


BAD_FILES = {
    "not json on line 3": (
        CHAT[: CHAT.index(b"\n", CHAT.index(b"\n") + 1) + 1] + b"{not json}\n",
        {"line": 3},
    ),
    "empty file": (b"", {"field": "file"}),
    "chat without an assistant turn": (
        _jsonl(_chat("hello", "hi"), _chat("anyone?", None)),
        {"line": 2, "field": "messages"},
    ),
    "mixed formats": (
        _jsonl(_chat("hello", "hi"), {"prompt": "2+2=", "completion": "4"}),
        {"line": 2},
    ),
    "a line over max_line_bytes": (
        _jsonl(_chat("hello", "hi"), _chat("x" * 300, "hi"), _chat("ok", "ok")),
        {"line": 2},
    ),
}


@pytest.mark.parametrize("data, where", BAD_FILES.values(), ids=list(BAD_FILES))
def test_invalid_file_is_refused_with_its_line(
    small_api: Service, data: bytes, where: dict[str, Any]
) -> None:
    response = small_api.upload(data)

    body = assert_problem(response, 422)
    assert body["code"] == "invalid_training_file"
    assert body["errors"][0].items() >= where.items()
    assert body["total_errors"] == 1
    assert_nothing_kept(small_api)


def test_every_problem_is_counted(api: Service) -> None:
    data = CHAT + b"[1]\n" * 30 + b'{"text": ""}\n'

    body = assert_problem(api.upload(data), 422)

    assert body["detail"] == "31 problems found"
    assert body["total_errors"] == 31
    assert [e["line"] for e in body["errors"]] == list(range(4, 24))  # the first 20
    assert_nothing_kept(api)


def test_problems_deep_in_a_large_file_keep_their_line_numbers(api: Service) -> None:
    many = _jsonl(*[_chat(f"question {n}", f"answer {n}") for n in range(12_000)])  # > 1 MiB
    assert len(many) > 1 << 20
    data = many + b"{oops\n" + _jsonl({"prompt": "2+2=", "completion": "4"}) + CHAT

    body = assert_problem(api.upload(data), 422)

    assert [(e["line"], e["message"][:13]) for e in body["errors"]] == [
        (12_001, "not valid JSO"),
        (12_002, "is in prompt_"),
    ]
    assert_nothing_kept(api)


def test_too_many_examples_is_refused_at_the_first_one_over(tmp_path: Path) -> None:
    for api in _service(tmp_path, max_examples=2):
        body = assert_problem(api.upload(CHAT), 422)

        assert body["errors"] == [
            {"message": "is past the limit of 2 examples per file", "line": 3}
        ]
        assert_nothing_kept(api)


def test_file_over_the_size_limit_is_refused(small_api: Service) -> None:
    data = _jsonl(*[{"text": f"example {n}"} for n in range(200)])
    assert len(data) > 2000

    body = assert_problem(small_api.upload(data), 413)

    assert body["code"] == "payload_too_large"
    assert_nothing_kept(small_api)


def test_file_over_the_size_limit_is_refused_without_content_length(small_api: Service) -> None:
    data = _jsonl(*[{"text": f"example {n}"} for n in range(200)])
    body, content_type = _multipart({"file": ("big.jsonl", data)})

    response = small_api.client.post(
        "/files",
        content=_chunks(body, 100),
        headers=auth(small_api.key) | {"content-type": content_type},
    )

    assert assert_problem(response, 413)["code"] == "payload_too_large"
    assert_nothing_kept(small_api)


def test_missing_file_field_is_named(api: Service) -> None:
    body, content_type = _multipart({"purpose": (None, b"fine-tune")})

    response = api.client.post(
        "/files", content=body, headers=auth(api.key) | {"content-type": content_type}
    )

    problem = assert_problem(response, 422)
    assert problem["errors"] == [{"message": "required: the dataset to upload", "field": "file"}]
    assert_nothing_kept(api)


def test_body_that_is_not_multipart_is_refused(api: Service) -> None:
    response = api.client.post("/files", headers=auth(api.key), json={"file": "train.jsonl"})

    assert assert_problem(response, 422)["param"] == "Content-Type"
    assert_nothing_kept(api)


def test_unknown_purpose_is_refused(api: Service) -> None:
    body = assert_problem(api.upload(CHAT, purpose="batch"), 422)

    assert body["errors"][0]["field"] == "purpose"
    assert_nothing_kept(api)


def test_unknown_purpose_after_the_file_is_refused(api: Service) -> None:
    body, content_type = _multipart({"file": ("a.jsonl", CHAT), "purpose": (None, b"batch")})

    response = api.client.post(
        "/files", content=body, headers=auth(api.key) | {"content-type": content_type}
    )

    assert assert_problem(response, 422)["errors"][0]["field"] == "purpose"
    assert_nothing_kept(api)


def test_truncated_body_is_refused(api: Service) -> None:
    body, content_type = _multipart({"file": ("train.jsonl", CHAT)})

    response = api.client.post(
        "/files",
        content=body[: len(body) - 10],
        headers=auth(api.key) | {"content-type": content_type},
    )

    assert_problem(response, 422)
    assert_nothing_kept(api)


def test_upload_is_read_while_it_arrives(api: Service) -> None:
    data = _jsonl(*[_chat(f"question {n}", f"answer {n}") for n in range(2000)])
    body, content_type = _multipart(
        {"file": ("stream.jsonl", data), "purpose": (None, b"fine-tune")}  # purpose comes last
    )
    on_disk_before_last_chunk: list[int] = []

    async def send_in_chunks() -> AsyncIterator[bytes]:
        chunks = list(_chunks(body, 4096))
        for chunk in chunks[:-1]:
            yield chunk
        # The body is not all sent yet, and most of the file reaches the upload's temporary
        # copy: the server reads the stream as it comes, it does not spool it. (It reads
        # ahead of its parsing thread, so give the thread a moment to catch up.)
        for _ in range(1000):
            if sum(p.stat().st_size for p in api.temp_files()) > len(data) // 2:
                break
            await anyio.sleep(0.01)
        on_disk_before_last_chunk.extend(p.stat().st_size for p in api.temp_files())
        yield chunks[-1]

    async def upload() -> httpx.Response:
        # httpx's ASGI transport hands the app one chunk per receive() (TestClient joins them).
        async with asgi_client(api.settings) as client:
            return await client.post(
                "/files",
                content=send_in_chunks(),
                headers=auth(api.key) | {"content-type": content_type},
            )

    response = anyio.run(upload)

    assert response.status_code == 201, response.text
    created = response.json()
    assert (created["examples"], created["bytes"]) == (2000, len(data))
    assert len(on_disk_before_last_chunk) == 1
    assert on_disk_before_last_chunk[0] > len(data) // 2
    content = api.client.get(f"/files/{created['id']}/content", headers=auth(api.key))
    assert content.content == data


def test_another_teams_file_is_not_found(api: Service) -> None:
    file_id = api.upload(CHAT).json()["id"]
    theirs = auth(api.other_key)

    assert assert_problem(api.client.get(f"/files/{file_id}", headers=theirs), 404)
    assert assert_problem(api.client.get(f"/files/{file_id}/content", headers=theirs), 404)
    assert assert_problem(api.client.delete(f"/files/{file_id}", headers=theirs), 404)
    assert api.client.get("/files", headers=theirs).json()["data"] == []
    assert api.client.get(f"/files/{file_id}", headers=auth(api.key)).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer tq_not-a-key"}])
def test_requests_without_a_valid_key_are_refused(api: Service, headers: dict[str, str]) -> None:
    responses = [
        api.client.post("/files", headers=headers, files={"file": ("a.jsonl", CHAT)}),
        api.client.get("/files", headers=headers),
        api.client.get("/files/file-x", headers=headers),
        api.client.get("/files/file-x/content", headers=headers),
        api.client.delete("/files/file-x", headers=headers),
    ]

    for response in responses:
        assert_problem(response, 401)
    assert api.file_rows() == 0


def test_delete_removes_row_and_object(api: Service) -> None:
    file_id = api.upload(CHAT).json()["id"]

    response = api.client.delete(f"/files/{file_id}", headers=auth(api.key))

    assert response.json() == {"id": file_id, "object": "file", "deleted": True}
    assert api.client.get(f"/files/{file_id}", headers=auth(api.key)).status_code == 404
    assert api.file_rows() == 0
    assert api.stored_objects() == []


@pytest.mark.parametrize("state, status", [("running", 409), ("succeeded", 200)])
def test_delete_waits_for_jobs_that_use_the_file(api: Service, state: str, status: int) -> None:
    file_id = api.upload(CHAT).json()["id"]
    with transaction(api.sessions) as db:
        team_id = db.get(File, file_id).team_id
        db.add(
            Job(
                id="job-1",
                team_id=team_id,
                state=state,
                model="tiny",
                queue="training",
                task="causal_lm",
                training_file_id=file_id,
                spec={},
                resolved={},
                estimate={},
                max_attempts=3,
            )
        )

    response = api.client.delete(f"/files/{file_id}", headers=auth(api.key))

    assert response.status_code == status, response.text
    assert api.file_rows() == (1 if status == 409 else 0)


def test_same_idempotency_key_and_body_gives_the_same_file(api: Service) -> None:
    key = {"Idempotency-Key": "upload-1"}

    first = api.upload(CHAT, headers=key)
    second = api.upload(CHAT, headers=key)

    assert first.status_code == second.status_code == 201
    assert second.json() == first.json()
    assert api.file_rows() == 1
    assert len(api.stored_objects()) == 1


def test_same_idempotency_key_with_another_body_is_refused(api: Service) -> None:
    key = {"Idempotency-Key": "upload-1"}
    api.upload(CHAT, headers=key)

    other_content = assert_problem(api.upload(CHAT + CHAT, headers=key), 422)
    other_name = assert_problem(api.upload(CHAT, filename="b.jsonl", headers=key), 422)

    assert other_content["code"] == other_name["code"] == "idempotency_key_reused"
    assert api.file_rows() == 1


def test_idempotency_key_is_free_again_after_a_failed_upload(api: Service) -> None:
    key = {"Idempotency-Key": "upload-1"}

    assert_problem(api.upload(CHAT, purpose="batch", headers=key), 422)
    retried = api.upload(CHAT, headers=key)

    assert retried.status_code == 201, retried.text
    assert api.file_rows() == 1


# Fails a transaction that inserted a file at its COMMIT, after the object went to the store.
REFUSE_AT_COMMIT = [
    """CREATE FUNCTION refuse_file() RETURNS trigger LANGUAGE plpgsql AS
       $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$""",
    """CREATE CONSTRAINT TRIGGER refuse_file_at_commit AFTER INSERT ON files
       DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_file()""",
]


def test_an_upload_whose_commit_fails_leaves_no_object(tmp_path: Path) -> None:
    url = fresh_postgres_database(require(postgres_url))
    try:
        settings = make_settings(tmp_path, database_url=url)
        migrate(settings)
        engine = make_engine(url)
        with engine.begin() as connection:
            for statement in REFUSE_AT_COMMIT:
                connection.exec_driver_sql(statement)
        engine.dispose()
        with api_client(settings) as client:
            api = Service(settings, client)
            response = api.upload(CHAT, headers={"Idempotency-Key": "upload-1"})
            assert response.status_code == 500
            assert_nothing_kept(api)
            api.engine.dispose()
    finally:
        drop_postgres_database(url)


def test_idempotency_key_in_use_is_a_conflict(api: Service) -> None:
    # Another request under this key read the same upload and has not finished yet.
    fingerprint = request_hash(
        UPLOAD_METHOD_PATH, hashlib.sha256(CHAT).hexdigest(), "train.jsonl", "fine-tune"
    )
    with api.sessions() as db:
        team_id = get_team_by_name(db=db, name="search").id
    claim_key(
        api.sessions,
        team_id=team_id,
        key="busy",
        method_path=UPLOAD_METHOD_PATH,
        fingerprint=fingerprint,
    )

    body = assert_problem(api.upload(CHAT, headers={"Idempotency-Key": "busy"}), 409)

    assert body["code"] == "idempotency_key_in_use"
    assert_nothing_kept(api)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server, endpoint_url = start_moto_server()
    yield endpoint_url
    server.stop()


def test_s3_content_is_a_presigned_redirect(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = f"files-{uuid.uuid4().hex[:12]}"
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    s3_settings = {
        "store": "s3",
        "s3_endpoint_url": s3_endpoint,
        "s3_bucket": bucket,
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
    }
    for api in _service(tmp_path, **s3_settings):
        assert_problem(api.upload(b"[1]\n"), 422)
        assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
        file_id = api.upload(CHAT).json()["id"]

        response = api.client.get(
            f"/files/{file_id}/content", headers=auth(api.key), follow_redirects=False
        )

        assert response.status_code == 307
        with urllib.request.urlopen(response.headers["location"]) as download:
            assert download.read() == CHAT
        # ?redirect=false: the URL as JSON, for a page that navigates to it (the dashboard)
        link = api.client.get(
            f"/files/{file_id}/content", params={"redirect": "false"}, headers=auth(api.key)
        )
        assert link.status_code == 200 and link.json()["object"] == "download"
        assert link.json()["filename"] == "train.jsonl"
        with urllib.request.urlopen(link.json()["url"]) as download:
            assert download.read() == CHAT
        api.client.delete(f"/files/{file_id}", headers=auth(api.key))
        assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def _multipart(parts: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body in the given part order, and its content type."""
    boundary = "tuneq-test-boundary-7d3f"
    body = b""
    for name, (filename, data) in parts.items():
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]

"""The API's speed features keep its behaviour (issue 7): the compiled chat-line check
accepts only what the engine's validator accepts, uploads read ahead of their parser give
the same reports and errors, a verified-key cache still refuses revoked and deleted keys
(within `api_key_cache_seconds`, in every process), and reads under many concurrent
clients all complete. Nothing here is timed; bench/api_load.py measures the speed."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import delete, update

from api.app import create_app
from api.uploads import READ_AHEAD_BYTES
from peft_engine.data.formats import DataFormat, parse_line, scan_lines
from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
from tests.service_fixtures import api_client, auth, make_settings, migrate, new_team_key
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.files import chat_lines
from tuneq.settings import Settings
from tuneq.teams.models import ApiKey, Team
from tuneq.teams.service import VerifiedKeys, hash_key


def _line(record: Any) -> bytes:
    return json.dumps(record).encode()


def _chat(*messages: dict[str, Any], **extra: Any) -> bytes:
    return _line({"messages": list(messages), **extra})


USER = {"role": "user", "content": "What is 2+2?"}
REPLY = {"role": "assistant", "content": "4"}

# Lines the compiled check must take itself: the everyday shapes of chat data.
TYPICAL = [
    _chat(USER, REPLY),
    _chat({"role": "system", "content": "Be brief."}, USER, REPLY),
    _chat(USER, REPLY, {"role": "user", "content": ""}, {**REPLY, "content": "Yes."}),
    _chat(USER, {**REPLY, "name": "bot", "tool_calls": []}, weight=3),
    _chat({**USER, "weight": 1}, {**REPLY, "weight": 0}),
    _chat({"role": "tool", "content": "{}"}, REPLY),
    _chat(USER, {**REPLY, "content": "équipe, 東京 ✓"}),
    _chat(USER, REPLY, prompt="ignored: 'messages' makes it chat"),
    b"  " + _chat(USER, REPLY) + b" \r",
]

# Lines at the edges of the rules: each must get the engine's answer, whoever gives it.
EDGES = [
    _chat(),
    _chat(USER),
    _chat({**REPLY, "weight": 0}),
    _chat({**USER, "weight": 0}, {**REPLY, "weight": 0}),
    _chat(USER, {**REPLY, "weight": 1.0}),
    _chat(USER, {**REPLY, "weight": 0.0}, {**USER, "weight": 1}),
    _chat(USER, {**REPLY, "weight": True}),
    _chat(USER, {**REPLY, "weight": 2}),
    _chat(USER, {**REPLY, "weight": None}),
    _chat({"content": "no role"}, REPLY),
    _chat({"role": None, "content": "x"}, REPLY),
    _chat({"role": "bot", "content": "x"}, REPLY),
    _chat({"role": ["user"], "content": "x"}, REPLY),
    _chat({"role": "user"}, REPLY),
    _chat({"role": "user", "content": None}, REPLY),
    _chat({"role": "user", "content": 4}, REPLY),
    _chat(USER, {**REPLY, "content": "   "}),
    _chat(USER, {**REPLY, "content": "\u00a0\u2003"}),  # Unicode spaces: blank to str.strip
    _chat(USER, {**REPLY, "content": ""}),
    _line({"messages": "hello"}),
    _line({"messages": {"role": "user"}}),
    _line({"messages": [USER, "not an object", REPLY]}),
    _line([{"messages": [USER, REPLY]}]),
    _line("a string"),
    _line({"prompt": "p", "completion": "c"}),
    _line({"text": "plain"}),
    b'{"messages": [{"role": "assistant", "content": "x", "role": "user"}]}',  # last key wins
    b'{"messages": [{"role": "user", "content": "x", "role": "assistant"}]}',
    b'{"messages": [{"role": "assistant", "content": "x"}], "messages": []}',
    b'{"messages": [], "messages": [{"role": "assistant", "content": "x"}]}',
    b'{"messages": [{"role": "assistant", "content": "x"}], "z": "\xff"}',  # bad UTF-8, skipped key
    b'{"messages": [{"role": "assistant", "content": "\xc3"}]}',
    b'{"messages": [{"role": "assistant", "content": "x", "\xfe": 1}]}',
    b'\xef\xbb\xbf{"messages": [{"role": "assistant", "content": "x"}]}',  # a byte order mark
    b'{"messages": [{"role": "assistant", "content": "x"}], "z": NaN}',
    b'{"messages": [{"role": "assistant", "content": "x", "weight": 1e400}]}',
    b'{"messages": [{"role": "assistant", "content": "\\ud800"}]}',  # a lone surrogate
    b'{"messages": [{"role": "assistant", "content": "a\tb"}]}',  # a raw control character
    b'{"messages": [{"role": "assistant", "content": "x"}]} {"messages": []}',
    b'{"messages": [{"role": "assistant", "content": "x"}]},',
    b'{"messages": [{"role": "assistant", "content": "x"}], "z": [[[[[[[[[[[[1]]]]]]]]]]]]}',
    b"",
    b"   ",
]


def _engine_answer(raw: bytes) -> tuple[tuple[str, ...], int] | None:
    """The engine's verdict on one line, as the compiled check reports a valid one."""
    try:
        example = parse_line(raw, 1)
    except Exception:  # noqa: BLE001 - the engine's line problems
        return None
    if example.format is not DataFormat.CHAT:
        return None
    messages = example.record["messages"]
    return tuple(m["role"] for m in messages), sum(len(m["content"]) for m in messages)


@pytest.mark.parametrize("raw", TYPICAL, ids=range(len(TYPICAL)))
def test_typical_chat_lines_take_the_compiled_check(raw: bytes) -> None:
    assert chat_lines.check(raw) == _engine_answer(raw) is not None


@pytest.mark.parametrize("raw", EDGES, ids=range(len(EDGES)))
def test_compiled_check_accepts_only_what_the_engine_accepts(raw: bytes) -> None:
    fast = chat_lines.check(raw)
    if fast is not None:
        assert fast == _engine_answer(raw)


def test_compiled_check_never_accepts_a_mangled_line_the_engine_refuses() -> None:
    rng = random.Random(7)
    alphabet = list(b'{}[]",: 0\\tnulrefasy\xff\xc3') + list(b"assistant")
    seeds = [*TYPICAL, *EDGES[:9]]
    for _ in range(3000):
        line = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(line) + 1)
            action = rng.random()
            if action < 0.4 and line:
                del line[min(where, len(line) - 1)]
            elif action < 0.8:
                line.insert(where, rng.choice(alphabet))
            else:
                del line[where:]
        fast = chat_lines.check(bytes(line))
        if fast is not None:
            assert fast == _engine_answer(bytes(line)), bytes(line)


# ----------------------------------------------------------------------------- uploads


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path)
    migrate(settings)
    return settings


def _engine_report(data: bytes) -> dict[str, Any]:
    """What an upload's report says, computed from the engine's own scan of the file."""
    report = scan_lines(data.split(b"\n"))
    assert not report.errors
    roles = Counter(m["role"] for e in report.examples for m in e.record["messages"])
    chars = max(sum(len(m["content"]) for m in e.record["messages"]) for e in report.examples)
    return {"examples": len(report.examples), "messages_by_role": dict(sorted(roles.items()))} | {
        "max_example_chars": chars
    }


def test_upload_report_is_the_engines_whichever_path_checked_each_line(
    sqlite_settings: Settings,
) -> None:
    # Compiled-check lines, lines only the engine takes (weight 1.0), blank lines.
    lines = [TYPICAL[i % len(TYPICAL)] for i in range(40)]
    lines[5] = _chat(USER, {**REPLY, "weight": 1.0})
    lines[17] = b""
    data = b"\n".join(lines) + b"\n"
    key = new_team_key(sqlite_settings, "search")
    with api_client(sqlite_settings) as client:
        response = client.post("/files", headers=auth(key), files={"file": ("t.jsonl", data)})

    assert response.status_code == 201, response.text
    body = response.json()
    expected = _engine_report(data)
    assert body["examples"] == expected["examples"] == 39
    assert body["report"]["messages_by_role"] == expected["messages_by_role"]
    assert body["report"]["max_example_chars"] == expected["max_example_chars"]
    assert body["report"]["lines"] == 40


def test_upload_errors_are_the_engines_words_and_lines(sqlite_settings: Settings) -> None:
    lines = [TYPICAL[0]] * 30
    for number, bad in ((3, EDGES[11]), (9, EDGES[16]), (10, EDGES[26]), (22, EDGES[30])):
        lines[number - 1] = bad
    lines[14] = _line({"prompt": "p", "completion": "c"})  # another format in a chat file
    data = b"\n".join(lines) + b"\n"
    key = new_team_key(sqlite_settings, "search")
    with api_client(sqlite_settings) as client:
        response = client.post("/files", headers=auth(key), files={"file": ("t.jsonl", data)})

    assert response.status_code == 422, response.text
    errors = [(e["line"], e["message"], e.get("field")) for e in response.json()["errors"]]
    engine = scan_lines(data.split(b"\n"))
    assert errors == [(e.line, e.message, e.field) for e in engine.errors]
    assert [line for line, _, _ in errors] == [3, 9, 10, 15, 22]


def test_upload_larger_than_the_read_ahead_arrives_whole(sqlite_settings: Settings) -> None:
    row = _chat({"role": "system", "content": "x" * 900}, USER, REPLY) + b"\n"
    data = row * (2 * READ_AHEAD_BYTES // len(row) + 1)
    boundary = "perf-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"'
            "\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    key = new_team_key(sqlite_settings, "search")

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    async def upload() -> httpx.Response:
        app = create_app(sqlite_settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tuneq") as client:
                return await client.post(
                    "/files",
                    content=pieces(),
                    headers=auth(key)
                    | {"content-type": f"multipart/form-data; boundary={boundary}"},
                )

    response = anyio.run(upload)

    assert response.status_code == 201, response.text
    created = response.json()
    assert (created["bytes"], created["examples"]) == (len(data), len(data) // len(row))
    stored = next((sqlite_settings.resolved_store_dir / "files").rglob(created["id"]))
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert not list((sqlite_settings.home / "tmp").iterdir())


# ----------------------------------------------------------------------------- API keys


class Clock:
    """The cache's clock, moved by the test instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def postgres_settings(tmp_path: Path) -> Iterator[Settings]:
    url = fresh_postgres_database(require(postgres_url))
    try:
        settings = make_settings(tmp_path, database_url=url)
        migrate(settings)
        yield settings
    finally:
        drop_postgres_database(url)


def _revise_keys(settings: Settings, statement: Any) -> None:
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            db.execute(statement)
    finally:
        engine.dispose()


def test_a_revoked_key_is_refused_once_each_process_cache_expires(
    postgres_settings: Settings,
) -> None:
    key = new_team_key(postgres_settings, "search")
    clock = Clock()
    uncached = postgres_settings.model_copy(update={"api_key_cache_seconds": 0.0})
    # Two API processes on one database: one trusting verified keys for 5 s, one not at all.
    with api_client(postgres_settings) as cached_api, api_client(uncached) as fresh_api:
        cached_api.app.state.verified_keys = VerifiedKeys(5.0, clock=clock)
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 200
        assert fresh_api.get("/jobs", headers=auth(key)).status_code == 200

        revoked = update(ApiKey).where(ApiKey.key_hash == hash_key(key))
        _revise_keys(postgres_settings, revoked.values(revoked_at=datetime.now(UTC)))

        assert fresh_api.get("/jobs", headers=auth(key)).status_code == 401
        clock.now += 4.9  # within the window the setting allows, the cached process trusts it
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 200
        clock.now += 0.2
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 401
        clock.now += 60  # and a refused key is not remembered as anything
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 401


def test_a_deleted_key_or_team_is_refused_after_the_cache_window(
    postgres_settings: Settings,
) -> None:
    search, ads = new_team_key(postgres_settings, "search"), new_team_key(postgres_settings, "ads")
    clock = Clock()
    with api_client(postgres_settings) as client:
        client.app.state.verified_keys = VerifiedKeys(5.0, clock=clock)
        for key in (search, ads):
            assert client.get("/jobs", headers=auth(key)).status_code == 200

        _revise_keys(postgres_settings, delete(ApiKey).where(ApiKey.key_hash == hash_key(search)))
        _revise_keys(postgres_settings, delete(Team).where(Team.name == "ads"))
        clock.now += 5.1

        for key in (search, ads):
            assert client.get("/jobs", headers=auth(key)).status_code == 401


def test_cached_keys_stay_bounded_and_answer_for_their_own_team(
    postgres_settings: Settings,
) -> None:
    keys = [new_team_key(postgres_settings, f"team-{n}") for n in range(5)]
    with api_client(postgres_settings) as client:
        client.app.state.verified_keys = VerifiedKeys(60.0, max_entries=2)
        for _ in range(2):
            for n, key in enumerate(keys):
                response = client.get("/jobs/job-missing", headers=auth(key))
                assert response.status_code == 404  # authenticated: the job is what is missing
                team = client.app.state.verified_keys.team_for(key)
                assert team is None or team.name == f"team-{n}"


# ----------------------------------------------------------------------------- reads


def test_fifty_concurrent_reads_on_sqlite_all_complete(sqlite_settings: Settings) -> None:
    # Sessions left open across the thread pool once starved SQLite's pool here (30 s, 500s).
    key = new_team_key(sqlite_settings, "search")
    statuses: list[int] = []

    async def read_many() -> None:
        app = create_app(sqlite_settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tuneq") as client:

                async def one(path: str) -> None:
                    statuses.append((await client.get(path, headers=auth(key))).status_code)

                async with anyio.create_task_group() as tasks:
                    for n in range(50):
                        tasks.start_soon(one, "/jobs?limit=20" if n % 2 else "/jobs/job-nope")

    anyio.run(read_many)

    assert sorted(statuses) == [200] * 25 + [404] * 25


def test_request_metrics_keep_their_route_and_status(sqlite_settings: Settings) -> None:
    key = new_team_key(sqlite_settings, "search")
    with api_client(sqlite_settings) as client:
        assert client.get("/jobs/job-nope", headers=auth(key)).status_code == 404
        assert client.get("/jobs", headers=auth(key)).status_code == 200
        metrics = client.get("/metrics").text

    assert 'route="/jobs/{job_id}",status="404"} 1.0' in metrics
    assert 'method="GET",route="/jobs",status="200"} 1.0' in metrics

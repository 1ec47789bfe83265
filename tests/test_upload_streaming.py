"""Uploads stream: the compiled check run over a chunk's lines at once
(`chat_lines.check_lines`) takes exactly the lines `check` takes one at a time, an upload's
report and errors do not depend on where its chunks break and match a plain line-by-line
pass through the engine's validator, and an upload larger than the API's read-ahead
arrives whole. Nothing here is timed; bench/api_load.py measures the speed."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from api.uploads import READ_AHEAD_BYTES
from peft_engine.data.formats import DataFormat, ScanReport
from peft_engine.errors import LineError
from tests.chat_line_helpers import engine_chat_counts
from tests.service_fixtures import asgi_client, auth, make_settings, new_team_key
from tuneq.errors import InvalidFile
from tuneq.files import chat_lines
from tuneq.files.ingest import ingest_upload
from tuneq.settings import Settings


def _line(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


def _chat(*messages: dict[str, Any], **extra: Any) -> bytes:
    return _line({"messages": list(messages), **extra})


SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2+2?"}
REPLY = {"role": "assistant", "content": "4"}

# Lines the compiled check takes.
VALID = [
    _chat(USER, REPLY),
    _chat(SYSTEM, USER, REPLY),
    _chat(SYSTEM, USER, {**REPLY, "content": "Four, " * 30}),
    _chat(USER, REPLY, {"role": "user", "content": ""}, {**REPLY, "content": "Yes."}),
    _chat({**USER, "weight": 1}, {**REPLY, "weight": 0}),
    _chat(USER, {**REPLY, "weight": 1}),
    _chat({"role": "tool", "content": "{}"}, REPLY),
    _chat(USER, {**REPLY, "content": "équipe, 東京 ✓"}),
    _chat(USER, {**REPLY, "name": "bot"}, prompt="ignored"),
    b"  " + _chat(USER, REPLY) + b" \r",  # blanks around it, a CRLF file's carriage return
    _chat(USER, {**REPLY, "content": " \u00a0x"}),
]

# Lines only the engine's validator takes (a valid chat example all the same).
ENGINE_ONLY = [
    _chat(USER, {**REPLY, "weight": 1.0}),
    _chat(USER, {**REPLY, "weight": 0.0}, {**USER, "weight": 1}),
    b'{"messages": [{"role": "user", "content": "x\\ud800"}, '
    b'{"role": "assistant", "content": "y"}]}',  # a lone surrogate: json takes it, msgspec not
]

BAD_UTF8_IN_A_SKIPPED_KEY = b'{"messages": [{"role": "assistant", "content": "x"}], "z": "\xff"}'
BAD_UTF8_IN_CONTENT = b'{"messages": [{"role": "assistant", "content": "\xc3"}]}'
TWO_WITH_A_COMMA = _chat(USER, REPLY) + b", " + _chat(USER, REPLY)
TWO_WITH_A_SPACE = _chat(USER, REPLY) + b" " + _chat(USER, REPLY)
# One example cut across two lines: joined again, the two would read as one value.
CUT_IN_A_STRING = [b'{"messages": [{"role": "assistant", "content": "x"}], "a": "', b'"}']
CUT_IN_A_LIST = [
    b'{"messages": [{"role": "user", "content": "x"}',
    b'{"role": "assistant", "content": "y"}]}',
]

# Lines no one takes, blank lines, and lines of other formats.
INVALID = [
    _chat(),
    _chat(USER),
    _chat({**REPLY, "weight": 0}),
    _chat(USER, {**REPLY, "weight": True}),
    _chat(USER, {**REPLY, "weight": 2}),
    _chat({"role": "bot", "content": "x"}, REPLY),
    _chat({"role": "user", "content": None}, REPLY),
    _chat(USER, {**REPLY, "content": "   "}),
    _chat(USER, {**REPLY, "content": "\u00a0\u2003"}),
    _chat(USER, {**REPLY, "content": ""}),
    _line({"messages": "hello"}),
    _line([{"messages": [USER, REPLY]}]),
    _line({"prompt": "p", "completion": "c"}),
    _line({"text": "plain"}),
    b'{"messages": [{"role": "assistant", "content": "x", "role": "user"}]}',
    BAD_UTF8_IN_A_SKIPPED_KEY,
    BAD_UTF8_IN_CONTENT,
    b'\xef\xbb\xbf{"messages": [{"role": "assistant", "content": "x"}]}',
    b'{"messages": [{"role": "assistant", "content": "x"}], "z": NaN}',
    b'{"messages": [{"role": "assistant", "content": "a\tb"}]}',
    TWO_WITH_A_COMMA,
    TWO_WITH_A_SPACE,
    _chat(USER, REPLY) + b",",
    *CUT_IN_A_STRING,
    *CUT_IN_A_LIST,
    b"",
    b"   ",
    b"\t\r",
    b"\xff\xfe",
    b"not json",
]


# ------------------------------------------------------------------- the compiled check


def _one_at_a_time(
    lines: Sequence[bytes], start: int, stop: int
) -> tuple[int, list[tuple[str, ...]], int]:
    shapes, most = [], 0
    for index in range(start, stop):
        counts = chat_lines.check(lines[index])
        if counts is None:
            return index, shapes, most
        shapes.append(counts[0])
        most = max(most, counts[1])
    return stop, shapes, most


def test_the_check_takes_the_valid_lines_and_leaves_the_rest_to_the_engine() -> None:
    for raw in VALID:
        assert chat_lines.check(raw) == engine_chat_counts(raw) is not None, raw
    for raw in ENGINE_ONLY:
        assert chat_lines.check(raw) is None and engine_chat_counts(raw) is not None, raw
    for raw in INVALID:
        assert chat_lines.check(raw) is None, raw


def test_blank_is_what_the_engines_strip_leaves_empty() -> None:
    # check_lines asks `not s or s.isspace()` where the engine asks `not s.strip()`.
    for code in range(0x110000):
        char = chr(code)
        assert (not char.strip()) == char.isspace(), hex(code)
        assert (not (char * 3).strip()) == (char * 3).isspace(), hex(code)
    assert not "".strip() and not "".isspace()


def test_check_lines_stops_where_the_check_stops() -> None:
    rng = random.Random(11)
    pool = VALID * 6 + ENGINE_ONLY + INVALID
    for _ in range(2000):
        lines = [rng.choice(pool) for _ in range(rng.randint(0, 12))]
        start = rng.randint(0, len(lines))
        stop = rng.randint(start, len(lines))
        assert chat_lines.check_lines(lines, start, stop) == _one_at_a_time(lines, start, stop)
    every = VALID * 3
    assert chat_lines.check_lines(every) == _one_at_a_time(every, 0, len(every))
    assert chat_lines.check_lines(every)[0] == len(every)


def test_check_lines_reads_each_line_for_bad_utf8_in_a_mostly_ascii_run() -> None:
    lines = [VALID[0], VALID[7], BAD_UTF8_IN_A_SKIPPED_KEY, VALID[0]]
    taken, shapes, most = chat_lines.check_lines(lines)
    assert (taken, len(shapes)) == (2, 2)
    assert most == max(chat_lines.check(VALID[0])[1], chat_lines.check(VALID[7])[1])  # type: ignore[index]


# ------------------------------------------------------------------------- uploads


def _reference(data: bytes, settings: Settings) -> tuple[Any, ...]:
    """What an upload must give, line by line through the engine's validator alone
    (for a file whose first non-blank line is JSONL)."""
    pieces = data.split(b"\n")
    if not pieces[-1]:
        pieces.pop()
    found = ScanReport()
    roles: Counter[str] = Counter()
    examples = most = 0
    for number, raw in enumerate(pieces, 1):
        if len(raw) > settings.max_line_bytes:
            found.add_error(
                LineError(number, f"is longer than the limit of {settings.max_line_bytes} bytes")
            )
            continue
        example = found.scan(raw, number)
        if example is None:
            continue
        if examples == settings.max_examples:
            found.add_error(
                LineError(number, f"is past the limit of {settings.max_examples} examples per file")
            )
            break
        examples += 1
        messages = example.record["messages"]
        roles.update(m["role"] for m in messages)
        most = max(most, sum(len(m["content"]) for m in messages))
    if found.total_errors:
        errors = [(e.line, e.message, e.field) for e in found.errors]
        total = found.total_errors
        return ("invalid", f"{total} problem{'s' if total != 1 else ''} found", errors, total)
    if found.format is None:
        return (
            "invalid",
            "the file has no examples",
            [(None, "the file is empty: no examples", "file")],
            1,
        )
    assert found.format is DataFormat.CHAT  # the files built here are chat files
    report = {
        "syntax": "jsonl",
        "lines": len(pieces),
        "examples": examples,
        "max_example_chars": most,
        "messages_by_role": dict(sorted(roles.items())),
    }
    return ("valid", len(data), examples, report)


def _upload(chunks: Iterator[bytes] | list[bytes], settings: Settings) -> tuple[Any, ...]:
    try:
        with ingest_upload(chunks=chunks, settings=settings) as upload:
            assert upload.format is DataFormat.CHAT
            return ("valid", upload.bytes, upload.examples, upload.report)
    except InvalidFile as exc:
        errors = [(e.line, e.message, e.field) for e in exc.errors]
        return ("invalid", exc.detail, errors, exc.extra["total_errors"])
    finally:
        assert not list((settings.home / "tmp").iterdir())  # nothing left half-written


def _chunked(data: bytes, sizes: Iterator[int]) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        size = next(sizes)
        yield data[start : start + size]
        start += size


def _fixed(size: int) -> Iterator[int]:
    while True:
        yield size


def _random_sizes(rng: random.Random) -> Iterator[int]:
    while True:
        yield rng.choice([1, 2, 3, 17, 64, 300, 4096])


def _random_file(rng: random.Random) -> bytes:
    valid_pool = VALID * 4 + ENGINE_ONLY
    lines = []
    for _ in range(rng.randint(1, 40)):
        kind = rng.random()
        if kind < 0.75:
            lines.append(rng.choice(valid_pool))
        elif kind < 0.9:
            lines.append(rng.choice(INVALID))
        else:  # near the limit of 300 bytes, on either side
            reply = {**REPLY, "content": "y" * rng.randint(230, 290)}
            lines.append(_chat(USER, reply))
    if not lines[0].lstrip().startswith(b"{"):
        lines.insert(0, VALID[0])  # a JSONL file: its first line decides
    if not any(line in VALID for line in lines):
        lines.append(VALID[0])  # a chat file
    data = b"\n".join(lines)
    return data + rng.choice([b"", b"\n", b"\n\n", b"\n  \n"])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def test_uploads_give_the_line_by_line_answer_wherever_the_chunks_break(home: Path) -> None:
    rng = random.Random(5)
    for case in range(150):
        limit = rng.choice([5, 12, 1000])
        settings = make_settings(home, max_line_bytes=300, max_examples=limit)
        data = _random_file(rng)
        expected = _reference(data, settings)
        for chunks in (
            [data],
            list(_chunked(data, _fixed(1))),
            list(_chunked(data, _fixed(7))),
            list(_chunked(data, _fixed(256))),
            [line + b"\n" for line in data.split(b"\n")][:-1] + [data.split(b"\n")[-1]],
            list(_chunked(data, _random_sizes(rng))),
        ):
            assert b"".join(chunks) == data
            assert _upload(chunks, settings) == expected, (case, data)


@pytest.mark.parametrize(
    "lines",
    [
        [VALID[1], VALID[7], VALID[0], VALID[9], VALID[2]],  # all valid
        [VALID[1], TWO_WITH_A_COMMA, VALID[0], b"", VALID[4], ENGINE_ONLY[0], VALID[3]],
        [VALID[0], *CUT_IN_A_STRING, TWO_WITH_A_SPACE, *CUT_IN_A_LIST, TWO_WITH_A_COMMA],
        [VALID[0], _chat(USER, {**REPLY, "content": "z" * 400}), VALID[1], VALID[2]],
        [VALID[0], BAD_UTF8_IN_CONTENT, VALID[7], BAD_UTF8_IN_A_SKIPPED_KEY, VALID[0]],
    ],
    ids=["valid", "mixed", "cut", "too-long", "utf8"],
)
def test_two_chunks_broken_at_every_byte_give_one_answer(home: Path, lines: list[bytes]) -> None:
    settings = make_settings(home, max_line_bytes=300, max_examples=4)
    data = b"\n".join(lines) + b"\n"
    expected = _reference(data, settings)
    for cut in range(len(data) + 1):
        assert _upload([data[:cut], data[cut:]], settings) == expected, cut


def test_the_limit_of_examples_names_the_first_example_past_it(home: Path) -> None:
    lines = [VALID[0], b"", VALID[1], INVALID[0], ENGINE_ONLY[0], VALID[2], VALID[3], VALID[4]]
    data = b"\n".join(lines) + b"\n"
    for limit in range(1, 7):
        settings = make_settings(home, max_examples=limit)
        expected = _reference(data, settings)
        for size in (1, 9, len(data)):
            assert _upload(list(_chunked(data, _fixed(size))), settings) == expected
    settings = make_settings(home, max_examples=3)
    outcome = _upload([data], settings)
    assert outcome[2][-1] == (6, "is past the limit of 3 examples per file", None)


def test_a_large_chat_upload_counts_every_line(home: Path) -> None:
    rng = random.Random(3)
    lines = [rng.choice(VALID) for _ in range(20_000)]
    data = b"\n".join(lines) + b"\n"
    settings = make_settings(home)
    expected = _reference(data, settings)
    assert expected[0] == "valid"
    assert _upload(list(_chunked(data, _fixed(64 * 1024))), settings) == expected
    assert _upload(list(_chunked(data, _fixed(1 << 20))), settings) == expected


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
        async with asgi_client(sqlite_settings) as client:
            return await client.post(
                "/files",
                content=pieces(),
                headers=auth(key) | {"content-type": f"multipart/form-data; boundary={boundary}"},
            )

    response = anyio.run(upload)

    assert response.status_code == 201, response.text
    created = response.json()
    assert (created["bytes"], created["examples"]) == (len(data), len(data) // len(row))
    stored = next((sqlite_settings.resolved_store_dir / "files").rglob(created["id"]))
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert not list((sqlite_settings.home / "tmp").iterdir())

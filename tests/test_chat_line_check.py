"""The upload's compiled chat-line check (`chat_lines.check`) accepts only what the engine's
validator accepts, and an upload's report and errors are the engine's whichever path
checked each line. Nothing here is timed; bench/api_load.py measures the speed."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest

from peft_engine.data.formats import scan_lines
from tests.chat_line_helpers import engine_chat_counts
from tests.service_fixtures import api_client, auth, new_team_key
from tuneq.files import chat_lines
from tuneq.settings import Settings


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
    _chat(USER, REPLY, input={"messages": []}, preferred_output="ignored, as for prompt"),
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


@pytest.mark.parametrize("raw", TYPICAL, ids=range(len(TYPICAL)))
def test_typical_chat_lines_take_the_compiled_check(raw: bytes) -> None:
    assert chat_lines.check(raw) == engine_chat_counts(raw) is not None


@pytest.mark.parametrize("raw", EDGES, ids=range(len(EDGES)))
def test_compiled_check_accepts_only_what_the_engine_accepts(raw: bytes) -> None:
    fast = chat_lines.check(raw)
    if fast is not None:
        assert fast == engine_chat_counts(raw)


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
            assert fast == engine_chat_counts(bytes(line)), bytes(line)


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

"""A compiled check for the common line of an upload: a valid chat example (DESIGN §6).

The engine's validator (`peft_engine.data.formats.parse_line`) parses a line with the json
module and walks the result in Python: too slow for the upload target (bench/README.md).
msgspec decodes and type-checks a chat line against the structs below in one C pass. The
rule: a line this check accepts is one the engine accepts, with the same counts; any line
it does not accept (an error, another format, anything unusual such as a weight of 1.0)
goes through the engine's validator, whose words and line numbers the user sees.
tests/test_chat_line_check.py and tests/test_upload_streaming.py hold the two to the
same answers.

`check_lines` runs the check over many lines in one call, stopping at the first it does not
take: a chat upload's lines cost one Python loop iteration each, not a chain of calls.
`check` is the same code on one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Literal

import msgspec

from peft_engine.data.formats import CHAT_ROLES

_Role = Literal[CHAT_ROLES]  # type: ignore[valid-type]  # the engine's roles, exactly


class _Message(msgspec.Struct, gc=False):
    # Other keys (name, tool_calls, ...) are allowed, as the engine allows them.
    role: _Role
    content: str
    weight: Literal[0, 1] | None = None  # never a JSON boolean: msgspec does not coerce


class _Chat(msgspec.Struct, gc=False):
    messages: list[_Message]


_decode = msgspec.json.Decoder(_Chat).decode
_role = attrgetter("role")

ChatCounts = tuple[tuple[str, ...], int]  # the messages' roles, their characters of content


def check(raw: bytes) -> ChatCounts | None:
    """A valid chat line's roles and characters of content; None: ask the engine."""
    _, shapes, chars = check_lines([raw])
    return (shapes[0], chars) if shapes else None


def check_lines(
    lines: Sequence[bytes], start: int = 0, stop: int | None = None
) -> tuple[int, list[tuple[str, ...]], int]:
    """The check on lines[start:stop] in order, up to the first line it does not take.

    Returns the index of that line (`stop` when all are taken), the roles of each line
    taken (a tuple a line, in order) and the most characters of content in one of them
    (0 when none). A line taken here is one `check` takes, with the same counts.
    """
    stop = len(lines) if stop is None else stop
    shapes: list[tuple[str, ...]] = []
    keep = shapes.append
    most = 0
    decode = _decode
    for index in range(start, stop):  # by index: a call resuming at `start` skips nothing
        raw = lines[index]
        try:
            if not raw.isascii():  # ASCII is UTF-8; isascii costs a tenth of decoding
                raw.decode("utf-8")  # msgspec does not look inside the keys it skips
            messages = decode(raw).messages
        except (UnicodeDecodeError, msgspec.DecodeError):
            return index, shapes, most
        chars = 0
        has_reply = weighted = False
        for message in messages:
            content = message.content
            chars += len(content)
            if message.role == "assistant":
                if not content or content.isspace():  # blank, as the engine's str.strip sees it
                    break
                has_reply = True
            if message.weight is not None:
                weighted = True
        else:
            if has_reply and (not weighted or _carries_loss(messages)):
                keep(tuple(map(_role, messages)))
                if chars > most:
                    most = chars
                continue
        return index, shapes, most
    return stop, shapes, most


def _carries_loss(messages: list[_Message]) -> bool:
    """The engine's rule for weights: some message has weight 1, or some assistant message
    has no weight 0."""
    return any(m.weight == 1 for m in messages) or any(
        m.weight != 0 for m in messages if m.role == "assistant"
    )

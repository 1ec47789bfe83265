"""Server-Sent Events, read as the WHATWG HTML standard says (§9.2 "Event stream
interpretation"): fields `event`, `data` (lines joined with newlines), `id`, `retry`;
lines starting with a colon are comments (heartbeats); a blank line ends an event."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str  # "message" when the server named none
    data: str
    id: str | None  # the last event id so far: the `id:` of this event or an earlier one
    retry_ms: int | None  # the reconnection time the stream asked for so far


def parse_events(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """The events in a stream's lines (without their line endings), as they complete.

    An event whose block has no `data:` line is not dispatched (the standard's rule); a
    block of only `retry:` still sets the reconnection time reported with later events.
    """
    event, data, last_id, retry_ms = "", [], None, None
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), last_id, retry_ms)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            retry_ms = int(value)

"""The engine's verdict on a chat line, in the shape the upload's compiled check reports."""

from __future__ import annotations

from peft_engine.data.formats import DataFormat, parse_line


def engine_chat_counts(raw: bytes) -> tuple[tuple[str, ...], int] | None:
    """The engine's verdict on one line, as the compiled check reports a valid one."""
    try:
        example = parse_line(raw, 1)
    except Exception:  # noqa: BLE001 - the engine's line problems
        return None
    if example.format is not DataFormat.CHAT:
        return None
    messages = example.record["messages"]
    return tuple(m["role"] for m in messages), sum(len(m["content"]) for m in messages)

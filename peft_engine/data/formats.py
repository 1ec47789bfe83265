"""Reading and validating JSONL datasets (DESIGN §6), line by line, without torch.

One pass over the file: every line must be a UTF-8 JSON object in one of the formats, and
all lines in the same one. Problems are collected with their line numbers (up to a limit,
the rest counted) so a user fixes the whole file in one go rather than one error a run.
The API's upload validation uses `scan_lines` on the stream; the engine uses `read_examples`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from peft_engine.errors import DataError, LineError

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_ERRORS = 20


class DataFormat(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    TEXT = "text"


@dataclass(frozen=True)
class Example:
    line: int
    format: DataFormat
    record: dict[str, Any]


@dataclass
class ScanReport:
    """What one pass over a file found: the format, the examples, the first problems."""

    format: DataFormat | None = None
    examples: list[Example] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    total_errors: int = 0
    lines: int = 0

    def add_error(self, error: LineError) -> None:
        self.total_errors += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)

    def scan(self, raw: bytes, number: int) -> Example | None:
        """Check one line: its example, or None (blank, or a problem now in `errors`).

        The caller decides whether to keep examples: a streamed upload only counts them.
        """
        self.lines = number
        if not raw.strip():
            return None  # blank lines (a trailing newline, say) are not examples
        try:
            example = parse_line(raw, number)
        except _LineProblem as problem:
            self.add_error(LineError(number, problem.message, problem.field))
            return None
        if self.format is None:
            self.format = example.format
        elif example.format is not self.format:
            self.add_error(
                LineError(
                    number,
                    f"is in {example.format} format but the file started in {self.format} "
                    "format; use one format per file",
                )
            )
            return None
        return example


def read_examples(path: Path, *, param: str = "training_file") -> list[Example]:
    """All examples of a JSONL file, or a DataError listing the lines at fault."""
    try:
        with path.open("rb") as handle:
            report = scan_lines(handle)
    except FileNotFoundError:
        raise DataError(f"file not found: {path}", param=param) from None
    except IsADirectoryError:
        raise DataError(f"is a directory, not a file: {path}", param=param) from None
    if report.total_errors:
        plural = "s" if report.total_errors > 1 else ""
        raise DataError(
            f"{report.total_errors} invalid line{plural} in {path.name}",
            param=param,
            errors=report.errors,
            total_errors=report.total_errors,
        )
    if not report.examples:
        raise DataError(f"{path.name} has no examples (the file is empty)", param=param)
    return report.examples


def scan_lines(lines: Iterable[bytes]) -> ScanReport:
    report = ScanReport()
    for number, raw in enumerate(lines, start=1):
        example = report.scan(raw, number)
        if example is not None:
            report.examples.append(example)
    return report


class _LineProblem(Exception):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def parse_line(raw: bytes, number: int) -> Example:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _LineProblem(f"not valid UTF-8 (byte {exc.start + 1})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineProblem(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _LineProblem(f"expected a JSON object, found {_json_type(record)}")
    data_format = detect_format(record)
    _VALIDATORS[data_format](record)
    return Example(number, data_format, record)


def detect_format(record: dict[str, Any]) -> DataFormat:
    if "messages" in record:
        return DataFormat.CHAT
    if "prompt" in record or "completion" in record:
        return DataFormat.PROMPT_COMPLETION
    if "text" in record:
        return DataFormat.TEXT
    keys = ", ".join(sorted(record)) or "none"
    raise _LineProblem(
        f"unknown format (keys: {keys}); expected 'messages' (chat), "
        "'prompt' and 'completion', or 'text'"
    )


def _validate_chat(record: dict[str, Any]) -> None:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise _LineProblem(f"expected a list, found {_json_type(messages)}", "messages")
    if not messages:
        raise _LineProblem("the conversation is empty", "messages")
    for index, message in enumerate(messages):
        _validate_message(message, f"messages[{index}]")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise _LineProblem("the conversation has no assistant message to learn from", "messages")
    if all(m.get("weight", 1) == 0 for m in assistant) and not any(
        m.get("weight") == 1 for m in messages
    ):
        raise _LineProblem("every assistant message has weight 0: nothing to learn", "messages")


def _validate_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise _LineProblem(f"expected an object, found {_json_type(message)}", where)
    role = message.get("role")
    if role is None:
        raise _LineProblem("missing", f"{where}.role")
    if role not in CHAT_ROLES:
        raise _LineProblem(f"{role!r} is not one of {', '.join(CHAT_ROLES)}", f"{where}.role")
    _require_string(message, "content", where, allow_empty=role != "assistant")
    weight = message.get("weight")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise _LineProblem(f"must be 0 or 1, found {weight!r}", f"{where}.weight")


def _validate_prompt_completion(record: dict[str, Any]) -> None:
    _require_string(record, "prompt", None, allow_empty=True)
    _require_string(record, "completion", None, allow_empty=False)


def _validate_text(record: dict[str, Any]) -> None:
    _require_string(record, "text", None, allow_empty=False)


def _require_string(obj: dict[str, Any], key: str, where: str | None, *, allow_empty: bool) -> None:
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise _LineProblem("missing", name)
    value = obj[key]
    if not isinstance(value, str):
        raise _LineProblem(f"expected a string, found {_json_type(value)}", name)
    if not allow_empty and not value.strip():
        raise _LineProblem("is empty", name)


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


_VALIDATORS = {
    DataFormat.CHAT: _validate_chat,
    DataFormat.PROMPT_COMPLETION: _validate_prompt_completion,
    DataFormat.TEXT: _validate_text,
}

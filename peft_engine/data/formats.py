"""Reading and validating datasets (DESIGN §6), line by line, without torch.

One pass over the file: every line must be a UTF-8 JSON object in one of the formats, and
all lines in the same one. Classification data may also be CSV (a header row naming
`text,label` or `text_a,text_b,label`, read by `csv_rows`); a file is CSV when its first
non-blank line does not start with `{`, and its line numbers are the physical lines,
header included, as an editor shows them.
Problems are collected with their line numbers (up to a limit, the rest counted) so a user
fixes the whole file in one go rather than one error a run. The API's upload validation
scans the stream as it arrives; the engine uses `read_examples`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_engine.data.csv_rows import CsvRows, starts_json_object
from peft_engine.data.examples import DataFormat, Example, not_utf8
from peft_engine.data.images import read_image_folder, resolve_image_paths
from peft_engine.errors import DataError, LineError

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_ERRORS = 20

# The data formats each task trains on (with the default objective, "sft").
TASK_FORMATS: dict[str, tuple[DataFormat, ...]] = {
    "causal_lm": (DataFormat.CHAT, DataFormat.PROMPT_COMPLETION, DataFormat.TEXT),
    "seq_classification": (DataFormat.CLASSIFICATION,),
    "token_classification": (DataFormat.TOKEN_CLASSIFICATION,),
    "image_classification": (DataFormat.IMAGE_CLASSIFICATION,),
}
# The objectives that learn from preference pairs (method.objective.type), and their format.
PREFERENCE_OBJECTIVES = ("dpo",)
# The outputs of a preference example, each one assistant message.
PREFERENCE_OUTPUTS = ("preferred_output", "non_preferred_output")


def job_formats(task: str, objective: str) -> tuple[DataFormat, ...]:
    """The data formats a job of `task` trains on with the method's `objective`."""
    if objective in PREFERENCE_OBJECTIVES:
        return (DataFormat.PREFERENCE,)
    return TASK_FORMATS[task]


_TAG = re.compile(r"O|[BI]-\S+")


@dataclass
class ScanReport:
    """What one pass over a file found: the format, the examples, the first problems."""

    format: DataFormat | None = None
    examples: list[Example] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    total_errors: int = 0

    def add_error(self, error: LineError) -> None:
        self.total_errors += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)

    def scan(self, raw: bytes, number: int) -> Example | None:
        """Check one line: its example, or None (blank, or a problem now in `errors`).

        The caller decides whether to keep examples: a streamed upload only counts them.
        """
        if not raw.strip():
            return None  # blank lines (a trailing newline, say) are not examples
        return self._check(parse_line, raw, number)

    def check_record(self, record: dict[str, Any], number: int) -> Example | None:
        """Check one record read from a row (CSV) as `scan` checks a line."""
        return self._check(_example, record, number)

    def _check(self, read: Callable[[Any, int], Example], data: Any, number: int) -> Example | None:
        """The example `read` makes of `data` when it is valid and in the file's format (the
        first example's); otherwise None, with the problem in `errors`."""
        try:
            example = read(data, number)
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
    """All examples of a JSONL file, or a DataError listing the lines at fault.

    A directory is an image folder (`<dir>/<label>/<image>`, `peft_engine.data.images`).
    """
    if path.is_dir():
        return read_image_folder(path, param=param)
    try:
        with path.open("rb") as handle:
            report = scan_csv(handle) if is_csv(path) else scan_lines(handle)
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
    if report.format is DataFormat.IMAGE_CLASSIFICATION:  # image paths: from the file's folder
        return resolve_image_paths(report.examples, path.parent)
    return report.examples


def is_csv(path: Path) -> bool:
    """A data file is CSV when its first non-blank line is not a JSON object's start."""
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                return not starts_json_object(raw)
    return False


def scan_csv(lines: Iterable[bytes]) -> ScanReport:
    """Check a CSV classification file (`csv_rows`): a header row, then one example a row."""
    report = ScanReport()
    numbered = ((number, raw.removesuffix(b"\n")) for number, raw in enumerate(lines, 1))
    for line, record in CsvRows(numbered, add_error=report.add_error):
        if (example := report.check_record(record, line)) is not None:
            report.examples.append(example)
    return report


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
        raise _LineProblem(not_utf8(exc)) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineProblem(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _LineProblem(f"expected a JSON object, found {_json_type(record)}")
    return _example(record, number)


def _example(record: dict[str, Any], number: int) -> Example:
    """The record as an example of the format its keys say, or the problem with it."""
    data_format = detect_format(record)
    _VALIDATORS[data_format](record)
    return Example(number, data_format, record)


def detect_format(record: dict[str, Any]) -> DataFormat:
    if "messages" in record:  # first: the upload's compiled chat check decides so too
        return DataFormat.CHAT
    if "input" in record or any(key in record for key in PREFERENCE_OUTPUTS):
        return DataFormat.PREFERENCE
    if "prompt" in record or "completion" in record:
        return DataFormat.PROMPT_COMPLETION
    if "tokens" in record or "tags" in record:
        return DataFormat.TOKEN_CLASSIFICATION
    if "image" in record:
        return DataFormat.IMAGE_CLASSIFICATION
    if "label" in record or "text_a" in record or "text_b" in record:
        return DataFormat.CLASSIFICATION
    if "text" in record:
        return DataFormat.TEXT
    keys = ", ".join(sorted(record)) or "none"
    raise _LineProblem(
        f"unknown format (keys: {keys}); expected 'messages' (chat), "
        "'prompt' and 'completion', 'text', 'text' and 'label' (classification), "
        "'tokens' and 'tags' (token classification), 'image' and 'label', or 'input', "
        "'preferred_output' and 'non_preferred_output' (preference)"
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


def _validate_preference(record: dict[str, Any]) -> None:
    """OpenAI's preference format: `input.messages` (the conversation so far; other members
    of `input`, such as `tools`, are allowed), then `preferred_output` and
    `non_preferred_output`, each a list of one assistant message."""
    if "input" not in record:
        raise _LineProblem("missing", "input")
    prompt = record["input"]
    if not isinstance(prompt, dict):
        raise _LineProblem(f"expected an object, found {_json_type(prompt)}", "input")
    if "messages" not in prompt:
        raise _LineProblem("missing", "input.messages")
    messages = prompt["messages"]
    if not isinstance(messages, list):
        raise _LineProblem(f"expected a list, found {_json_type(messages)}", "input.messages")
    if not messages:
        raise _LineProblem("the conversation is empty", "input.messages")
    for index, message in enumerate(messages):
        where = f"input.messages[{index}]"
        _validate_message(message, where)
        if "weight" in message:  # the loss is on the two outputs, by definition
            raise _LineProblem("weights apply to chat data, not to preference pairs", where)
    outputs = [_preference_output(record, key) for key in PREFERENCE_OUTPUTS]
    if outputs[0] == outputs[1]:
        raise _LineProblem(
            "is the same as preferred_output: nothing to prefer", "non_preferred_output[0]"
        )


def preference_conversations(record: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """A valid preference record's two conversations: the input's messages followed by the
    preferred output, and by the non-preferred one."""
    return [[*record["input"]["messages"], *record[key]] for key in PREFERENCE_OUTPUTS]


def _preference_output(record: dict[str, Any], key: str) -> str:
    """The content of the output `key`: a list of one assistant message."""
    if key not in record:
        raise _LineProblem("missing", key)
    output = record[key]
    if not isinstance(output, list):
        raise _LineProblem(f"expected a list, found {_json_type(output)}", key)
    if len(output) != 1:
        raise _LineProblem(f"expected one assistant message, found {len(output)}", key)
    where = f"{key}[0]"
    _validate_message(output[0], where)
    if output[0]["role"] != "assistant":
        raise _LineProblem(f"must be 'assistant', found {output[0]['role']!r}", f"{where}.role")
    if "weight" in output[0]:
        raise _LineProblem("weights apply to chat data, not to preference pairs", where)
    return output[0]["content"]


def _validate_prompt_completion(record: dict[str, Any]) -> None:
    _require_string(record, "prompt", None, allow_empty=True)
    _require_string(record, "completion", None, allow_empty=False)


def _validate_text(record: dict[str, Any]) -> None:
    _require_string(record, "text", None, allow_empty=False)


def _validate_classification(record: dict[str, Any]) -> None:
    if "text" in record and ("text_a" in record or "text_b" in record):
        raise _LineProblem("give either 'text' or the pair 'text_a' and 'text_b', not both")
    if "text_a" in record or "text_b" in record:
        _require_string(record, "text_a", None, allow_empty=False)
        _require_string(record, "text_b", None, allow_empty=False)
    else:
        _require_string(record, "text", None, allow_empty=False)
    _validate_label(record)


def _validate_label(record: dict[str, Any]) -> None:
    if "label" not in record:
        raise _LineProblem("missing", "label")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise _LineProblem(f"expected a string or an integer, found {_json_type(label)}", "label")
    if isinstance(label, str) and not label.strip():
        raise _LineProblem("is empty", "label")


def _validate_token_classification(record: dict[str, Any]) -> None:
    for key in ("tokens", "tags"):
        if key not in record:
            raise _LineProblem("missing", key)
        value = record[key]
        if not isinstance(value, list):
            raise _LineProblem(f"expected a list, found {_json_type(value)}", key)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _LineProblem(f"expected a string, found {_json_type(item)}", f"{key}[{i}]")
            if not item.strip():
                raise _LineProblem("is empty", f"{key}[{i}]")
    tokens, tags = record["tokens"], record["tags"]
    if not tokens:
        raise _LineProblem("the sentence is empty", "tokens")
    if len(tags) != len(tokens):
        raise _LineProblem(f"has {len(tags)} tags for {len(tokens)} tokens", "tags")
    for i, tag in enumerate(tags):
        if not _TAG.fullmatch(tag):
            raise _LineProblem(f"{tag!r} is not an IOB2 tag (O, B-TYPE or I-TYPE)", f"tags[{i}]")


def _validate_image_classification(record: dict[str, Any]) -> None:
    # A relative path (from the data file's folder) or base64 image bytes; decoded when read.
    _require_string(record, "image", None, allow_empty=False)
    _validate_label(record)


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
    DataFormat.CLASSIFICATION: _validate_classification,
    DataFormat.TOKEN_CLASSIFICATION: _validate_token_classification,
    DataFormat.IMAGE_CLASSIFICATION: _validate_image_classification,
    DataFormat.PREFERENCE: _validate_preference,
}

"""CSV classification files: the rules every reader applies, in one place.

The engine (`formats.read_examples`) and the API's streamed upload (`tuneq.files.ingest`)
both read CSV through `CsvRows`, so a file gets the same verdicts, in the same words, on
the same lines. A file is CSV when its first non-blank line does not start with `{`. Its
first non-blank row is the header, naming the columns `text,label` or
`text_a,text_b,label` (in any order, other columns ignored, a byte order mark dropped);
every later non-blank row is an example with as many fields as the header. A quoted field
may span lines: a problem names the physical line its row starts on, as an editor shows it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from peft_engine.data.examples import not_utf8
from peft_engine.errors import LineError

CSV_COLUMNS = (("text", "label"), ("text_a", "text_b", "label"))


def starts_json_object(line: bytes) -> bool:
    """A JSONL line starts with `{` (after blanks and a UTF-8 byte order mark); the first
    non-blank line of a CSV file does not."""
    return line.lstrip().startswith((b"{", b"\xef\xbb\xbf{"))


class CsvRecord(NamedTuple):
    """An example row: the physical line it starts on, and its fields by column name."""

    line: int
    record: dict[str, str]


class _StopReading(Exception):
    """The rest of the file cannot be parsed reliably (the problem is already reported)."""


class CsvRows:
    """The example rows of a CSV file, read from its numbered physical lines (without
    their newlines) as they arrive.

    Iterating yields a `CsvRecord` for each example row, its fields not yet validated (the
    caller runs the classification validator). Problems go to `add_error` as they are met.
    After one that leaves the rest unreadable (a header without the columns, a quote never
    closed, a row over `max_row_bytes`) the iteration ends; the lines after it are left
    unread in `lines`.
    """

    def __init__(
        self,
        lines: Iterable[tuple[int, bytes]],
        *,
        add_error: Callable[[LineError], None],
        max_row_bytes: int | None = None,
    ) -> None:
        self._lines = iter(lines)
        self._add_error = add_error
        self._max_row_bytes = max_row_bytes
        self._line = 0  # the last physical line handed to the csv module
        self._new_row = True  # the next line handed over starts a row
        self._row_start = 0  # the physical line the row being read starts on
        self._row_bytes = 0  # the bytes of that row so far, newlines between lines included

    def __iter__(self) -> Iterator[CsvRecord]:
        rows = csv.reader(self._text(), strict=True)
        try:
            yield from self._records(rows)
        except csv.Error as exc:
            self._add_error(LineError(self._line, self._csv_problem(exc)))
        except _StopReading:
            pass

    def _records(self, rows: Iterator[list[str]]) -> Iterator[CsvRecord]:
        """The header row, then one example a row; blank rows are skipped."""
        header = next((row for row in self._numbered(rows) if not _blank(row)), None)
        if header is None:
            return
        names = [cell.strip().lstrip("\ufeff") for cell in header]
        columns = next((c for c in CSV_COLUMNS if set(c) <= set(names)), None)
        if columns is None:
            found = ",".join(names) or "nothing"
            self._add_error(
                LineError(
                    self._row_start,
                    "does not start with '{' so the file is read as CSV, and a CSV file "
                    "needs a header row with the columns text,label or text_a,text_b,label; "
                    f"found {found}",
                )
            )
            return
        index = {name: names.index(name) for name in columns}
        for row in self._numbered(rows):
            if _blank(row):
                continue
            if len(row) != len(names):
                message = f"has {len(row)} fields but the header has {len(names)}"
                self._add_error(LineError(self._row_start, message))
                continue
            yield CsvRecord(self._row_start, {name: row[i] for name, i in index.items()})

    def _numbered(self, rows: Iterator[list[str]]) -> Iterator[list[str]]:
        """The rows, with `_row_start` set to the physical line each one starts on."""
        while True:
            self._new_row = True
            row = next(rows, None)
            if row is None:
                return
            yield row

    def _text(self) -> Iterator[str]:
        """The lines as the csv module reads them: decoded, newline restored."""
        for number, data in self._lines:
            self._line = number
            if self._new_row:
                self._new_row = False
                self._row_start, self._row_bytes = number, len(data)
            else:
                self._row_bytes += 1 + len(data)  # the newline between, and the line
            if self._max_row_bytes is not None and self._row_bytes > self._max_row_bytes:
                # A row of many quoted multi-line fields, each line within its own limit.
                limit = self._max_row_bytes
                message = f"starts a row longer than the limit of {limit} bytes"
                self._add_error(LineError(self._row_start, message))
                raise _StopReading
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                self._add_error(LineError(number, not_utf8(exc)))
                text = data.decode("utf-8", errors="replace")  # quotes are ASCII: go on
            yield text + "\n"

    def _csv_problem(self, exc: csv.Error) -> str:
        if "unexpected end of data" in str(exc):
            return (
                f"not valid CSV ({exc}): the quoted field of the row that starts on line "
                f"{self._row_start} is never closed"
            )
        return f"not valid CSV ({exc})"


def _blank(row: list[str]) -> bool:
    return not any(cell.strip() for cell in row)

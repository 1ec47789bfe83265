"""Datasets: upload (validated while it streams in), list, read, delete, local copies.

An upload is read once: each chunk goes to a temporary file, the SHA-256 and the size,
and its lines go to the engine's validator (DESIGN §6). JSONL is checked a line at a time;
CSV (classification only; a file is CSV when its first non-blank line does not start with
`{`, as the engine decides) goes through the csv module a physical line at a time, so a
quoted field may span lines and errors still name physical lines. Memory holds one line
(or one CSV row) at most, never the file. Only a valid file reaches the store, and its row
is inserted only after the object is there, so a row never points at nothing.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import queue
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple, Self, cast

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from peft_engine.data.formats import CSV_COLUMNS, DataFormat, Example, ScanReport
from peft_engine.errors import LineError
from tuneq.errors import Conflict, ErrorItem, InvalidFile, InvalidRequest, NotFound, PayloadTooLarge
from tuneq.files import chat_lines
from tuneq.files.models import File
from tuneq.ids import new_id
from tuneq.jobs.models import Job
from tuneq.jobs.states import TERMINAL
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team

PURPOSES = frozenset({"fine-tune"})
DEFAULT_PURPOSE = "fine-tune"


@dataclass
class IngestedUpload:
    """A valid upload in a temporary file; leaving the `with` block removes the file
    (unless `store_upload` has moved it into the store already)."""

    path: Path
    sha256: str
    bytes: int
    format: DataFormat
    examples: int
    report: dict[str, Any]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.path.unlink(missing_ok=True)


def ingest_upload(*, chunks: Iterable[bytes], settings: Settings) -> IngestedUpload:
    """Read an upload once into a temporary file, validating it on the way.

    Raises PayloadTooLarge as soon as the size passes `max_upload_bytes` (reading stops),
    and InvalidFile listing the first problems with their line numbers. Either way, and
    on any other error, the temporary file is gone.
    """
    tmp_dir = settings.home / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-", suffix=".jsonl")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            spool = _Spool(out)
            try:
                scanner = _UploadScanner(spool, settings)
                scanner.scan(chunks)
            finally:
                sha256 = spool.close()
            return scanner.finish(path, sha256)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def store_upload(
    *,
    db: Session,
    store: ObjectStore,
    team: Team,
    upload: IngestedUpload,
    filename: str,
    purpose: str,
) -> File:
    """Put a validated upload in the store, then insert its row (flushed, not committed)."""
    if purpose not in PURPOSES:
        allowed = ", ".join(sorted(PURPOSES))
        raise InvalidRequest(
            f"purpose must be one of: {allowed}",
            errors=[ErrorItem(f"{purpose!r} is not one of: {allowed}", field="purpose")],
            param="purpose",
        )
    file_id = new_id("file")
    key = f"files/{team.id}/{file_id}"
    store.move_file(key, upload.path)  # the temporary file is the store's now (or gone)
    try:
        row = File(
            id=file_id,
            team_id=team.id,
            filename=filename,
            purpose=purpose,
            bytes=upload.bytes,
            sha256=upload.sha256,
            storage_key=key,
            format=str(upload.format),
            examples=upload.examples,
            report=upload.report,
        )
        db.add(row)
        db.flush()
    except BaseException:
        store.delete(key)  # no object without its row
        raise
    return row


def list_files(
    *, db: Session, team: Team, limit: int, after: str | None = None
) -> tuple[list[File], bool]:
    """A page of the team's files, newest first, and whether more follow."""
    query = select(File).where(File.team_id == team.id)
    if after is not None:
        query = query.where(File.id < after)
    rows = list(db.scalars(query.order_by(File.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def get_file(*, db: Session, team: Team, file_id: str) -> File:
    """The team's file; another team's is as missing as one that never existed."""
    file = db.get(File, file_id)
    if file is None or file.team_id != team.id:
        raise NotFound(f"no file {file_id!r}", param="file_id")
    return file


def delete_file(*, db: Session, store: ObjectStore, team: Team, file_id: str) -> File:
    """Delete the row, then the object; refused while an unfinished job uses the file."""
    file = get_file(db=db, team=team, file_id=file_id)
    job = db.scalar(
        select(Job)
        .where(
            or_(Job.training_file_id == file.id, Job.validation_file_id == file.id),
            Job.state.not_in([str(state) for state in TERMINAL]),
        )
        .limit(1)
    )
    if job is not None:
        raise Conflict(
            f"file {file.id} is used by job {job.id}, which is {job.state}; "
            "cancel it or wait for it to finish",
            param="file_id",
        )
    db.delete(file)
    db.flush()
    store.delete(file.storage_key)
    return file


def local_copy(store: ObjectStore, file: File, cache_dir: Path) -> Path:
    """A local copy of the file's content, downloaded once: files never change.

    The suffix follows the content (`.csv` or `.jsonl`); the engine sniffs it anyway.
    """
    suffix = ".csv" if (file.report or {}).get("syntax") == "csv" else ".jsonl"
    path = cache_dir / "files" / f"{file.id}{suffix}"
    if not path.is_file():
        store.get_file(file.storage_key, path)  # atomic: a reader never sees half a file
    return path


Syntax = Literal["jsonl", "csv"]


def entity_types(tags: Sequence[str]) -> Iterator[str]:
    """The type of each entity in a sentence's IOB2 tags, in order.

    A `B-X` starts an entity of type X; an `I-X` continues the entity before it when that
    one is also an X, and otherwise (after `O` or another type) starts one.
    """
    current: str | None = None
    for tag in tags:
        prefix, _, kind = tag.partition("-")
        if prefix == "B" or (prefix == "I" and kind != current):
            yield kind
        current = kind if prefix in ("B", "I") else None


@dataclass
class _Stats:
    """The counts kept in a file's report; each format adds its own (see `as_report`)."""

    lines: int = 0
    examples: int = 0
    max_example_chars: int = 0
    role_sequences: Counter[tuple[str, ...]] = field(default_factory=Counter)  # chat
    label_counts: Counter[str] = field(default_factory=Counter)  # labels as strings
    pair_examples: int = 0  # classification examples given as text_a/text_b
    tag_counts: Counter[str] = field(default_factory=Counter)
    entity_counts: Counter[str] = field(default_factory=Counter)
    max_tokens: int = 0  # the most words in one token-classification example

    def add(self, example: Example) -> None:
        """Count one valid example."""
        if example.format is DataFormat.CHAT:
            messages = example.record["messages"]
            roles = tuple(m["role"] for m in messages)
            self.add_chat(roles, sum(len(m["content"]) for m in messages))
            return
        self.examples += 1
        chars = self._add_record(example.format, example.record)
        self.max_example_chars = max(self.max_example_chars, chars)

    def add_chat(self, roles: tuple[str, ...], chars: int) -> None:
        """Count one valid chat example from its messages' roles and characters of content.

        Roles are counted by conversation shape (a few distinct ones per file), then summed
        for the report: cheaper than counting every message of a million-line upload.
        """
        self.examples += 1
        self.role_sequences[roles] += 1
        if chars > self.max_example_chars:
            self.max_example_chars = chars

    def add_chats(self, shapes: list[tuple[str, ...]], most_chars: int) -> None:
        """Count valid chat examples at once: their roles (a tuple each), and the most
        characters of content in one of them."""
        self.examples += len(shapes)
        self.role_sequences.update(shapes)
        if most_chars > self.max_example_chars:
            self.max_example_chars = most_chars

    def _add_record(self, data_format: DataFormat, record: dict[str, Any]) -> int:
        """Count what the record holds; returns its length in characters of text."""
        if data_format is DataFormat.PROMPT_COMPLETION:
            return len(record["prompt"]) + len(record["completion"])
        if data_format is DataFormat.CLASSIFICATION:
            self.label_counts[str(record["label"])] += 1
            if "text_a" in record:
                self.pair_examples += 1
                return len(record["text_a"]) + len(record["text_b"])
            return len(record["text"])
        if data_format is DataFormat.TOKEN_CLASSIFICATION:
            self.tag_counts.update(record["tags"])
            self.entity_counts.update(entity_types(record["tags"]))
            self.max_tokens = max(self.max_tokens, len(record["tokens"]))
            return len(" ".join(record["tokens"]))  # the text the tokenizer sees
        if data_format is DataFormat.IMAGE_CLASSIFICATION:
            self.label_counts[str(record["label"])] += 1
            return 0  # an image has no text; its report leaves max_example_chars out
        return len(record["text"])

    def as_report(self, data_format: DataFormat, syntax: Syntax) -> dict[str, Any]:
        """The report stored with the file and shown by the API."""
        report: dict[str, Any] = {"syntax": syntax, "lines": self.lines, "examples": self.examples}
        if data_format is not DataFormat.IMAGE_CLASSIFICATION:
            report["max_example_chars"] = self.max_example_chars
        if data_format is DataFormat.CHAT:
            by_role: Counter[str] = Counter()
            for roles, conversations in self.role_sequences.items():
                for role in roles:
                    by_role[role] += conversations
            report["messages_by_role"] = dict(sorted(by_role.items()))
        elif data_format is DataFormat.CLASSIFICATION:
            report["label_counts"] = dict(sorted(self.label_counts.items()))
            report["pairs"] = self.pair_examples > 0
        elif data_format is DataFormat.TOKEN_CLASSIFICATION:
            report["tag_counts"] = dict(sorted(self.tag_counts.items()))
            report["entity_counts"] = dict(sorted(self.entity_counts.items()))
            report["max_tokens"] = self.max_tokens
        elif data_format is DataFormat.IMAGE_CLASSIFICATION:
            report["label_counts"] = dict(sorted(self.label_counts.items()))
        return report


_CHAT_OR_UNKNOWN = (None, DataFormat.CHAT)


class _Line(NamedTuple):
    """One physical line, without its newline; `data` is None when it was over the limit."""

    number: int
    data: bytes | None


class _Batch(NamedTuple):
    """Physical lines in a row, without their newlines: `lines[i]` is line `first + i`,
    None when it was over the limit. `within_limit`: no line is None."""

    first: int
    lines: Sequence[bytes | None]
    within_limit: bool

    def each(self) -> Iterator[_Line]:
        return itertools.starmap(_Line, enumerate(self.lines, self.first))


class _StopParsing(Exception):
    """The rest of a CSV file cannot be parsed reliably (the problem is already reported)."""


class _Spool:
    """Hashes an upload and writes it to its temporary file, the writing in a thread of its
    own. At most `depth` chunks wait to be written.

    Both release the GIL. The write (the slower: page cache) runs beside the line validation
    (Python, holding the GIL) on another core; the hash runs in the caller's thread, where
    it leaves the GIL to the event loop reading the body on. Hashing in the spool's thread
    too cost that thread two more GIL hand-offs a chunk, each up to a switch interval (5 ms)
    behind the validation: a 1 GB upload over HTTP on 2 cores ran 15-30% slower.
    """

    def __init__(self, out: BinaryIO, depth: int = 8) -> None:
        self._out = out
        self._digest = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="upload-spool", daemon=True)
        self._thread.start()

    def write(self, chunk: bytes) -> None:
        if self._error is not None:  # the disk is full, say: stop reading the upload
            raise self._error
        self._digest.update(chunk)
        self._chunks.put(chunk)

    def close(self) -> str:
        """Wait for the chunks written so far; the SHA-256 of them all."""
        self._chunks.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if self._error is None:  # after an error, only drain, so write() never blocks
                try:
                    self._out.write(chunk)
                except BaseException as exc:  # noqa: BLE001 - raised again in write/close
                    self._error = exc


class _UploadScanner:
    """Reads the chunks once: spools (copies and hashes) and splits them, validating lines
    as they end.

    `scan` pulls the chunks through a generator of physical lines, a chunk's worth at a time
    (a `_Batch`); the first non-blank line decides between JSONL (it starts with `{`) and
    CSV, as the engine's `is_csv` does.
    """

    def __init__(self, spool: _Spool, settings: Settings) -> None:
        self.spool = spool
        self.max_upload_bytes = settings.max_upload_bytes
        self.max_line_bytes = settings.max_line_bytes
        self.max_examples = settings.max_examples
        self.size = 0
        self.line = bytearray()  # the line being read, up to max_line_bytes
        self.line_too_long = False
        self.found = ScanReport()  # format and errors only: examples are counted, not kept
        self.stats = _Stats()
        self.syntax: Syntax = "jsonl"
        self.csv_line = 0  # CSV: the last physical line handed to the csv module
        self.row_start = 0  # CSV: the physical line the row being read starts on
        self.row_bytes = 0  # CSV: the bytes of that row so far (capped at max_line_bytes)

    def scan(self, chunks: Iterable[bytes]) -> None:
        """Read the whole upload (unless a limit stops it), validating as it comes."""
        batches = self._batches(chunks)
        for batch in batches:
            for index, data in enumerate(batch.lines):
                if data is not None and not data.strip():
                    continue  # blank lines are not examples, in either syntax
                first = batch.first + index
                rest = itertools.chain(
                    [_Batch(first, batch.lines[index:], batch.within_limit)], batches
                )
                if data is None or _starts_object(data):
                    self._scan_jsonl(rest)
                else:
                    self.syntax = "csv"
                    self._scan_csv(_each_line(rest), first=first)
                return

    def finish(self, path: Path, sha256: str) -> IngestedUpload:
        """The valid upload, or InvalidFile with the problems found."""
        if self.found.total_errors:
            self._reject()
        if self.found.format is None:
            raise InvalidFile(
                "the file has no examples",
                errors=[ErrorItem("the file is empty: no examples", field="file")],
                param="file",
                extra={"total_errors": 1},
            )
        return IngestedUpload(
            path=path,
            sha256=sha256,
            bytes=self.size,
            format=self.found.format,
            examples=self.stats.examples,
            report=self.stats.as_report(self.found.format, self.syntax),
        )

    # -- reading -------------------------------------------------------------------------

    def _batches(self, chunks: Iterable[bytes]) -> Iterator[_Batch]:
        """The physical lines of the upload as they complete, a chunk's at a time; every
        byte is kept and hashed.

        A chunk's first piece ends the line begun in an earlier chunk and its last piece
        begins the next; the lines between lie whole in the chunk and are not copied again.
        """
        limit = self.max_line_bytes
        for chunk in chunks:
            self._take(chunk)
            pieces = chunk.split(b"\n")
            rest = pieces.pop()
            if pieces:
                self._extend_line(pieces[0])
                ended = self._end_line()
                self.stats.lines += len(pieces) - 1
                if ended.data is not None:
                    pieces[0] = ended.data
                    if max(map(len, pieces)) <= limit:
                        yield _Batch(ended.number, pieces, True)
                        self._extend_line(rest)
                        continue
                # Rare: a line over the limit in the chunk; mark each one.
                marked = [p if len(p) <= limit else None for p in pieces]
                marked[0] = ended.data
                yield _Batch(ended.number, marked, False)
            self._extend_line(rest)
        if self.line or self.line_too_long:  # a last line without a newline
            line = self._end_line()
            yield _Batch(line.number, [line.data], line.data is not None)

    def _take(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_upload_bytes:
            raise PayloadTooLarge(
                f"the file is larger than the limit of {self.max_upload_bytes} bytes",
                param="file",
            )
        self.spool.write(chunk)

    def _extend_line(self, piece: bytes) -> None:
        if self.line_too_long:
            return
        if len(self.line) + len(piece) > self.max_line_bytes:
            self.line_too_long = True
            self.line.clear()
            return
        self.line += piece

    def _end_line(self) -> _Line:
        self.stats.lines += 1
        line = _Line(self.stats.lines, None if self.line_too_long else bytes(self.line))
        self.line.clear()
        self.line_too_long = False
        return line

    # -- JSONL ---------------------------------------------------------------------------

    def _scan_jsonl(self, batches: Iterable[_Batch]) -> None:
        """A valid chat line in a chat file is counted by the compiled check (chat_lines);
        every other line goes through the engine's validator, which words the problems.

        In a chat file (or one not yet known) the check takes a batch's lines in one call,
        up to the first line it does not take: that line goes to the engine's validator,
        then the check takes the lines after it. At the limit of examples, lines go one at
        a time, so the first example past it is the one refused.
        """
        for first, lines, within_limit in batches:
            start, end = 0, len(lines)
            while start < end:
                if within_limit and self.found.format in _CHAT_OR_UNKNOWN:
                    whole = cast("Sequence[bytes]", lines)  # no None: within the limit
                    stop = min(end, start + self.max_examples - self.stats.examples)
                    start = self._count_chats(whole, start, stop)
                    if start < stop:  # a line the check did not take: the engine's to word
                        self._engine_line(first + start, whole[start])
                        start += 1
                        continue
                    if start == end:
                        break
                self._scan_jsonl_line(first + start, lines[start])
                start += 1

    def _count_chats(self, lines: Sequence[bytes], start: int, stop: int) -> int:
        """Count lines[start:stop] while the compiled check takes them; the index of the
        first line it did not take (`stop` when it took them all)."""
        taken, shapes, most_chars = chat_lines.check_lines(lines, start, stop)
        if shapes:
            self.found.format = DataFormat.CHAT
            self.stats.add_chats(shapes, most_chars)
        return taken

    def _scan_jsonl_line(self, number: int, data: bytes | None) -> None:
        if data is None:
            self._too_long(number)
        elif self.found.format in _CHAT_OR_UNKNOWN and (chat := chat_lines.check(data)):
            self.found.format = DataFormat.CHAT
            self._admit(number)
            self.stats.add_chat(*chat)
        else:
            self._engine_line(number, data)

    def _engine_line(self, number: int, data: bytes) -> None:
        if (example := self.found.scan(data, number)) is not None:
            self._count(example)

    # -- CSV -----------------------------------------------------------------------------

    def _scan_csv(self, lines: Iterator[_Line], *, first: int) -> None:
        """Validate CSV rows as their lines arrive; after a problem that leaves the rest
        unparseable, the remaining lines are still read (stored, hashed, length-checked)."""
        self.csv_line = self.row_start = first - 1
        rows = csv.reader(self._csv_text(lines), strict=True)
        try:
            self._csv_rows(rows)
        except csv.Error as exc:
            self.found.add_error(LineError(self.csv_line, self._csv_problem(exc)))
        except _StopParsing:
            pass
        for line in lines:
            if line.data is None:
                self._too_long(line.number)

    def _csv_text(self, lines: Iterable[_Line]) -> Iterator[str]:
        """Lines as the csv module reads them: decoded, newline restored."""
        for line in lines:
            self.csv_line = line.number
            if line.data is None:
                self._too_long(line.number)
                raise _StopParsing  # its content is gone: where its quotes end is unknown
            self.row_bytes += len(line.data) + (self.row_bytes > 0)  # + the newline between
            if self.row_bytes > self.max_line_bytes:  # a row of many quoted multi-line fields
                self.found.add_error(
                    LineError(
                        self.row_start,
                        f"starts a row longer than the limit of {self.max_line_bytes} bytes",
                    )
                )
                raise _StopParsing
            try:
                text = line.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.found.add_error(
                    LineError(line.number, f"not valid UTF-8 (byte {exc.start + 1})")
                )
                text = line.data.decode("utf-8", errors="replace")  # quotes are ASCII: go on
            yield text + "\n"

    def _csv_rows(self, rows: Iterator[list[str]]) -> None:
        """The header row, then one example a row; blank rows are skipped."""
        header = self._csv_header(rows)
        if header is None:
            return
        columns = next((c for c in CSV_COLUMNS if set(c) <= set(header)), None)
        if columns is None:
            found = ",".join(header) or "nothing"
            self.found.add_error(
                LineError(
                    self.row_start,
                    "does not start with '{' so the file is read as CSV, and a CSV file "
                    "needs a header row with the columns text,label or text_a,text_b,label; "
                    f"found {found}",
                )
            )
            raise _StopParsing
        index = {name: header.index(name) for name in columns}
        for row in self._numbered(rows):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                self.found.add_error(
                    LineError(
                        self.row_start, f"has {len(row)} fields but the header has {len(header)}"
                    )
                )
                continue
            self._csv_example({name: row[i] for name, i in index.items()})

    def _csv_header(self, rows: Iterator[list[str]]) -> list[str] | None:
        for row in self._numbered(rows):
            if any(cell.strip() for cell in row):
                return [cell.strip().lstrip("\ufeff") for cell in row]
        return None

    def _numbered(self, rows: Iterator[list[str]]) -> Iterator[list[str]]:
        """The rows, with `row_start` set to the physical line each one starts on."""
        while True:
            self.row_start = self.csv_line + 1  # the next line not yet read
            self.row_bytes = 0
            row = next(rows, None)
            if row is None:
                return
            yield row

    def _csv_example(self, record: dict[str, str]) -> None:
        # Through the same validator as a JSONL line, so both syntaxes say the same things.
        raw = json.dumps(record).encode()
        if (example := self.found.scan(raw, self.row_start)) is not None:
            self._count(example)

    def _csv_problem(self, exc: csv.Error) -> str:
        if "unexpected end of data" in str(exc):
            return (
                f"not valid CSV ({exc}): the quoted field of the row that starts on line "
                f"{self.row_start} is never closed"
            )
        return f"not valid CSV ({exc})"

    # -- both ----------------------------------------------------------------------------

    def _count(self, example: Example) -> None:
        """Count a valid example, unless it breaks a per-file rule or a limit."""
        if (problem := self._shape_problem(example)) is not None:
            self.found.add_error(problem)
            return
        self._admit(example.line)
        self.stats.add(example)

    def _admit(self, number: int) -> None:
        """Refuse the file at the first example past `max_examples`."""
        if self.stats.examples == self.max_examples:
            self.found.add_error(
                LineError(number, f"is past the limit of {self.max_examples} examples per file")
            )
            self._reject()  # no point reading on

    def _shape_problem(self, example: Example) -> LineError | None:
        """Classification: all single texts or all text_a/text_b pairs (trained as one batch
        shape; the engine reads the first example's)."""
        if example.format is not DataFormat.CLASSIFICATION or not self.stats.examples:
            return None
        pair, file_pairs = "text_a" in example.record, self.stats.pair_examples > 0
        if pair == file_pairs:
            return None
        shapes = ("a single text", "a text_a/text_b pair")
        return LineError(
            example.line,
            f"is {shapes[pair]} but the file's first example is {shapes[file_pairs]}; "
            "use one shape per file",
            "text_a" if pair else "text",
        )

    def _too_long(self, number: int) -> None:
        self.found.add_error(
            LineError(number, f"is longer than the limit of {self.max_line_bytes} bytes")
        )

    def _reject(self) -> None:
        total = self.found.total_errors
        raise InvalidFile(
            f"{total} problem{'s' if total != 1 else ''} found",
            errors=[ErrorItem(e.message, field=e.field, line=e.line) for e in self.found.errors],
            param="file",
            extra={"total_errors": total},
        )


def _each_line(batches: Iterable[_Batch]) -> Iterator[_Line]:
    """The batches' lines one at a time, numbered."""
    for batch in batches:
        yield from batch.each()


def _starts_object(line: bytes) -> bool:
    """A JSONL line starts with `{` (after blanks and a UTF-8 byte order mark)."""
    return line.lstrip().startswith((b"{", b"\xef\xbb\xbf{"))

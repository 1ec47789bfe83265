"""Reading an upload once: spooled to a temporary file, hashed, and validated line by line.

Each chunk goes to a temporary file and the SHA-256, and its lines go to the engine's
validator (DESIGN §6). JSONL is checked a line at a time; CSV (classification only; a file
is CSV when its first non-blank line does not start with `{`, as the engine decides) goes
through the engine's CSV rules (`peft_engine.data.csv_rows`) a physical line at a time, so
a quoted field may span lines and errors still name physical lines. Memory holds one line
(or one CSV row) at most, never the file. An image line's inline image is decoded once
(`tuneq.files.images`); text lines never meet that code.

An upload whose first bytes are a zip's or a gzip's is an image dataset in an archive
(`tuneq.files.archive_scan`): a tar.gz is validated as it streams in, beside the spool; a
zip once spooled whole (its directory is at its end).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import queue
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Self, cast

from peft_engine.data.csv_rows import CsvRows, starts_json_object
from peft_engine.data.examples import DataFormat, Example
from peft_engine.data.formats import ScanReport
from peft_engine.errors import LineError
from tuneq.errors import ErrorItem, InvalidFile, PayloadTooLarge
from tuneq.files import archives, chat_lines
from tuneq.files.archive_scan import scan_tar_gz, scan_zip
from tuneq.files.images import ImageLimits, ImageRefused, inline_image, looks_like_path
from tuneq.files.report import FileStats, Syntax
from tuneq.settings import Settings


@dataclass
class IngestedUpload:
    """A valid upload in a temporary file; leaving the `with` block removes the file
    (unless the store has taken it already)."""

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
    and InvalidFile listing the first problems with their line numbers (or archive
    members). Either way, and on any other error, the temporary file is gone.
    """
    tmp_dir = settings.home / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-", suffix=".jsonl")
    path = Path(name)
    try:
        syntax, chunks = archives.sniff(chunks)
        with os.fdopen(fd, "wb") as out:
            spool = _Spool(out, settings.max_upload_bytes)
            try:
                if syntax is None:
                    scanner = _UploadScanner(spool, settings)
                    scanner.scan(chunks)
                elif syntax == "tar.gz":
                    scanned = scan_tar_gz(_spooled(chunks, spool), settings)
                else:  # a zip is read once whole, from disk
                    collections.deque(_spooled(chunks, spool), maxlen=0)
            finally:
                sha256 = spool.close()
        if syntax is None:
            return scanner.finish(path, sha256)
        if syntax == "zip":
            scanned = scan_zip(path, settings)
        return IngestedUpload(
            path=path,
            sha256=sha256,
            bytes=spool.size,
            format=DataFormat.IMAGE_CLASSIFICATION,
            examples=scanned.examples,
            report=scanned.report,
        )
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _spooled(chunks: Iterable[bytes], spool: _Spool) -> Iterator[bytes]:
    """An archive's chunks, each kept (and counted against the size limit) as it passes."""
    for chunk in chunks:
        spool.write(chunk)
        yield chunk


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
    """A CSV line over the limit: the rest cannot be parsed reliably (already reported)."""


class _Spool:
    """Hashes an upload and writes it to its temporary file, the writing in a thread of its
    own. At most `depth` chunks wait to be written.

    Both release the GIL. The write (the slower: page cache) runs beside the line validation
    (Python, holding the GIL) on another core. The hash runs in the caller's thread, where
    it leaves the GIL to the event loop reading the body on: in the spool's thread it would
    add GIL hand-offs a chunk, each waiting behind the validation (bench/README.md).
    """

    def __init__(self, out: BinaryIO, max_bytes: int, depth: int = 8) -> None:
        self._out = out
        self._max_bytes = max_bytes
        self.size = 0
        self._digest = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="upload-spool", daemon=True)
        self._thread.start()

    def write(self, chunk: bytes) -> None:
        """Keep the chunk; PayloadTooLarge once the upload passes the limit."""
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise PayloadTooLarge(
                f"the file is larger than the limit of {self._max_bytes} bytes", param="file"
            )
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
        self.max_line_bytes = settings.max_line_bytes
        self.max_examples = settings.max_examples
        self.image_limits = ImageLimits.of(settings)
        self.line = bytearray()  # the line being read, up to max_line_bytes
        self.line_too_long = False
        self.found = ScanReport()  # format and errors only: examples are counted, not kept
        self.stats = FileStats()
        self.syntax: Syntax = "jsonl"

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
                if data is None or starts_json_object(data):
                    self._scan_jsonl(rest)
                else:
                    self.syntax = "csv"
                    self._scan_csv(_each_line(rest))
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
            bytes=self.spool.size,
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
            self.spool.write(chunk)
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

    def _scan_csv(self, lines: Iterator[_Line]) -> None:
        """Validate CSV rows as their lines arrive; after a problem that leaves the rest
        unparseable, the remaining lines are still read (stored, hashed, length-checked)."""
        rows = CsvRows(
            self._csv_lines(lines),
            add_error=self.found.add_error,
            max_row_bytes=self.max_line_bytes,
        )
        try:
            for line, record in rows:
                if (example := self.found.check_record(record, line)) is not None:
                    self._count(example)
        except _StopParsing:
            pass
        for line in lines:
            if line.data is None:
                self._too_long(line.number)

    def _csv_lines(self, lines: Iterable[_Line]) -> Iterator[tuple[int, bytes]]:
        for number, data in lines:
            if data is None:
                self._too_long(number)
                raise _StopParsing  # its content is gone: where its quotes end is unknown
            yield number, data

    # -- both ----------------------------------------------------------------------------

    def _count(self, example: Example) -> None:
        """Count a valid example, unless it breaks a per-file rule or a limit."""
        if (problem := self._shape_problem(example)) is not None:
            self.found.add_error(problem)
            return
        if example.format is DataFormat.IMAGE_CLASSIFICATION:
            self._count_image(example)
            return
        self._admit(example.line)
        self.stats.add(example)

    def _count_image(self, example: Example) -> None:
        """An image line carries its image inline: decoded once here. A file name cannot be
        resolved from a lone JSONL upload, so it is refused saying what to send instead."""
        value = example.record["image"]
        try:
            if looks_like_path(value):
                raise ImageRefused(
                    f"{value[:80]!r} names a file, but a JSONL upload carries its images "
                    "inline (base64 or a data:image/...;base64, URI); to name image files, "
                    "upload a .zip or .tar.gz holding the JSONL and its images"
                )
            image = inline_image(value, self.image_limits)
        except ImageRefused as problem:
            self.found.add_error(LineError(example.line, str(problem), "image"))
            return
        self._admit(example.line)
        self.stats.add(example)
        self.stats.images.add(image)

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

"""Datasets: upload (validated while it streams in), list, read, delete, local copies.

An upload is read once: each chunk goes to a temporary file, the SHA-256 and the size,
and its lines go to the engine's validator (DESIGN §6). Memory holds one line at most,
never the file. Only a valid file reaches the store, and its row is
inserted only after the object is there, so a row never points at nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from peft_engine.data.formats import DataFormat, Example, ScanReport
from peft_engine.errors import LineError
from tuneq.errors import Conflict, ErrorItem, InvalidFile, InvalidRequest, NotFound, PayloadTooLarge
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
    """A valid upload in a temporary file; leaving the `with` block removes the file."""

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
            scanner = _UploadScanner(out, settings)
            for chunk in chunks:
                scanner.feed(chunk)
            return scanner.finish(path)
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
    store.put_file(key, upload.path)
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
    """A local copy of the file's content, downloaded once: files never change."""
    path = cache_dir / "files" / f"{file.id}.jsonl"
    if not path.is_file():
        store.get_file(file.storage_key, path)  # atomic: a reader never sees half a file
    return path


@dataclass
class _Stats:
    """The counts kept in a file's report."""

    lines: int = 0
    examples: int = 0
    max_example_chars: int = 0
    messages_by_role: Counter[str] = field(default_factory=Counter)

    def add(self, example: Example) -> None:
        self.examples += 1
        record = example.record
        if example.format is DataFormat.CHAT:
            self.messages_by_role.update(m["role"] for m in record["messages"])
            chars = sum(len(m["content"]) for m in record["messages"])
        elif example.format is DataFormat.PROMPT_COMPLETION:
            chars = len(record["prompt"]) + len(record["completion"])
        else:
            chars = len(record["text"])
        self.max_example_chars = max(self.max_example_chars, chars)

    def as_report(self, data_format: DataFormat) -> dict[str, Any]:
        report: dict[str, Any] = {
            "lines": self.lines,
            "examples": self.examples,
            "max_example_chars": self.max_example_chars,
        }
        if data_format is DataFormat.CHAT:
            report["messages_by_role"] = dict(sorted(self.messages_by_role.items()))
        return report


class _UploadScanner:
    """Splits chunks into lines as they come and validates each line as it completes."""

    def __init__(self, out: BinaryIO, settings: Settings) -> None:
        self.out = out
        self.max_upload_bytes = settings.max_upload_bytes
        self.max_line_bytes = settings.max_line_bytes
        self.max_examples = settings.max_examples
        self.digest = hashlib.sha256()
        self.size = 0
        self.line = bytearray()  # the line being read, up to max_line_bytes
        self.line_too_long = False
        self.found = ScanReport()  # format and errors only: examples are counted, not kept
        self.stats = _Stats()

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_upload_bytes:
            raise PayloadTooLarge(
                f"the file is larger than the limit of {self.max_upload_bytes} bytes",
                param="file",
            )
        self.digest.update(chunk)
        self.out.write(chunk)
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            self._extend_line(chunk[start:end])
            self._end_line()
            start = end + 1
        self._extend_line(chunk[start:])

    def finish(self, path: Path) -> IngestedUpload:
        if self.line or self.line_too_long:  # a last line without a newline
            self._end_line()
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
            sha256=self.digest.hexdigest(),
            bytes=self.size,
            format=self.found.format,
            examples=self.stats.examples,
            report=self.stats.as_report(self.found.format),
        )

    def _extend_line(self, piece: bytes) -> None:
        if self.line_too_long:
            return
        if len(self.line) + len(piece) > self.max_line_bytes:
            self.line_too_long = True
            self.line.clear()
            return
        self.line += piece

    def _end_line(self) -> None:
        self.stats.lines += 1
        number = self.stats.lines
        if self.line_too_long:
            self.found.add_error(
                LineError(number, f"is longer than the limit of {self.max_line_bytes} bytes")
            )
        elif (example := self.found.scan(bytes(self.line), number)) is not None:
            if self.stats.examples == self.max_examples:
                self.found.add_error(
                    LineError(number, f"is past the limit of {self.max_examples} examples per file")
                )
                self._reject()  # no point reading on
            self.stats.add(example)
        self.line.clear()
        self.line_too_long = False

    def _reject(self) -> None:
        total = self.found.total_errors
        raise InvalidFile(
            f"{total} problem{'s' if total != 1 else ''} found",
            errors=[ErrorItem(e.message, field=e.field, line=e.line) for e in self.found.errors],
            param="file",
            extra={"total_errors": total},
        )

"""Datasets: upload (validated while it streams in), list, read, delete, local copies.

`upload_file` is the one way a dataset comes in, whichever road it takes (the native
`POST /files`, the OpenAI-compatible facade): the upload is read once and validated
(`tuneq.files.ingest`), the Idempotency-Key claimed, and only a valid file reaches the
store, its row inserted only after the object is there, so a row never points at nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from peft_engine.errors import DataError
from tuneq.audit.service import Actor, record
from tuneq.db import transaction
from tuneq.errors import Conflict, ErrorItem, InvalidFile, InvalidRequest, NotFound
from tuneq.files.archive_rules import ArchiveLimits, ArchiveSyntax
from tuneq.files.archives import ARCHIVE_SYNTAXES, extract_archive
from tuneq.files.cache import FileCache
from tuneq.files.ingest import ingest_upload
from tuneq.files.models import File
from tuneq.files.schemas import FilePublic
from tuneq.idempotency.service import idempotent, request_hash
from tuneq.ids import new_id
from tuneq.jobs.models import Job
from tuneq.jobs.states import TERMINAL
from tuneq.quotas.service import check_storage
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team

PURPOSES = frozenset({"fine-tune"})
DEFAULT_PURPOSE = "fine-tune"
# The Idempotency-Key scope of an upload, on every road in: a key retried on another road
# still finds the file it made.
UPLOAD_METHOD_PATH = "POST /files"
_ENTRY_FILE = ".tuneq-entry"  # in an extracted archive: the path the engine reads there


class IncomingUpload(Protocol):
    """A dataset as it arrives. Its name and purpose are known once its chunks have all
    been read: a multipart body may send them after the file."""

    @property
    def filename(self) -> str: ...

    @property
    def purpose(self) -> str | None: ...

    def file_chunks(self) -> Iterator[bytes]: ...


def upload_file(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    settings: Settings,
    team: Team,
    upload: IncomingUpload,
    idempotency_key: str | None,
    actor: Actor | None = None,
) -> dict[str, Any]:
    """Read, validate and keep an upload; the new file as the API shows it (`FilePublic`).

    Blocking work (it reads the whole upload): call it off the event loop. An earlier
    upload under the same Idempotency-Key gives back the file it made, unchanged. Raises
    PayloadTooLarge, InvalidFile (the first problems, with their line numbers),
    InvalidRequest (purpose) and the idempotency errors; whatever fails, nothing is left
    behind, neither in the store nor in the database, and the key may be used again.
    """
    with sessions() as db:  # a team at its cap is refused before the body is read
        check_storage(db, settings, team, incoming=1, lock=False)
    with ingest_upload(chunks=upload.file_chunks(), settings=settings) as ingested:
        purpose = DEFAULT_PURPOSE if upload.purpose is None else upload.purpose
        # The content's hash is known only now, so the key is claimed after reading the
        # body and before storing anything.
        fingerprint = request_hash(UPLOAD_METHOD_PATH, ingested.sha256, upload.filename, purpose)
        with idempotent(
            sessions,
            team_id=team.id,
            key=idempotency_key,
            method_path=UPLOAD_METHOD_PATH,
            fingerprint=fingerprint,
        ) as request:
            if request.replay is not None:
                return request.replay.body
            _check_purpose(purpose)
            file_id = new_id("file")
            key = f"files/{team.id}/{file_id}"
            try:
                with transaction(sessions) as db:
                    check_storage(db, settings, team, incoming=ingested.bytes)
                    # The temporary file is the store's now (or gone).
                    store.move_file(key, ingested.path)
                    file = File(
                        id=file_id,
                        team_id=team.id,
                        filename=upload.filename,
                        purpose=purpose,
                        bytes=ingested.bytes,
                        sha256=ingested.sha256,
                        storage_key=key,
                        format=str(ingested.format),
                        examples=ingested.examples,
                        report=ingested.report,
                    )
                    db.add(file)
                    db.flush()
                    record(db, actor, "file.upload", file.id)
                    public = FilePublic.of(file).model_dump(mode="json")
                    request.record(db, 201, public)
            except BaseException:
                store.delete(
                    key
                )  # no object without its row, whether the insert or the commit failed
                raise
    return public


def _check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        allowed = ", ".join(sorted(PURPOSES))
        raise InvalidRequest(
            f"purpose must be one of: {allowed}",
            errors=[ErrorItem(f"{purpose!r} is not one of: {allowed}", field="purpose")],
            param="purpose",
        )


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


def delete_file(
    *,
    db: Session,
    store: ObjectStore,
    team: Team,
    file_id: str,
    actor: Actor | None = None,
    cache: FileCache | None = None,
) -> File:
    """Delete the row, then the object, then this host's copy (in `cache`; the workers'
    copies age out of theirs); refused while an unfinished job uses the file."""
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
    record(db, actor, "file.delete", file.id)
    db.flush()
    store.delete(file.storage_key)
    if cache is not None:
        cache.evict(file.id)
    return file


def file_cache(settings: Settings) -> FileCache:
    """This host's copies of files (`local_copy`), bounded by TUNEQ_FILE_CACHE_BYTES."""
    return FileCache(settings.resolved_work_dir / "files", settings.file_cache_bytes)


@contextmanager
def held_copy(store: ObjectStore, file: File, settings: Settings) -> Iterator[Path]:
    """`local_copy`, held against eviction until the block ends; then the cache is pruned
    to its bound (this copy counts, and stays)."""
    cache = file_cache(settings)
    with cache.hold(file.id):
        path = local_copy(store, file, settings.resolved_work_dir)
        cache.prune()
        yield path


def local_copy(store: ObjectStore, file: File, cache_dir: Path) -> Path:
    """A local copy of the file's content, downloaded once: files never change.

    The suffix follows the content (`.csv` or `.jsonl`); the engine sniffs it anyway. An
    archive (an image dataset) is extracted to `files/{id}/` instead, and the path returned
    is what the engine reads there: the image folder's root, or the JSONL manifest.
    """
    syntax = (file.report or {}).get("syntax")
    if syntax in ARCHIVE_SYNTAXES:
        return _extracted_copy(store, file, syntax, cache_dir / "files")
    suffix = ".csv" if syntax == "csv" else ".jsonl"
    path = cache_dir / "files" / f"{file.id}{suffix}"
    if not path.is_file():
        store.get_file(file.storage_key, path)  # atomic: a reader never sees half a file
    return path


def _extracted_copy(store: ObjectStore, file: File, syntax: ArchiveSyntax, files_dir: Path) -> Path:
    """The archive's dataset, extracted once under `files_dir/{id}/`.

    Downloaded and extracted in a temporary folder beside the target, then renamed into
    place, so neither a concurrent caller nor a crash ever leaves half a folder there (of
    two racing callers, the second drops its copy). The download must be the object the
    upload validated (its SHA-256), and its members pass the archive rules again, bounded
    by the report's counts; the ratio limit, which guards what an archive may unpack to
    before its size is known, adds nothing then. The path the engine reads is kept in a
    hidden file beside the data (the engine skips hidden entries).
    """
    target = files_dir / file.id
    if not target.is_dir():
        files_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=files_dir, prefix=f".{file.id}-"))
        try:
            archive, tree = work / "archive", work / "tree"
            store.get_file(file.storage_key, archive)
            tree.mkdir()
            entry = _extract(file, syntax, archive, tree)
            (tree / _ENTRY_FILE).write_text(entry)
            archive.unlink()
            try:
                os.rename(tree, target)
            except OSError:  # another caller's copy is there already: the same data
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target / (target / _ENTRY_FILE).read_text()


def _extract(file: File, syntax: ArchiveSyntax, archive: Path, tree: Path) -> str:
    report = file.report or {}
    limits = ArchiveLimits(report["members"], report["unpacked_bytes"], math.inf)
    try:
        if _sha256(archive) != file.sha256:
            raise InvalidFile("its content is not what was uploaded (the SHA-256 differs)")
        return extract_archive(syntax, archive, tree, limits)
    except InvalidFile as err:
        raise DataError(f"file {file.id} cannot be extracted: {err.detail}", param="file") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()

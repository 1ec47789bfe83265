"""The local copies of uploaded files: downloaded once, held while read, pruned by size.

Every host that reads datasets keeps copies under `{work_dir}/files/`: a worker for its
jobs, the API for a dry run's estimate. A copy is `{id}.jsonl` or `{id}.csv`, or `{id}/`
for an extracted archive. Files never change, so one copy serves every job that names the
file; without a bound the copies would fill the disk, so the cache keeps at most
`TUNEQ_FILE_CACHE_BYTES` and evicts the least recently used copies first.

A copy in use is never evicted. Its user holds a shared `flock` on `files/.locks/{id}` for
as long as it reads the copy: a job holds it for its whole run, since an image dataset is
read batch by batch. Eviction takes that lock exclusively and does not wait, so it skips a
copy held by any process on the host. The kernel drops a lock with its process, so a
killed worker pins nothing. The lock file's mtime is the copy's last use.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCKS = ".locks"
STALE_SECONDS = 24 * 3600.0  # a half-written download or extraction older than this is dead
_COPY_SUFFIXES = (".jsonl", ".csv")
SIZE_FILE = ".tuneq-size"


class FileCache:
    def __init__(self, files_dir: Path, max_bytes: int) -> None:
        self.files_dir = files_dir
        self.max_bytes = max_bytes
        self.locks_dir = files_dir / LOCKS

    @contextlib.contextmanager
    def hold(self, file_id: str) -> Iterator[None]:
        """Hold the file's copy (there or yet to be made) against eviction for the block."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        lock = self.locks_dir / file_id
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            # An eviction may have removed this lock file between our open and our lock:
            # then we hold a lock on nothing; open the new one.
            if _is_current(fd, lock):
                break
            os.close(fd)
        try:
            os.utime(fd)  # used now: the last to be evicted
            yield
        finally:
            os.close(fd)  # and the lock with it

    def prune(self) -> list[str]:
        """Evict the least recently used copies no one holds until the rest fit the bound;
        returns the ids evicted. Also clears what a killed download left behind."""
        self._clear_stale()
        entries = self._entries()
        total = sum(size for _, _, size in entries)
        evicted = []
        for file_id, _, size in sorted(entries, key=lambda entry: entry[1]):
            if total <= self.max_bytes:
                break
            if self.evict(file_id):
                total -= size
                evicted.append(file_id)
        if evicted:
            log.info("file cache: evicted %d copies; %d bytes kept", len(evicted), total)
        return evicted

    def evict(self, file_id: str) -> bool:
        """Remove the file's copy unless someone holds it; True if it is gone.

        Always through the lock, made if missing (a copy never held): a holder may be
        making the copy under a lock file that did not exist a moment ago."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        lock = self.locks_dir / file_id
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use
            if not _is_current(fd, lock):
                return False  # another eviction's, just removed: a holder may hold the new one
            for path in _copies(self.files_dir, file_id):
                _remove(path)
            lock.unlink()  # while locked: see hold()
            return True
        finally:
            os.close(fd)

    def _entries(self) -> list[tuple[str, float, int]]:
        """(file id, last use, bytes) of each copy."""
        entries: dict[str, tuple[float, int]] = {}
        if not self.files_dir.is_dir():
            return []
        for path in self.files_dir.iterdir():
            if path.name.startswith("."):
                continue
            file_id = path.name.removesuffix(path.suffix) if path.is_file() else path.name
            used, size = entries.get(file_id, (0.0, 0))
            entries[file_id] = (max(used, self._last_use(file_id, path)), size + _size(path))
        return [(file_id, used, size) for file_id, (used, size) in entries.items()]

    def _last_use(self, file_id: str, path: Path) -> float:
        try:
            return (self.locks_dir / file_id).stat().st_mtime
        except FileNotFoundError:
            return path.stat().st_mtime

    def _clear_stale(self) -> None:
        """The temporary files and folders of downloads and extractions that a killed
        process left (a live one finishes long before STALE_SECONDS)."""
        if not self.files_dir.is_dir():
            return
        dead = time.time() - STALE_SECONDS
        for path in self.files_dir.glob(".*"):
            if path.name != LOCKS and path.lstat().st_mtime < dead:
                _remove(path)


def _is_current(fd: int, lock: Path) -> bool:
    """Whether the open lock file is still the one at `lock` (not removed or replaced)."""
    try:
        return os.fstat(fd).st_ino == os.stat(lock).st_ino
    except FileNotFoundError:
        return False


def _copies(files_dir: Path, file_id: str) -> list[Path]:
    candidates = [files_dir / file_id, *(files_dir / f"{file_id}{s}" for s in _COPY_SUFFIXES)]
    return [path for path in candidates if path.exists()]


def _size(path: Path) -> int:
    """A copy's bytes. An extracted archive never changes, so its walk (thousands of images)
    is done once and its sum kept in a hidden file inside it (the engine skips those)."""
    if path.is_file():
        return path.stat().st_size
    memo = path / SIZE_FILE
    try:
        return int(memo.read_text())
    except (OSError, ValueError):
        pass
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    with contextlib.suppress(OSError):  # an eviction racing us: the copy is going anyway
        memo.write_text(str(size))
    return size


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

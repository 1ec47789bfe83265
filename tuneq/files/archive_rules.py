"""The rules every member of an uploaded archive passes, whatever the archive's syntax.

`MemberRules` sees each member as the walk reaches it (`archives.walk_zip`,
`tar_stream.walk_tar_gz`) and refuses an archive bomb or an unsafe member at once, before
anything is kept: too many members, too many bytes unpacked, too high a compression ratio,
a path that leaves the folder it is extracted into (`..`, absolute, a Windows drive or
backslashes), links, device files and FIFOs, a name given twice.
"""

from __future__ import annotations

import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from tuneq.errors import ErrorItem, InvalidFile
from tuneq.settings import Settings

ArchiveSyntax = Literal["zip", "tar.gz"]
BLOCK_BYTES = 64 * 1024  # a member's data (and a tar stream) is read this much at a time
# Unpacked bytes any archive may produce beyond the ratio, so a small one is never refused
# for compressing well (a tar's headers and padding are mostly zeros).
RATIO_SLACK_BYTES = 1024 * 1024
# What a damaged archive makes the readers raise (OSError: zipfile's seeks, a bad gzip;
# NotImplementedError: a zip feature zipfile lacks, such as a later version or patched data).
UNREADABLE = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
)
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")
_ONLY_FILES = "an archive may hold only files and folders"


def refused(message: str, member: str | None = None) -> InvalidFile:
    """An archive refused at once, before anything is kept (a bomb or an unsafe member)."""
    detail = f"{member}: {message}" if member is not None else message
    return InvalidFile(
        f"the archive is refused: {detail}",
        errors=[ErrorItem(message, field="file", member=member)],
        param="file",
        extra={"total_errors": 1},
    )


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int
    max_bytes: int
    max_ratio: float

    @classmethod
    def of(cls, settings: Settings) -> ArchiveLimits:
        return cls(
            settings.max_archive_members, settings.max_archive_bytes, settings.max_compression_ratio
        )


@dataclass(slots=True)
class Member:
    """One member of an archive: `name` is its normalised path (no `./`, `/`-separated).

    `hidden` members (`.DS_Store`, anything under `__MACOSX/` or a dot folder) are walked and
    checked like the others, then left out of the dataset. `blocks()` reads the data (a
    file's, once); a member not read is skipped by the walk.
    """

    name: str
    size: int
    is_dir: bool
    hidden: bool
    blocks: Callable[[], Iterator[bytes]] = lambda: iter(())


class MemberRules:
    """The checks every member passes, as it comes, whatever the archive's syntax."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.members = 0
        self.unpacked = 0  # the files' sizes, as their headers declare them
        self._files: set[str] = set()
        self._folders: set[str] = set()

    def admit(self, raw_name: str, kind: str, size: int) -> Member | None:
        """The member's normalised name, and the archive refused if this member breaks a
        rule. `kind` is "file", "dir", or what else it is (refused). None for the archive's
        own root folder (`./`)."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise refused(f"it holds more than the limit of {self.limits.max_members} members")
        if kind not in ("file", "dir"):
            raise refused(f"is {kind}: {_ONLY_FILES}", raw_name)
        parts = safe_parts(raw_name)
        if not parts:
            return None
        name = "/".join(parts)
        self._no_clash(name, parts, kind == "file")
        if kind == "file":
            self.unpacked += size
            if self.unpacked > self.limits.max_bytes:
                raise refused(
                    f"its members hold more than the limit of {self.limits.max_bytes} bytes "
                    "unpacked"
                )
        return member_of(parts, size, kind == "dir", name)

    def check_ratio(self, unpacked: int, packed: int, member: str | None = None) -> None:
        """Refuse more than `max_ratio` bytes unpacked per byte packed (plus a slack)."""
        if unpacked > self.limits.max_ratio * packed + RATIO_SLACK_BYTES:
            what = "unpacks" if member is not None else "the archive unpacks"
            raise refused(
                f"{what} to {unpacked} bytes from {packed}, a compression ratio over the "
                f"limit of {self.limits.max_ratio:g}",
                member,
            )

    def _no_clash(self, name: str, parts: list[str], is_file: bool) -> None:
        """A file may appear once, and never where a folder is (or the other way round):
        extracting it would overwrite, or fail half way."""
        folders = ["/".join(parts[:n]) for n in range(1, len(parts))]
        if (
            name in self._files
            or (is_file and name in self._folders)
            or any(folder in self._files for folder in folders)
        ):
            raise refused("appears twice, or both as a file and as a folder", name)
        self._folders.update(folders)
        if is_file:
            self._files.add(name)
        else:
            self._folders.add(name)


def member_of(parts: list[str], size: int, is_dir: bool, name: str | None = None) -> Member:
    """The member whose path is `parts` (from `safe_parts`), without its data yet; `name`,
    when the caller has joined the parts already, is kept rather than a second copy (an
    archive's names are held until its end: bench/archive_upload.py)."""
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return Member(name or "/".join(parts), 0 if is_dir else size, is_dir, hidden)


def safe_parts(raw_name: str) -> list[str]:
    """The member's path as parts, or the archive refused when it could leave the folder
    it is extracted into: absolute, through `..`, a Windows drive or backslashes, a NUL."""
    if "\x00" in raw_name:
        raise refused("has a NUL character in its name", raw_name)
    if "\\" in raw_name or _WINDOWS_DRIVE.match(raw_name):
        raise refused("is a Windows path (a drive or backslashes)", raw_name)
    if raw_name.startswith("/"):
        raise refused("is an absolute path", raw_name)
    # Split by hand: PurePosixPath would intern every part of every name, for good.
    parts = [part for part in raw_name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise refused("points outside the archive's folder ('..')", raw_name)
    return parts


def broken(syntax: ArchiveSyntax, exc: BaseException) -> InvalidFile:
    """A damaged archive: a bad header, a truncated or corrupt stream, a bad CRC."""
    message = f"is not a valid {syntax} archive ({exc or type(exc).__name__})"
    if syntax == "tar.gz":
        message += "; a gzip upload must be a tar.gz archive of images"
    return InvalidFile(
        f"the file {message}",
        errors=[ErrorItem(message, field="file")],
        param="file",
        extra={"total_errors": 1},
    )


def member_reader(
    syntax: ArchiveSyntax, open_member: Callable[[], Any]
) -> Callable[[], Iterator[bytes]]:
    """`blocks` for a member opened by `open_member`: its data a block at a time."""

    def blocks() -> Iterator[bytes]:
        try:
            with open_member() as handle:
                while block := handle.read(BLOCK_BYTES):
                    yield block
        except UNREADABLE as exc:
            raise broken(syntax, exc) from None

    return blocks

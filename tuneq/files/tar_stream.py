"""Reading a tar.gz as it streams in, a member at a time, under `MemberRules`.

tarfile reads the tar in stream mode ("r|": never seeking back) from `_Inflated`, which
inflates the gzip itself rather than leaving it to tarfile ("r|gz"): so every unpacked
byte tarfile reads, its headers and padding included, is counted against the compressed
bytes read so far, and each step inflates a bounded amount (a bomb of zeros is refused
within a block, never inflated whole).
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from tuneq.files.archive_rules import (
    BLOCK_BYTES,
    UNREADABLE,
    Member,
    MemberRules,
    broken,
    member_reader,
    refused,
)

# The most a tar's metadata record (a long name, a pax header) may hold: tarfile reads one
# whole, before any member is seen.
MAX_TAR_METADATA_BYTES = 1024 * 1024
_INFLATE_INPUT_BYTES = 64 * 1024  # compressed bytes inflated per step: bounds the copying
_TAR_METADATA = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


def walk_tar_gz(compressed: Iterable[bytes], rules: MemberRules) -> Iterator[Member]:
    """The members of a tar.gz as its compressed bytes arrive, never holding more than a
    block of data (and one image, when the caller reads one whole).

    tarfile reads the tar in stream mode ("r|", no seeking back) from `_Inflated`, which
    inflates the gzip itself: so every unpacked byte tarfile reads (headers and padding
    included) is counted against the compressed bytes read so far, and a bomb is refused
    within a block of data. A member's data is read by the caller or skipped by tarfile,
    through the same counting.
    """
    inflated = _Inflated(compressed, rules)
    try:
        with tarfile.open(
            fileobj=inflated, mode="r|", tarinfo=_BoundedTarInfo, bufsize=BLOCK_BYTES
        ) as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header otherwise: memory grows
                member = rules.admit(info.name, _tar_kind(info), info.size)
                if member is None:
                    continue
                if info.isfile():
                    member.blocks = member_reader("tar.gz", lambda i=info: tar.extractfile(i))
                yield member
    except UNREADABLE as exc:
        raise broken("tar.gz", exc) from None


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.issparse():
        return "a sparse file"
    if info.isfile():
        return "file"
    if info.isdir():
        return "dir"
    return "a device file, FIFO or socket"


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose metadata records (long names, pax headers) are refused over
    MAX_TAR_METADATA_BYTES: tarfile reads each whole, before its member reaches us."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in _TAR_METADATA and self.size > MAX_TAR_METADATA_BYTES:
            raise refused(
                f"holds a metadata record (a long name, a pax header) of {self.size} bytes, "
                f"over the limit of {MAX_TAR_METADATA_BYTES}"
            )
        return super()._proc_member(tarfile_)


class _Inflated:
    """The gzip stream, inflated as tarfile reads it: `read(n)` inflates at most n bytes
    from the compressed chunks as they come, checking the ratio of what it produced so far
    against what it consumed. A gzip of several members (pigz, cat) is read on."""

    def __init__(self, compressed: Iterable[bytes], rules: MemberRules) -> None:
        self._chunks = iter(compressed)
        self._rules = rules
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""  # the chunk being inflated: from `_offset` on, not yet inflated
        self._offset = 0
        self._ended = False  # the last gzip member has ended
        self.packed = 0
        self.unpacked = 0

    def read(self, size: int = -1) -> bytes:
        size = min(size, BLOCK_BYTES) if size > 0 else BLOCK_BYTES  # 0 would inflate it all
        while not self._ended:
            if self._inflater.unconsumed_tail:
                data = self._inflater.decompress(self._inflater.unconsumed_tail, size)
            elif self._inflater.eof:
                self._ended = not self._next_gzip_member()
                continue
            elif piece := self._next_piece():
                self.packed += len(piece)
                data = self._inflater.decompress(piece, size)
            else:
                return b""  # tarfile reports the truncated stream
            if data:
                self.unpacked += len(data)
                self._rules.check_ratio(self.unpacked, self.packed)
                return data
        return b""

    def _next_piece(self) -> bytes:
        """The next compressed bytes to inflate, at most _INFLATE_INPUT_BYTES (the inflater
        copies what it leaves unconsumed, each step)."""
        while self._offset >= len(self._pending):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending, self._offset = chunk, 0
        end = self._offset + _INFLATE_INPUT_BYTES
        piece = self._pending[self._offset : end]
        self._offset = end
        return piece

    def _next_gzip_member(self) -> bool:
        """After a gzip member's end: whether another follows (anything else is ignored,
        as gzip ignores trailing zeros)."""
        rest = self._inflater.unused_data + self._pending[self._offset :]
        while len(rest) < 2 and (chunk := next(self._chunks, None)) is not None:
            rest += chunk
        self._pending, self._offset = rest, 0
        if not rest.startswith(b"\x1f\x8b"):
            return False
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        return True

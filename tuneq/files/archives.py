"""Image datasets uploaded as archives: telling one, walking its members, its layout.

An upload is an archive when its first bytes are a zip's (`PK\\x03\\x04`) or gzip's
(`\\x1f\\x8b`, a tar.gz); the name it was sent under plays no part. Its members are walked
one at a time (`walk_zip` here, `tar_stream.walk_tar_gz`) under `archive_rules.MemberRules`,
which refuses an archive bomb or an unsafe member at once. The same walk validates an
upload (`archive_scan`) and extracts a stored archive for a job (`extract_archive`): the
stored object is checked again, never trusted.

A dataset's layout (`find_layout`) is an image folder (`<label>/<image>`, inside at most
one wrapper folder) or a JSONL manifest whose lines name images of the archive.
"""

from __future__ import annotations

import itertools
import os
import stat
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from peft_engine.data.images import IMAGE_SUFFIXES
from tuneq.files.archive_rules import (
    BLOCK_BYTES,
    UNREADABLE,
    ArchiveLimits,
    ArchiveSyntax,
    Member,
    MemberRules,
    broken,
    member_of,
    member_reader,
    refused,
    safe_parts,
)
from tuneq.files.tar_stream import walk_tar_gz

ARCHIVE_SYNTAXES: tuple[ArchiveSyntax, ...] = ("zip", "tar.gz")
MAGIC: dict[bytes, ArchiveSyntax] = {b"PK\x03\x04": "zip", b"\x1f\x8b": "tar.gz"}
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def sniff(chunks: Iterable[bytes]) -> tuple[ArchiveSyntax | None, Iterator[bytes]]:
    """An upload's archive syntax from its first bytes (None for JSONL or CSV), and all its
    chunks again."""
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= max(map(len, MAGIC)):
            break
    syntax = next((syntax for magic, syntax in MAGIC.items() if head.startswith(magic)), None)
    return syntax, itertools.chain([head] if head else [], chunks)


def walk_zip(path: Path, rules: MemberRules) -> Iterator[Member]:
    """The members of a zip file, one at a time.

    A zip lists its members in its central directory, at its end, so it cannot be read as
    it streams in: the upload is spooled to disk whole first, then read from there. Every
    member is checked from the central directory (names, kinds, sizes, each member's
    compression ratio and the whole archive's) before any is decompressed; then each is
    read in blocks, never all at once.
    """
    try:
        archive = zipfile.ZipFile(path)
    except UNREADABLE as exc:
        raise broken("zip", exc) from None
    with archive:
        for info in archive.infolist():
            _check_zip_member(info, rules)
        rules.check_ratio(rules.unpacked, path.stat().st_size)
        for info in archive.infolist():
            if parts := safe_parts(info.filename):  # checked above; not kept, to save memory
                member = member_of(parts, info.file_size, info.is_dir())
                if not member.is_dir:
                    member.blocks = member_reader("zip", lambda i=info: archive.open(i))
                yield member


def _check_zip_member(info: zipfile.ZipInfo, rules: MemberRules) -> None:
    mode = stat.S_IFMT(info.external_attr >> 16)
    kind = "dir" if info.is_dir() else "file"
    if mode == stat.S_IFLNK:
        kind = "a symbolic link"
    elif mode not in (0, stat.S_IFREG, stat.S_IFDIR):
        kind = "a device file, FIFO or socket"
    member = rules.admit(info.filename, kind, info.file_size)
    if info.flag_bits & 0x1:
        raise refused("is encrypted", info.filename)
    if info.compress_type not in _ZIP_METHODS:
        raise refused(f"uses compression method {info.compress_type}, not read here", info.filename)
    if member is not None and not member.is_dir:
        rules.check_ratio(info.file_size, info.compress_size, member.name)


def walk(syntax: ArchiveSyntax, path: Path, rules: MemberRules) -> Iterator[Member]:
    """The members of an archive file on disk."""
    if syntax == "zip":
        return walk_zip(path, rules)
    return walk_tar_gz(_file_chunks(path), rules)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(BLOCK_BYTES):
            yield chunk


# ---------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """`kind` "image_folder": the label folders are in `root` ("" or a wrapper folder);
    "jsonl": `manifest` is the manifest's path, and `root` its folder."""

    kind: Literal["image_folder", "jsonl"]
    root: str
    manifest: str | None = None

    @property
    def entry(self) -> str:
        """What the engine reads, relative to the extracted archive."""
        return self.manifest if self.manifest is not None else self.root

    def relative(self, name: str) -> str | None:
        """A member's path from `root`; None for one outside it."""
        if not self.root:
            return name
        return name.removeprefix(self.root + "/") if name.startswith(self.root + "/") else None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def find_layout(files: list[str]) -> Layout:
    """The dataset's layout from its visible files' names.

    A `.jsonl` at the top (or inside the one folder that holds everything) is the manifest;
    there may be one. Otherwise it is an image folder; when every image sits at depth 3
    under one top folder, that folder wraps it (`digits/<label>/<image>`).
    """
    tops = {name.split("/", 1)[0] for name in files}
    wrapper = next(iter(tops)) if len(tops) == 1 and all("/" in f for f in files) else None
    manifests = [f for f in files if "/" not in f and f.endswith(".jsonl")]
    if not manifests and wrapper is not None:
        manifests = [f for f in files if f.count("/") == 1 and f.endswith(".jsonl")]
    if len(manifests) > 1:
        shown = ", ".join(manifests[:5])
        raise refused(f"it holds {len(manifests)} JSONL manifests ({shown}): keep one")
    if manifests:
        return Layout("jsonl", manifests[0].rpartition("/")[0], manifests[0])
    images = [f for f in files if is_image_name(f)]
    if images and wrapper is not None and all(f.count("/") == 2 for f in images):
        return Layout("image_folder", wrapper)
    return Layout("image_folder", "")


# ---------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------


def extract_archive(syntax: ArchiveSyntax, archive: Path, into: Path, limits: ArchiveLimits) -> str:
    """Extract the dataset's visible files into the empty folder `into`; the path the engine
    reads, relative to it (the image folder's root, or the manifest).

    Every member passes `MemberRules` again; files are created new (O_EXCL) without
    following links, and nothing but files and folders is ever made.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    files = []
    for member in walk(syntax, archive, MemberRules(limits)):
        if member.is_dir or member.hidden:
            continue
        target = into.joinpath(*member.name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
            for block in member.blocks():
                out.write(block)
        files.append(member.name)
    return find_layout(files).entry

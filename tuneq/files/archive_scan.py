"""Validating an image dataset uploaded as an archive, while it is read (DESIGN §6).

The members come one at a time from `archives` (which refuses bombs and unsafe members on
the way): every image is decoded once (`images.inspect_image`) and only its format, mode
and size kept; a candidate manifest (a `.jsonl` at the top, or one folder down) is read a
line at a time, its inline images decoded and its file names kept to look up at the end.
The layout is known only then (a tar.gz streams: its manifest may come after its images),
so the problems are gathered and reported all at once, up to the usual cap.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from peft_engine.data.examples import DataFormat
from peft_engine.data.formats import MAX_REPORTED_ERRORS, ScanReport
from peft_engine.data.images import IMAGE_SUFFIXES
from tuneq.errors import ErrorItem, InvalidFile
from tuneq.files.archive_rules import ArchiveLimits, ArchiveSyntax, Member, MemberRules
from tuneq.files.archives import Layout, find_layout, is_image_name, walk_zip
from tuneq.files.images import (
    ImageInfo,
    ImageLimits,
    ImageRefused,
    ImageStats,
    inline_image,
    inspect_image,
    looks_like_path,
)
from tuneq.files.tar_stream import walk_tar_gz
from tuneq.settings import Settings

_FOLDER = "an image folder is <label>/<image>"
_SUFFIXES = ", ".join(IMAGE_SUFFIXES)


@dataclass
class ArchiveScan:
    """A valid image archive: its examples and report."""

    examples: int
    report: dict[str, Any]


def scan_tar_gz(chunks: Iterable[bytes], settings: Settings) -> ArchiveScan:
    """Validate a tar.gz as its compressed chunks arrive; the chunks are read to their end
    (whatever follows the tar is kept with the file, unread)."""
    rules = MemberRules(ArchiveLimits.of(settings))
    chunks = iter(chunks)
    contents = _Contents(settings)
    for member in walk_tar_gz(chunks, rules):
        contents.take(member)
    for _ in chunks:
        pass
    return contents.finish("tar.gz", rules)


def scan_zip(path: Path, settings: Settings) -> ArchiveScan:
    """Validate a zip file already on disk (a zip cannot be read as it streams in: see
    `archives.walk_zip`), a member at a time."""
    rules = MemberRules(ArchiveLimits.of(settings))
    contents = _Contents(settings)
    for member in walk_zip(path, rules):
        contents.take(member)
    return contents.finish("zip", rules)


class _Problems:
    """The first problems (MAX_REPORTED_ERRORS) and how many there were."""

    def __init__(self) -> None:
        self.items: list[ErrorItem] = []
        self.total = 0

    def add(self, item: ErrorItem) -> None:
        self.total += 1
        if len(self.items) < MAX_REPORTED_ERRORS:
            self.items.append(item)

    def refuse(self) -> InvalidFile:
        return InvalidFile(
            f"{self.total} problem{'s' if self.total != 1 else ''} found",
            errors=self.items,
            param="file",
            extra={"total_errors": self.total},
        )


@dataclass
class _Manifest:
    """What one candidate manifest held: its labels and inline images counted, its file
    names (line, member) to look up once every member has been seen."""

    name: str
    examples: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    stats: ImageStats = field(default_factory=ImageStats)
    references: list[tuple[int, str]] = field(default_factory=list)
    problems: _Problems = field(default_factory=_Problems)


class _Contents:
    """The archive's visible files as they come, then its layout, problems and report."""

    def __init__(self, settings: Settings) -> None:
        self.limits = ImageLimits.of(settings)
        self.max_line_bytes = settings.max_line_bytes
        self.max_examples = settings.max_examples
        self.files: list[str] = []
        self.images: dict[str, ImageInfo | str] = {}  # an image's info, or its problem
        self._shared: dict[ImageInfo, ImageInfo] = {}  # one object per distinct info
        self.manifests: dict[str, _Manifest] = {}

    def take(self, member: Member) -> None:
        if member.is_dir or member.hidden:
            return
        self.files.append(member.name)
        if is_image_name(member.name):
            self.images[member.name] = self._image(member)
        elif member.name.endswith(".jsonl") and member.name.count("/") <= 1:
            self.manifests[member.name] = self._manifest(member)

    def _image(self, member: Member) -> ImageInfo | str:
        if member.size > self.limits.max_bytes:  # not read: the walk skips it
            return f"is {member.size} bytes, over the limit of {self.limits.max_bytes} bytes"
        try:
            info = inspect_image(b"".join(member.blocks()), self.limits)
        except ImageRefused as problem:
            return str(problem)
        return self._shared.setdefault(info, info)  # most images share a size and mode

    # -- a manifest ----------------------------------------------------------------------

    def _manifest(self, member: Member) -> _Manifest:
        manifest = _Manifest(member.name)
        folder = PurePosixPath(member.name).parent
        found = ScanReport()  # the engine's checks and words for each line
        for number, raw in _lines(member.blocks(), self.max_line_bytes):
            if raw is None:
                message = f"is longer than the limit of {self.max_line_bytes} bytes"
                manifest.problems.add(ErrorItem(message, line=number, member=member.name))
                continue
            example = found.scan(raw, number)
            for error in found.errors:
                item = ErrorItem(error.message, error.field, error.line, member.name)
                manifest.problems.add(item)
            found.errors.clear()
            if example is None:
                continue
            if example.format is not DataFormat.IMAGE_CLASSIFICATION:
                message = 'is not an image example ({"image": ..., "label": ...})'
                manifest.problems.add(ErrorItem(message, line=number, member=member.name))
                continue
            self._manifest_image(manifest, folder, number, example.record["image"])
            manifest.examples += 1
            manifest.labels[str(example.record["label"])] += 1
            if manifest.examples > self.max_examples:
                message = f"is past the limit of {self.max_examples} examples per file"
                manifest.problems.add(ErrorItem(message, line=number, member=member.name))
        return manifest

    def _manifest_image(
        self, manifest: _Manifest, folder: PurePosixPath, number: int, value: str
    ) -> None:
        """A file name is kept to look up at the end; inline bytes are decoded now."""
        if looks_like_path(value):
            relative = PurePosixPath(value)
            if relative.is_absolute() or ".." in relative.parts or "\\" in value:
                message = f"{value!r} must name a file in the archive, from the manifest's folder"
                manifest.problems.add(ErrorItem(message, "image", number, manifest.name))
            else:
                manifest.references.append((number, (folder / relative).as_posix()))
            return
        try:
            manifest.stats.add(inline_image(value, self.limits))
        except ImageRefused as problem:
            manifest.problems.add(ErrorItem(str(problem), "image", number, manifest.name))

    # -- the end -------------------------------------------------------------------------

    def finish(self, syntax: ArchiveSyntax, rules: MemberRules) -> ArchiveScan:
        layout = find_layout(self.files)
        if layout.manifest is not None:
            examples, labels, stats, problems = self._manifest_dataset(layout.manifest)
        else:
            examples, labels, stats, problems = self._folder_dataset(layout)
        if not examples and not problems.total:
            where = "a manifest's lines name none" if layout.manifest else _FOLDER
            problems.add(ErrorItem(f"the archive holds no images ({where})", field="file"))
        if problems.total:
            raise problems.refuse()
        report: dict[str, Any] = {"syntax": syntax, "layout": layout.kind}
        if layout.manifest is not None:
            report["manifest"] = layout.manifest
        report |= {"examples": examples, "label_counts": dict(sorted(labels.items()))}
        report |= stats.as_report()
        report |= {"members": rules.members, "unpacked_bytes": rules.unpacked}
        return ArchiveScan(examples, report)

    def _manifest_dataset(self, name: str) -> tuple[int, Counter[str], ImageStats, _Problems]:
        manifest = self.manifests[name]
        missing = _Problems()
        for number, reference in manifest.references:
            image = self.images.get(reference)
            if image is None:
                message = (
                    f"names {reference!r}, which is not an image file in the archive "
                    f"(names are relative to the manifest's folder and end in {_SUFFIXES})"
                )
                missing.add(ErrorItem(message, "image", number, name))
            elif isinstance(image, str):
                missing.add(ErrorItem(image, "image", number, reference))
            else:
                manifest.stats.add(image)
        problems = _Problems()
        by_line = heapq.merge(manifest.problems.items, missing.items, key=lambda e: e.line or 0)
        for item in itertools.islice(by_line, MAX_REPORTED_ERRORS):
            problems.add(item)
        problems.total = manifest.problems.total + missing.total
        return manifest.examples, manifest.labels, manifest.stats, problems

    def _folder_dataset(self, layout: Layout) -> tuple[int, Counter[str], ImageStats, _Problems]:
        labels: Counter[str] = Counter()
        stats = ImageStats()
        problems = _Problems()
        for name in self.files:
            parts = (layout.relative(name) or name).split("/")
            problem = None
            if len(parts) == 1:
                problem = f"is not in a label folder ({_FOLDER})"
            elif len(parts) > 2:
                problem = f"is nested too deep ({_FOLDER})"
            elif not is_image_name(name):
                problem = f"is not an image file (names end in {_SUFFIXES})"
            elif isinstance(image := self.images[name], str):
                problems.add(ErrorItem(image, field="image", member=name))
                continue
            else:
                stats.add(image)
                labels[parts[0]] += 1
                continue
            problems.add(ErrorItem(problem, field="file", member=name))
        examples = sum(labels.values())
        if examples > self.max_examples:
            message = f"holds {examples} images, past the limit of {self.max_examples} examples"
            problems.add(ErrorItem(message, field="file"))
        return examples, labels, stats, problems


def _lines(blocks: Iterable[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """The numbered lines of a member's data, without their newlines; None for a line over
    `limit` bytes (not kept)."""
    line = bytearray()
    too_long = False
    number = 0
    for block in blocks:
        pieces = block.split(b"\n")
        for index, piece in enumerate(pieces):
            if not too_long and len(line) + len(piece) > limit:
                too_long = True
                line.clear()
            if not too_long:
                line += piece
            if index < len(pieces) - 1:  # the piece ends a line
                number += 1
                yield number, None if too_long else bytes(line)
                line.clear()
                too_long = False
    if line or too_long:
        yield number + 1, None if too_long else bytes(line)

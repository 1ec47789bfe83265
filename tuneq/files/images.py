"""Checking an uploaded image once, and the image statistics a file's report shows.

Every image of an upload (a member of an archive, or a JSONL line's inline base64) is
decoded here once with Pillow, so a job never meets an image it cannot read: only the
formats the engine's image folders take (PNG, JPEG, BMP, GIF, WebP) are opened (Pillow's
other plugins, some of which run external programs, are never tried), the byte and pixel
limits are checked before the pixels are decoded, and the mode must convert to RGB, as the
engine converts it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from peft_engine.data.images import IMAGE_SUFFIXES
from tuneq.settings import Settings

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
# The longer side's buckets in a report, in order; a side over the last one is ">2048".
SIZE_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
MOST_COMMON_SIZES = 10
# Distinct exact sizes counted one by one; sizes first seen after this many go to "other",
# so a file of a million differently sized images keeps a bounded report.
_MAX_DISTINCT_SIZES = 10_000
_MAX_PATH_CHARS = 1024  # as the engine: a longer string is never a file name
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


class ImageRefused(Exception):
    """Why an image is refused (the caller names the line or the member)."""


class ImageInfo(NamedTuple):
    """What a report keeps of one valid image."""

    format: str
    mode: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        return cls(settings.max_image_bytes, settings.max_image_pixels)


def inspect_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Decode the image once; its format, mode and size, or ImageRefused saying why not.

    The size is read from the header, so an image of too many pixels is refused before
    its pixels are decoded.
    """
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise ImageRefused(f"is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageRefused(
                    f"is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{limits.max_pixels} pixels"
                )
            image.load()
            info = ImageInfo(str(image.format), image.mode, width, height)
    except ImageRefused:
        raise
    except Image.UnidentifiedImageError:
        names = ", ".join(IMAGE_FORMATS)
        raise ImageRefused(f"is not an image in a format the service reads ({names})") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt image makes decoders raise anything
        raise ImageRefused(f"is not a valid image: {exc or type(exc).__name__}") from None
    if not _converts_to_rgb(info.mode):
        raise ImageRefused(f"has mode {info.mode}, which does not convert to RGB")
    return info


@functools.lru_cache(maxsize=64)
def _converts_to_rgb(mode: str) -> bool:
    from PIL import Image

    try:
        Image.new(mode, (1, 1)).convert("RGB")
    except (ValueError, OSError):
        return False
    return True


def looks_like_path(value: str) -> bool:
    """Whether a JSONL `image` names a file rather than holding the image's bytes.

    A name ending in an image suffix is a file; so is a short string with a `/`, `\\` or
    `.` that is not base64 (base64 has no `.`, but its alphabet has `/`).
    """
    if value.startswith("data:") or len(value) > _MAX_PATH_CHARS:
        return False
    if value.lower().endswith(IMAGE_SUFFIXES):
        return True
    return any(c in value for c in "./\\") and not _is_base64(value)


def _is_base64(value: str) -> bool:
    packed = "".join(value.split()).encode("ascii", "replace")
    return len(packed) % 4 == 0 and _BASE64.fullmatch(packed) is not None


def inline_image(value: str, limits: ImageLimits) -> ImageInfo:
    """The image a JSONL line carries inline: base64, or a `data:image/...;base64,` URI."""
    if value.startswith("data:"):
        header, comma, payload = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageRefused("a data: URI must be base64 ('data:image/png;base64,...')")
        value = payload
    if len(value) > limits.max_bytes * 4 // 3 + 4:  # before decoding: the bytes it would be
        raise ImageRefused(f"holds more than the limit of {limits.max_bytes} bytes")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefused("is not valid base64 image data") from None
    return inspect_image(data, limits)


def size_bucket(longer_side: int) -> str:
    for limit in SIZE_BUCKETS:
        if longer_side <= limit:
            return f"<={limit}"
    return f">{SIZE_BUCKETS[-1]}"


@dataclass
class ImageStats:
    """The images' formats, modes and sizes, for a file's report."""

    formats: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    other_sizes: int = 0  # images whose size came after _MAX_DISTINCT_SIZES others
    buckets: Counter[str] = field(default_factory=Counter)

    def add(self, info: ImageInfo) -> None:
        self.formats[info.format] += 1
        self.modes[info.mode] += 1
        size = (info.width, info.height)
        if size in self.sizes or len(self.sizes) < _MAX_DISTINCT_SIZES:
            self.sizes[size] += 1
        else:
            self.other_sizes += 1
        self.buckets[size_bucket(max(size))] += 1

    def as_report(self) -> dict[str, Any]:
        """`image_formats`, `image_modes`, `image_sizes` (the most common exact sizes, and
        "other" for the rest) and `size_histogram` (by the longer side, smallest first)."""
        common = self.sizes.most_common(MOST_COMMON_SIZES)
        sizes = {f"{w}x{h}": n for (w, h), n in common}
        other = self.other_sizes + sum(self.sizes.values()) - sum(sizes.values())
        if other:
            sizes["other"] = other
        order = [size_bucket(limit) for limit in SIZE_BUCKETS] + [size_bucket(SIZE_BUCKETS[-1] + 1)]
        return {
            "image_formats": dict(sorted(self.formats.items())),
            "image_modes": dict(sorted(self.modes.items())),
            "image_sizes": sizes,
            "size_histogram": {b: self.buckets[b] for b in order if self.buckets[b]},
        }

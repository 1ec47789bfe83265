"""Image data: where an example's image is, and decoding it with Pillow.

An image classification example names its image in one of three ways:
- a JSONL line's `image` is a path relative to the data file's folder (`read_examples`
  resolves it with `resolve_image_paths`: the record then holds a `pathlib.Path`);
- or the image's bytes in base64, optionally as a `data:image/...;base64,` URI (a string);
- or the data is an image folder, `<dir>/<label>/<file>.png|jpg|jpeg|bmp|gif|webp`
  (`read_image_folder`: the record holds the file's absolute `Path`, the label its folder).

So in a record a `Path` is a file and a string is image bytes: a line cannot point at a file
outside its data file's folder (an absolute path or one through `..` is not a path here).
`decode_image` turns either into an RGB Pillow image, or raises `ImageProblem` saying why.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from peft_engine.data.examples import DataFormat, Example
from peft_engine.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_LAYOUT = "<folder>/<label>/<image> with images ending in " + ", ".join(IMAGE_SUFFIXES)
_MAX_PATH_CHARS = 1024  # longer strings are base64, never a file name
_MAX_LISTED = 5


class ImageProblem(Exception):
    """Why an example's image could not be read (the caller adds the line)."""


# ---------------------------------------------------------------------------------------
# Where the images are
# ---------------------------------------------------------------------------------------


def read_image_folder(path: Path, *, param: str = "training_file") -> list[Example]:
    """The examples of an image folder: one subfolder per label, holding its images.

    Examples are in the order of their relative paths; `line` is the 1-based position in that
    order (what an error about an image refers to). Hidden entries (`.DS_Store`) are skipped;
    anything else out of place is a DataError naming it.
    """
    files, problems = _scan_folder(path)
    if problems:
        raise DataError(f"{path.name} is not an image folder ({_LAYOUT}): {problems}", param=param)
    if not files:
        raise DataError(f"{path.name} has no images (an image folder is {_LAYOUT})", param=param)
    return [
        Example(
            line=number,
            format=DataFormat.IMAGE_CLASSIFICATION,
            record={"image": file.absolute(), "label": file.parent.name},
        )
        for number, file in enumerate(files, start=1)
    ]


def _scan_folder(path: Path) -> tuple[list[Path], str]:
    """The image files, sorted, and what does not fit the layout (empty when all fits)."""
    files: list[Path] = []
    not_folders: list[str] = []  # files beside the label folders
    not_images: list[str] = []  # folders or other files inside a label folder
    empty: list[str] = []
    for label_dir in _visible(path):
        if not label_dir.is_dir():
            not_folders.append(label_dir.name)
            continue
        images = []
        for entry in _visible(label_dir):
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
                images.append(entry)
            else:
                not_images.append(entry.relative_to(path).as_posix())
        if not images:
            empty.append(label_dir.name)
        files.extend(images)
    problems = []
    if not_folders:
        problems.append(f"{_listed(not_folders)} {_is(not_folders)} not a label folder")
    if not_images:
        problems.append(f"{_listed(not_images)} {_is(not_images)} not an image file")
    if empty:
        problems.append(f"label folder {_listed(empty)} {_is(empty)} empty")
    return sorted(files, key=lambda f: f.relative_to(path).as_posix()), "; ".join(problems)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is(names: Sequence[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def resolve_image_paths(examples: list[Example], folder: Path) -> list[Example]:
    """JSONL examples with each `image` that names a file in `folder` made that file's Path.

    A string that is not a relative path to an existing file inside `folder` stays a string
    (base64 image data, or a mistake `decode_image` reports).
    """
    resolved = []
    for example in examples:
        file = _relative_file(example.record["image"], folder)
        if file is not None:
            example = Example(example.line, example.format, {**example.record, "image": file})
        resolved.append(example)
    return resolved


def _relative_file(value: object, folder: Path) -> Path | None:
    if not isinstance(value, str) or len(value) > _MAX_PATH_CHARS or value.startswith("data:"):
        return None
    relative = Path(value)
    if relative.is_absolute() or ".." in relative.parts or "\x00" in value:
        return None
    candidate = folder / relative
    try:
        return candidate.absolute() if candidate.is_file() else None
    except OSError:  # a name too long for the file system, and the like
        return None


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def decode_image(value: Path | str) -> Image.Image:
    """The image as RGB: a file (`Path`), or base64 bytes or a data: URI (`str`)."""
    if isinstance(value, Path):
        try:
            data = value.read_bytes()
        except OSError as exc:
            raise ImageProblem(f"cannot read {value.name}: {exc.strerror or exc}") from None
        return _open(data, f"{value.parent.name}/{value.name} is not an image Pillow can read")
    if value.startswith("data:"):
        header, comma, payload = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageProblem("a data: URI must be base64 ('data:image/png;base64,...')")
        data = _base64(payload, "the data: URI's payload is not valid base64")
        return _open(data, "the data: URI is not an image Pillow can read")
    shown = value if len(value) <= 40 else value[:37] + "..."
    not_a_file = f"{shown!r} is not a file in the data file's folder"
    data = _base64(value, f"{not_a_file}, nor valid base64 image data")
    return _open(data, f"{not_a_file}, nor base64 of an image Pillow can read")


def _base64(text: str, problem: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageProblem(problem) from None


def _open(data: bytes, problem: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageProblem(f"{problem} (not an image format it knows)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageProblem(f"{problem} ({exc})") from None

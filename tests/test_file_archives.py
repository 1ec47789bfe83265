"""Image datasets over HTTP: `POST /files` with a zip or a tar.gz (an image folder or a
JSONL manifest with its images), JSONL lines with inline images, archive bombs refused
with nothing kept, and `local_copy` extracting what the engine reads."""

from __future__ import annotations

import base64
import io
import json
import random
import tarfile
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from peft_engine.data.formats import read_examples
from peft_engine.data.images import decode_image
from peft_engine.errors import DataError
from tests.service_fixtures import api_client, auth, make_settings, migrate, new_team_key
from tuneq.db import make_engine, make_sessionmaker
from tuneq.errors import InvalidFile
from tuneq.files.archive_rules import ArchiveLimits
from tuneq.files.archives import extract_archive
from tuneq.files.ingest import ingest_upload
from tuneq.files.models import File
from tuneq.files.service import local_copy
from tuneq.settings import Settings
from tuneq.storage import open_store

Entry = tuple[str, bytes] | tarfile.TarInfo


def png(size: tuple[int, int] = (8, 8), shade: int = 0, mode: str = "L") -> bytes:
    return _encoded(Image.new(mode, size, shade))


def noise_png(size: int, seed: int) -> bytes:
    """An RGB PNG of random pixels: it does not compress."""
    pixels = random.Random(seed).randbytes(size * size * 3)
    return _encoded(Image.frombytes("RGB", (size, size), pixels), compress_level=0)


def _encoded(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def tar_gz(entries: list[Entry]) -> bytes:
    """A tar.gz of (name, data) files and ready-made headers (links, devices)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buffer.getvalue()


def zip_file(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:  # type: ignore[misc]
            archive.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


BUILDERS: dict[str, Callable[[list[Entry]], bytes]] = {"zip": zip_file, "tar.gz": tar_gz}


def tar_entry(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


class Service:
    """The real app on SQLite and a local store, with one team's key."""

    def __init__(self, settings: Settings, client: TestClient) -> None:
        self.settings = settings
        self.client = client
        self.key = new_team_key(settings, "vision")
        self.engine = make_engine(settings.resolved_database_url)
        self.sessions = make_sessionmaker(self.engine)

    def upload(self, data: bytes, filename: str = "images.bin") -> Any:
        return self.client.post(
            "/files",
            headers=auth(self.key),
            files={"file": (filename, data, "application/octet-stream")},
        )

    def created(self, data: bytes, filename: str = "images.bin") -> dict[str, Any]:
        response = self.upload(data, filename)
        assert response.status_code == 201, response.text
        body = response.json()
        shown = self.client.get(f"/files/{body['id']}", headers=auth(self.key))
        assert shown.json() == body
        return body

    def refused(self, data: bytes, status: int = 422) -> dict[str, Any]:
        response = self.upload(data)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        self.assert_nothing_kept()
        return response.json()

    def assert_nothing_kept(self) -> None:
        listed = self.client.get("/files", headers=auth(self.key)).json()
        assert listed["data"] == []
        store = self.settings.resolved_store_dir / "files"
        assert not store.exists() or not [p for p in store.rglob("*") if p.is_file()]
        tmp = self.settings.home / "tmp"
        assert not tmp.exists() or list(tmp.iterdir()) == []

    def row(self, file_id: str) -> File:
        with self.sessions() as db:
            file = db.get_one(File, file_id)
            db.expunge(file)
            return file


@contextmanager
def running(tmp_path: Path, **overrides: Any) -> Iterator[Service]:
    settings = make_settings(tmp_path, **overrides)
    migrate(settings)
    with api_client(settings) as client:
        service = Service(settings, client)
        yield service
        service.engine.dispose()


# Low limits, so that a test's bomb or oversized image stays small.
STRICT = {"max_archive_members": 8, "max_archive_bytes": 4000}
SMALL_IMAGES = {"max_image_pixels": 200, "max_image_bytes": 600}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Service]:
    with running(tmp_path) as service:
        yield service


def image_folder(prefix: str = "") -> list[Entry]:
    """Two labels, three images: a 8x8 cat, a 8x8 and a 40x20 dog; hidden entries beside."""
    return [
        (f"{prefix}cat/1.png", png()),
        (f"{prefix}dog/1.png", png(shade=255)),
        (f"{prefix}dog/2.PNG", png((40, 20), mode="RGB")),
        (f"{prefix}cat/.DS_Store", b"\x00\x01"),
        ("__MACOSX/._cat", b"resource fork"),
    ]


FOLDER_REPORT = {
    "layout": "image_folder",
    "examples": 3,
    "label_counts": {"cat": 1, "dog": 2},
    "image_formats": {"PNG": 3},
    "image_modes": {"L": 2, "RGB": 1},
    "image_sizes": {"8x8": 2, "40x20": 1},
    "size_histogram": {"<=32": 2, "<=64": 1},
    "members": 5,
}


@pytest.mark.parametrize("syntax", BUILDERS)
@pytest.mark.parametrize("prefix", ["", "digits/"], ids=["flat", "wrapper"])
def test_an_image_folder_archive_is_accepted_with_its_report(
    api: Service, syntax: str, prefix: str
) -> None:
    data = BUILDERS[syntax](image_folder(prefix))

    body = api.created(data)

    assert (body["format"], body["bytes"]) == ("image_classification", len(data))
    report = body["report"]
    unpacked = report.pop("unpacked_bytes")
    assert report == {"syntax": syntax, **FOLDER_REPORT}
    assert unpacked == sum(len(d) for _, d in image_folder(prefix))  # type: ignore[misc]


def manifest_archive(images: int = 2) -> list[Entry]:
    """A manifest one folder down, naming images beside it, and one image inline."""
    lines = [{"image": f"img/{n}.png", "label": n % 2} for n in range(images)]
    lines.append({"image": base64.b64encode(png((300, 10))).decode(), "label": "inline"})
    manifest = "".join(json.dumps(line) + "\n" for line in lines).encode()
    files: list[Entry] = [(f"set/img/{n}.png", png(shade=n)) for n in range(images)]
    return [*files, ("set/train.jsonl", manifest), ("set/img/unused.txt", b"notes")]


@pytest.mark.parametrize("syntax", BUILDERS)
def test_a_manifest_archive_is_accepted_with_its_report(api: Service, syntax: str) -> None:
    body = api.created(BUILDERS[syntax](manifest_archive()))

    report = body["report"]
    assert body["examples"] == 3
    assert report["syntax"] == syntax
    assert (report["layout"], report["manifest"]) == ("jsonl", "set/train.jsonl")
    assert report["label_counts"] == {"0": 1, "1": 1, "inline": 1}
    assert report["image_sizes"] == {"8x8": 2, "300x10": 1}
    assert report["size_histogram"] == {"<=32": 2, "<=512": 1}
    assert report["members"] == 4


def test_a_manifest_naming_a_missing_image_is_refused_by_line(api: Service) -> None:
    manifest = b'{"image": "img/0.png", "label": 0}\n{"image": "img/9.png", "label": 1}\n'

    body = api.refused(tar_gz([("set/img/0.png", png()), ("set/train.jsonl", manifest)]))

    [error] = body["errors"]
    assert (error["line"], error["field"], error["member"]) == (2, "image", "set/train.jsonl")
    assert "'set/img/9.png', which is not an image file in the archive" in error["message"]


@pytest.mark.parametrize("syntax", BUILDERS)
def test_corrupt_images_are_refused_naming_their_members(api: Service, syntax: str) -> None:
    truncated = noise_png(16, seed=3)[:300]
    entries = [*image_folder(), ("cat/2.png", b"not an image"), ("dog/3.png", truncated)]

    body = api.refused(BUILDERS[syntax](entries))

    assert body["total_errors"] == 2
    members = [(e["member"], e["field"]) for e in body["errors"]]
    assert members == [("cat/2.png", "image"), ("dog/3.png", "image")]
    assert "not an image in a format" in body["errors"][0]["message"]
    assert "not a valid image" in body["errors"][1]["message"]


@pytest.mark.parametrize("syntax", BUILDERS)
def test_oversized_images_are_refused(tmp_path: Path, syntax: str) -> None:
    entries: list[Entry] = [
        ("cat/small.png", png()),
        ("cat/wide.png", png((20, 20))),  # 400 pixels, over 200
        ("dog/heavy.png", noise_png(16, seed=1)),  # over 600 bytes
    ]

    with running(tmp_path, **SMALL_IMAGES) as service:
        body = service.refused(BUILDERS[syntax](entries))

    problems = {e["member"]: e["message"] for e in body["errors"]}
    assert problems.keys() == {"cat/wide.png", "dog/heavy.png"}
    assert "20x20 = 400 pixels, over the limit of 200" in problems["cat/wide.png"]
    assert "over the limit of 600 bytes" in problems["dog/heavy.png"]


def _zip_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("cat/link.png")
        link.external_attr = (0o120777 << 16) | 0x20
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


# Each a zip and a tar.gz; all but the ratio bombs meet low limits (STRICT).
BOMBS: dict[str, tuple[Callable[[], list[Entry]], str]] = {
    "members": (lambda: [(f"c/{n}.png", png()) for n in range(9)], "limit of 8 members"),
    "ratio": (lambda: [("c/0.png", bytes(4 << 20))], "compression ratio over the limit of 200"),
    "bytes": (
        lambda: [(f"c/{n}.png", noise_png(24, n)) for n in range(4)],
        "more than the limit of 4000 bytes unpacked",
    ),
    "dot-dot": (lambda: [("c/../../evil.png", png())], "'..'"),
    "absolute": (lambda: [("/tmp/evil.png", png())], "absolute path"),
    "drive": (lambda: [("C:/evil.png", png())], "Windows path"),
    "backslash": (lambda: [("c\\..\\..\\evil.png", png())], "Windows path"),
}
LINKS: dict[str, tuple[Callable[[], bytes], str]] = {
    "symlink (tar.gz)": (
        lambda: tar_gz([tar_entry("c/link.png", tarfile.SYMTYPE, "/etc/passwd")]),
        "is a symbolic link",
    ),
    "symlink (zip)": (_zip_symlink, "is a symbolic link"),
    "hardlink (tar.gz)": (
        lambda: tar_gz([("c/1.png", png()), tar_entry("c/2", tarfile.LNKTYPE, "c/1.png")]),
        "is a hard link",
    ),
    "fifo (tar.gz)": (
        lambda: tar_gz([tar_entry("c/pipe.png", tarfile.FIFOTYPE)]),
        "is a device file, FIFO or socket",
    ),
}


def assert_refused_at_once(tmp_path: Path, data: bytes, words: str) -> None:
    with running(tmp_path, **({} if "ratio" in words else STRICT)) as service:
        body = service.refused(data)

    assert (body["code"], body["param"]) == ("invalid_training_file", "file")
    assert words in body["detail"]
    assert len(body["errors"]) == 1 and body["errors"][0]["field"] == "file"


@pytest.mark.parametrize("syntax", BUILDERS)
@pytest.mark.parametrize("entries, words", BOMBS.values(), ids=list(BOMBS))
def test_archive_bombs_are_refused_with_nothing_kept(
    tmp_path: Path, syntax: str, entries: Callable[[], list[Entry]], words: str
) -> None:
    assert_refused_at_once(tmp_path, BUILDERS[syntax](entries()), words)


@pytest.mark.parametrize("build, words", LINKS.values(), ids=list(LINKS))
def test_links_and_devices_are_refused_with_nothing_kept(
    tmp_path: Path, build: Callable[[], bytes], words: str
) -> None:
    assert_refused_at_once(tmp_path, build(), words)


def test_an_upload_over_the_size_limit_is_still_413(tmp_path: Path) -> None:
    with running(tmp_path, max_upload_bytes=1000) as service:
        service.refused(tar_gz([(f"cat/{n}.png", noise_png(16, n)) for n in range(2)]), 413)


def test_jsonl_with_inline_images_is_accepted_with_its_report(api: Service) -> None:
    lines = [
        {"image": base64.b64encode(png()).decode(), "label": "cat"},
        {"image": "data:image/png;base64," + base64.b64encode(png((64, 64))).decode(), "label": 1},
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()

    body = api.created(data, "images.jsonl")

    assert body["format"] == "image_classification"
    assert body["report"] == {
        "syntax": "jsonl",
        "lines": 2,
        "examples": 2,
        "label_counts": {"1": 1, "cat": 1},
        "image_formats": {"PNG": 2},
        "image_modes": {"L": 2},
        "image_sizes": {"8x8": 1, "64x64": 1},
        "size_histogram": {"<=32": 1, "<=64": 1},
    }


def test_jsonl_naming_image_files_is_refused_by_line(api: Service) -> None:
    lines = [
        {"image": base64.b64encode(png()).decode(), "label": "cat"},
        {"image": "dogs/1.png", "label": "dog"},
        {"image": base64.b64encode(b"not a picture").decode(), "label": "dog"},
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()

    body = api.refused(data)

    assert [(e["line"], e["field"]) for e in body["errors"]] == [(2, "image"), (3, "image")]
    message = body["errors"][0]["message"]
    assert "upload a .zip or .tar.gz holding the JSONL and its images" in message


@pytest.mark.parametrize("syntax", BUILDERS)
@pytest.mark.parametrize("layout", ["wrapped folder", "manifest"])
def test_local_copy_extracts_what_the_engine_reads(
    api: Service, tmp_path: Path, syntax: str, layout: str
) -> None:
    entries = image_folder("digits/") if layout == "wrapped folder" else manifest_archive()
    body = api.created(BUILDERS[syntax](entries))
    file, store, cache = api.row(body["id"]), open_store(api.settings), tmp_path / "cache"

    path = local_copy(store, file, cache)

    examples = read_examples(path)
    assert len(examples) == body["examples"]
    assert sorted(str(e.record["label"]) for e in examples) == sorted(
        label for label, n in body["report"]["label_counts"].items() for _ in range(n)
    )
    assert {decode_image(e.record["image"]).mode for e in examples} == {"RGB"}
    assert local_copy(store, file, cache) == path  # extracted once, then reused
    assert [p.name for p in (cache / "files").iterdir()] == [file.id]  # no download left
    expected = "digits" if layout == "wrapped folder" else "set/train.jsonl"
    assert path == cache / "files" / file.id / expected


def test_local_copy_refuses_an_archive_changed_in_the_store(api: Service, tmp_path: Path) -> None:
    body = api.created(tar_gz(image_folder()))
    file = api.row(body["id"])
    stored = api.settings.resolved_store_dir / file.storage_key
    stored.write_bytes(tar_gz([*image_folder(), ("cat/../../evil.png", png())]))

    with pytest.raises(DataError, match="SHA-256"):
        local_copy(open_store(api.settings), file, tmp_path / "cache")
    assert list((tmp_path / "cache" / "files").iterdir()) == []


@pytest.mark.parametrize("syntax", BUILDERS)
def test_extraction_checks_every_member_again(tmp_path: Path, syntax: str) -> None:
    archive = tmp_path / "evil"
    archive.write_bytes(BUILDERS[syntax]([("cat/1.png", png()), ("../evil.png", png())]))
    into = tmp_path / "into"
    into.mkdir()

    with pytest.raises(InvalidFile, match="'..'"):
        extract_archive(syntax, archive, into, ArchiveLimits(10, 10_000, 200.0))  # type: ignore[arg-type]
    assert not (tmp_path / "evil.png").exists()


def _peak_while_ingesting(data: bytes, settings: Settings) -> int:
    chunks = (data[i : i + 4096] for i in range(0, len(data), 4096))
    tracemalloc.start()
    try:
        with ingest_upload(chunks=chunks, settings=settings) as upload:
            assert upload.examples > 0
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("syntax", BUILDERS)
def test_memory_stays_flat_while_an_archive_streams(tmp_path: Path, syntax: str) -> None:
    settings = make_settings(tmp_path)
    # 10x the bytes: 3x the images, each 3x larger (a zip's directory grows with its members)
    small = BUILDERS[syntax]([(f"c{n % 2}/{n}.png", noise_png(48, n)) for n in range(30)])
    large = BUILDERS[syntax]([(f"c{n % 2}/{n}.png", noise_png(84, n)) for n in range(100)])
    _peak_while_ingesting(small, settings)  # imports and caches warm up outside the measure

    small_peak = _peak_while_ingesting(small, settings)
    large_peak = _peak_while_ingesting(large, settings)

    assert len(large) > 9 * len(small)
    assert large_peak < 2 * small_peak, (small_peak, large_peak, len(small), len(large))


def test_a_tar_gz_is_refused_as_soon_as_its_bad_member_streams_in(tmp_path: Path) -> None:
    link = tar_entry("cat/link.png", tarfile.SYMTYPE, "/etc/passwd")
    data = tar_gz([link, *((f"cat/{n}.png", noise_png(48, n)) for n in range(100))])
    sent = []

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 4096):
            sent.append(start)
            yield data[start : start + 4096]

    with pytest.raises(InvalidFile, match="symbolic link"):
        ingest_upload(chunks=chunks(), settings=make_settings(tmp_path))
    assert len(sent) < len(data) // 4096 // 10  # the rest of the upload was never read
    assert list((tmp_path / "tmp").iterdir()) == []

"""Downloads: streamed to disk, the sha256 checked, archives unpacked safely.

The API either streams the bytes itself (local store) or redirects to a short-lived
presigned URL (S3); that URL is fetched by a client that does not carry the API key, so
the key never reaches the object store or its logs.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tuneq.client.errors import TuneqAPIError
from tuneq.client.transport import Transport

REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 1024 * 1024


def fetch(transport: Transport, path: str, target: Path) -> str:
    """GET `path` into the file `target`; returns the sha256 (hex) of what was written."""
    with transport.stream("GET", path) as response:
        if response.status_code not in REDIRECTS:
            return _write(response.iter_bytes(CHUNK_BYTES), target)
        location = response.headers["location"]
    keyless = Transport(location, None, timeout=transport.timeout, retry=transport.retry)
    try:
        with keyless.stream("GET", location) as response:
            return _write(response.iter_bytes(CHUNK_BYTES), target)
    finally:
        keyless.close()


def _write(chunks: Iterable[bytes], target: Path) -> str:
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in chunks:
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def fetch_archive(transport: Transport, path: str, *, sha256: str, out: Path) -> Path:
    """Download the .tar.gz at `path`, check it against `sha256`, unpack it into `out`.

    `out` must not exist or be empty. The archive is unpacked beside it and moved into
    place only when whole, with tarfile's "data" filter: no absolute paths, no links out
    of the directory, no device files.
    """
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as scratch:
        archive = Path(scratch) / "archive.tar.gz"
        got = fetch(transport, path, archive)
        if got != sha256:
            raise TuneqAPIError(
                None,
                "checksum_mismatch",
                f"{path}: the download's sha256 is {got}, the API lists {sha256}",
            )
        unpacked = Path(scratch) / "unpacked"
        with tarfile.open(archive, mode="r:gz") as tar:
            tar.extractall(unpacked, filter="data")
        if out.exists():
            out.rmdir()
        shutil.move(unpacked, out)
    return out

"""Packing a job's output or checkpoint for the store: a .tar.gz of the named files, with
its size and sha256 (what `GET /jobs/{id}/artifacts` shows and a download is checked by)."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from tuneq.storage import ObjectStore


def upload_tarball(
    store: ObjectStore, scratch: Path, directory: Path, key: str, names: tuple[str, ...]
) -> tuple[str, int, str]:
    """Pack `names` of `directory` (those that exist) under `key`: (key, size, sha256)."""
    tarball = scratch / Path(key).name
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "w:gz") as archive:
        for name in sorted(names):
            if (directory / name).is_file():
                archive.add(directory / name, arcname=name)
    size, digest = size_and_digest(tarball)
    store.put_file(key, tarball)
    tarball.unlink()
    return key, size, digest


def size_and_digest(path: Path) -> tuple[int, str]:
    with path.open("rb") as handle:
        return path.stat().st_size, hashlib.file_digest(handle, "sha256").hexdigest()

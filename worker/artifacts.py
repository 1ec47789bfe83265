"""Packing a job's output or checkpoint for the store: a .tar.gz of the named files, with
its size and sha256 (what `GET /jobs/{id}/artifacts` shows and a download is checked by).

gzip at level 1, not tarfile's default 9: weights are floats, which deflate barely shrinks,
and level 9 took 1.8x (fp32) to 2.9x (bf16) as long to make files 1% smaller
(`bench/artifact_packing.py`, SmolLM2-135M with a merged update). A merged export or a
full fine-tune's checkpoint is the whole model, so that time is the export's and the
checkpoint's. Any gzip reader reads either level."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from tuneq.storage import ObjectStore

COMPRESS_LEVEL = 1


def upload_tarball(
    store: ObjectStore, scratch: Path, directory: Path, key: str, names: tuple[str, ...]
) -> tuple[str, int, str]:
    """Pack `names` of `directory` (those that exist) under `key`: (key, size, sha256)."""
    tarball = scratch / Path(key).name
    pack_tarball(directory, names, tarball)
    size, digest = size_and_digest(tarball)
    store.put_file(key, tarball)
    tarball.unlink()
    return key, size, digest


def pack_tarball(
    directory: Path, names: tuple[str, ...], tarball: Path, compresslevel: int = COMPRESS_LEVEL
) -> None:
    """`names` of `directory` (those that exist), sorted, into the .tar.gz `tarball`."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "w:gz", compresslevel=compresslevel) as archive:
        for name in sorted(names):
            if (directory / name).is_file():
                archive.add(directory / name, arcname=name)


def size_and_digest(path: Path) -> tuple[int, str]:
    with path.open("rb") as handle:
        return path.stat().st_size, hashlib.file_digest(handle, "sha256").hexdigest()

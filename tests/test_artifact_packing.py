"""Packing an artifact (worker/artifacts.py): the named files that exist, sorted, in a
.tar.gz any reader opens, at the fast gzip level (bench/artifact_packing.py says why)."""

from __future__ import annotations

import tarfile

from worker.artifacts import COMPRESS_LEVEL, pack_tarball, size_and_digest

FASTEST = 4  # gzip's XFL header byte: 4 for the fastest level, 2 for the best (RFC 1952)


def test_the_named_files_that_exist_are_packed_sorted_at_the_fast_level(tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    (output / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (output / "config.json").write_text('{"a": 1}')
    (output / "unlisted.bin").write_bytes(b"not asked for")
    tarball = tmp_path / "upload" / "adapter.tar.gz"

    pack_tarball(output, ("model.safetensors", "config.json", "missing.json"), tarball)

    with tarfile.open(tarball, "r:gz") as archive:
        assert archive.getnames() == ["config.json", "model.safetensors"]
        packed = archive.extractfile("model.safetensors")
        assert packed is not None and packed.read() == bytes(range(256)) * 4096
    header = tarball.read_bytes()[:10]
    assert COMPRESS_LEVEL == 1 and header[8] == FASTEST
    size, digest = size_and_digest(tarball)
    assert size == tarball.stat().st_size and len(digest) == 64

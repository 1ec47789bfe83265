"""The object store: the same behaviour from a local directory and from S3 over HTTP (moto)."""

from __future__ import annotations

import errno
import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.s3server import s3_client, start_moto_server
from tuneq.errors import NotFound, Unavailable
from tuneq.settings import Settings
from tuneq.storage import LocalStore, MiB, ObjectStore, S3Store, open_store

CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server, endpoint_url = start_moto_server()
    yield endpoint_url
    server.stop()


def new_s3_store(endpoint_url: str, **kwargs) -> S3Store:
    # A bucket per test: moto keeps state for the whole module.
    return S3Store(
        bucket=f"test-{uuid.uuid4().hex[:12]}",
        endpoint_url=endpoint_url,
        chunk_bytes=5 * MiB,  # the S3 minimum part size
        create_bucket=True,
        **CREDENTIALS,
        **kwargs,
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return new_s3_store(request.getfixturevalue("s3_endpoint"))


def write_tree(directory: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_bytes(data)


def read_tree(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file()
    }


def test_file_round_trip_larger_than_a_part(store: ObjectStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * (12 * MiB // 256) + b"tail"
    source = tmp_path / "adapter.safetensors"
    source.write_bytes(data)

    store.put_file("jobs/j1/adapter.safetensors", source)
    target = tmp_path / "download" / "nested" / "adapter.safetensors"
    store.get_file("jobs/j1/adapter.safetensors", target)

    assert store.size("jobs/j1/adapter.safetensors") == len(data)
    assert target.read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["adapter.safetensors"]  # no temp left
    if isinstance(store, S3Store):
        head = s3_client(store.endpoint_url).head_object(
            Bucket=store.bucket, Key="jobs/j1/adapter.safetensors"
        )
        assert head["ETag"].endswith('-3"')  # a multipart upload of three 5 MiB parts


def test_dir_round_trip_keeps_nested_paths(store: ObjectStore, tmp_path: Path) -> None:
    files = {
        "adapter_config.json": b"{}",
        "optimizer/state.safetensors": b"\x00" * 1000,
        "optimizer/rng/cpu.json": b"[1, 2, 3]",
    }
    write_tree(tmp_path / "checkpoint", files)
    store.put_bytes("jobs/j1/checkpoint-10-old/other.json", b"a sibling, not under the prefix")

    keys = store.put_dir("jobs/j1/checkpoint-10", tmp_path / "checkpoint")
    store.get_dir("jobs/j1/checkpoint-10", tmp_path / "restored")

    assert sorted(keys) == sorted(f"jobs/j1/checkpoint-10/{name}" for name in files)
    assert read_tree(tmp_path / "restored") == files


def test_open_stream_yields_chunks(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40
    store.put_bytes("files/f1.jsonl", data)

    chunks = list(store.open_stream("files/f1.jsonl", chunk_size=4096))

    assert len(chunks) == 3
    assert all(len(chunk) <= 4096 for chunk in chunks)
    assert b"".join(chunks) == data


def test_size_exists_delete_and_delete_prefix(store: ObjectStore) -> None:
    for key in ["jobs/j1/a", "jobs/j1/sub/b", "jobs/j10/c", "jobs/j2/d"]:
        store.put_bytes(key, b"12345")

    assert store.size("jobs/j2/d") == 5
    assert store.exists("jobs/j2/d")
    store.delete("jobs/j2/d")
    store.delete("jobs/j2/d")  # deleting what is gone is fine
    assert not store.exists("jobs/j2/d")

    store.delete_prefix("jobs/j1")
    assert not store.exists("jobs/j1/a")
    assert not store.exists("jobs/j1/sub/b")
    assert store.exists("jobs/j10/c")  # a prefix is a directory, not a string prefix
    store.delete_prefix("jobs/never-written")
    with pytest.raises(ValueError):
        store.delete_prefix("/")


def test_missing_key_is_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        store.size("nope")
    with pytest.raises(NotFound):
        store.get_file("nope", tmp_path / "out" / "nope")
    with pytest.raises(NotFound):
        store.open_stream("nope")
    assert not list(tmp_path.rglob("*nope*"))  # neither the file nor a temporary one


def test_check_passes(store: ObjectStore) -> None:
    store.check()


def test_local_store_has_no_presigned_url(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a", b"x")
    assert store.presigned_url("a", filename="a.txt") is None


def test_s3_presigned_url_downloads_without_credentials(s3_endpoint: str) -> None:
    store = new_s3_store(s3_endpoint, presign_ttl_seconds=300)
    store.put_bytes("jobs/j1/adapter.tar.gz", b"the adapter")

    url = store.presigned_url("jobs/j1/adapter.tar.gz", filename="support-bot.tar.gz")

    assert url is not None and url.startswith("http://")
    assert int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0]) == 300
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"the adapter"
        assert 'filename="support-bot.tar.gz"' in response.headers["Content-Disposition"]


def test_s3_creates_its_bucket_outside_us_east_1(s3_endpoint: str) -> None:
    store = new_s3_store(s3_endpoint, region="eu-west-1")
    store.put_bytes("k", b"v")
    assert store.size("k") == 1


def test_s3_presign_ttl_is_at_most_15_minutes(s3_endpoint: str) -> None:
    with pytest.raises(ValueError):
        new_s3_store(s3_endpoint, presign_ttl_seconds=901)


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../x", ""])
def test_local_store_refuses_keys_outside_its_root(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.size(key)


def test_local_check_fails_when_root_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(Unavailable, match="not writable"):
        LocalStore(tmp_path / "file" / "store").check()


def test_s3_check_fails_on_a_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free now, and nothing listens once closed
    store = S3Store(
        bucket="tuneq",
        endpoint_url=f"http://127.0.0.1:{port}",
        connect_timeout=1,
        max_attempts=1,
        **CREDENTIALS,
    )
    with pytest.raises(Unavailable, match="not reachable"):
        store.check()


def test_s3_check_fails_when_the_bucket_is_missing(s3_endpoint: str) -> None:
    store = S3Store(bucket="never-created", endpoint_url=s3_endpoint, **CREDENTIALS)
    with pytest.raises(Unavailable, match="never-created"):
        store.check()


def test_open_store_follows_settings(s3_endpoint: str, tmp_path: Path) -> None:
    local = open_store(Settings(store="local", home=tmp_path))
    assert isinstance(local, LocalStore)
    assert local.root == (tmp_path / "artifacts").resolve()

    s3_client(s3_endpoint).create_bucket(Bucket="from-settings")
    settings = Settings(
        store="s3",
        s3_endpoint_url=s3_endpoint,
        s3_bucket="from-settings",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )
    remote = open_store(settings)
    remote.put_bytes("k", b"v")
    assert remote.size("k") == 1


def test_s3_presigns_for_the_address_clients_use(s3_endpoint: str) -> None:
    # The workers reach the store by one name, a laptop by another (127.0.0.1 vs localhost
    # here): the URL is signed for, and works at, the public one.
    public = s3_endpoint.replace("127.0.0.1", "localhost")
    store = new_s3_store(s3_endpoint, public_endpoint_url=public)
    store.put_bytes("public/x", b"through the public address")
    url = store.presigned_url("public/x")
    assert url is not None and url.startswith(public + "/")
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"through the public address"


# ------------------------------------------------ moving an upload's file into the store


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tuneq-tmp")]


def test_local_move_is_a_rename_on_one_filesystem(tmp_path: Path) -> None:
    source = tmp_path / "tmp" / "upload-1.jsonl"
    source.parent.mkdir()
    source.write_bytes(b"data\n" * 1000)
    inode = source.stat().st_ino
    store = LocalStore(tmp_path / "store")

    store.move_file("files/team/file-1", source)

    target = tmp_path / "store" / "files" / "team" / "file-1"
    assert target.read_bytes() == b"data\n" * 1000
    assert target.stat().st_ino == inode  # the same file: renamed, not copied
    assert not source.exists()
    assert not _leftovers(tmp_path)


def test_local_move_copies_across_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "elsewhere.jsonl"
    source.write_bytes(b"data\n" * 1000)
    replace = os.replace

    def cross_device(src: Any, dst: Any) -> None:
        if Path(src) == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", cross_device)
    store = LocalStore(tmp_path / "store")

    store.move_file("files/team/file-1", source)

    target = tmp_path / "store" / "files" / "team" / "file-1"
    assert target.read_bytes() == b"data\n" * 1000
    assert not source.exists()
    assert not _leftovers(tmp_path)


def test_local_move_of_a_missing_file_stores_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")

    with pytest.raises(FileNotFoundError):
        store.move_file("files/team/file-1", tmp_path / "missing.jsonl")

    assert not store.exists("files/team/file-1")
    assert not _leftovers(tmp_path)


def test_s3_move_uploads_then_removes_the_file(tmp_path: Path) -> None:
    server, endpoint_url = start_moto_server()
    try:
        store = S3Store(
            bucket="moves",
            endpoint_url=endpoint_url,
            chunk_bytes=5 * MiB,
            create_bucket=True,
            access_key_id="testing",
            secret_access_key="testing",
        )
        source = tmp_path / "upload.jsonl"
        source.write_bytes(b"data\n" * 1000)

        store.move_file("files/team/file-1", source)

        client = s3_client(endpoint_url)
        body = client.get_object(Bucket="moves", Key="files/team/file-1")["Body"].read()
        assert body == b"data\n" * 1000
        assert not source.exists()
    finally:
        server.stop()

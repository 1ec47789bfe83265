"""The object store for datasets, checkpoints and adapters (DESIGN §1, §2).

Two implementations behind one protocol, so api/ and worker/ run the same code embedded
(a local directory) and in production (S3 or MinIO through boto3). Keys are '/'-separated
paths such as `jobs/{job_id}/attempts/{n}/checkpoint-{step}/adapter_model.safetensors`;
a "prefix" names a directory of keys, so `jobs/1` never matches `jobs/10/...`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tuneq.errors import NotFound, TuneqError, Unavailable
from tuneq.settings import Settings

MiB = 1024 * 1024
# Suffix of half-written files; listings skip them so a reader never sees one.
_TMP_SUFFIX = ".tuneq-tmp"


class ObjectStore(Protocol):
    """What api/ and worker/ rely on; LocalStore and S3Store behave the same.

    `get_file` writes atomically, `size` and the reads raise NotFound for a missing key,
    deleting what is absent is fine, `presigned_url` is None where the API must stream,
    and `check` raises Unavailable for readiness probes. `move_file` is `put_file` for a
    file the caller no longer needs: on success `path` is gone (a local store renames it).
    """

    def put_file(self, key: str, path: Path) -> None: ...
    def move_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_dir(self, prefix: str, directory: Path) -> list[str]: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def get_dir(self, prefix: str, directory: Path) -> None: ...
    def open_stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def presigned_url(self, key: str, *, filename: str | None = None) -> str | None: ...
    def check(self) -> None: ...


class _Store(ABC):
    """Directory transfers and `exists` written once over each store's single-key calls."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def _keys_under(self, base: str) -> Iterator[str]:
        """Every key that starts with `base` (a prefix ending in '/')."""

    def move_file(self, key: str, path: Path) -> None:
        """Store the file, then delete `path`; on failure `path` is left as it was."""
        self.put_file(key, path)
        path.unlink(missing_ok=True)

    def put_dir(self, prefix: str, directory: Path) -> list[str]:
        base = _dir_prefix(prefix)
        keys = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            key = base + path.relative_to(directory).as_posix()
            self.put_file(key, path)
            keys.append(key)
        return keys

    def get_dir(self, prefix: str, directory: Path) -> None:
        base = _dir_prefix(prefix)
        directory.mkdir(parents=True, exist_ok=True)
        for key in self._keys_under(base):
            # _join also stops a crafted key in a bucket from writing outside `directory`.
            self.get_file(key, _join(directory, key.removeprefix(base)))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFound:
            return False
        return True


class LocalStore(_Store):
    """Keys are files under `root`: the embedded stack's store, no server needed."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        return _join(self.root, key)

    def put_file(self, key: str, path: Path) -> None:
        with _atomic_path(self._path(key)) as tmp:
            shutil.copyfile(path, tmp)

    def move_file(self, key: str, path: Path) -> None:
        """A rename when `path` is on the store's filesystem (an upload's temporary file
        under the same home: no second copy of up to 1 GB), else a copy and a delete.
        Either way the object appears whole or not at all (rename is atomic)."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # another filesystem: copy instead
                raise
            super().move_file(key, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        with _atomic_path(self._path(key)) as tmp:
            tmp.write_bytes(data)

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        with _missing_as_not_found(key), _atomic_path(path) as tmp:
            shutil.copyfile(source, tmp)

    def open_stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        # Opened here, not in the generator, so a missing key fails before a response starts.
        with _missing_as_not_found(key):
            handle = self._path(key).open("rb")
        return _read_chunks(handle, chunk_size)

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"no object {key!r}")
        return path.stat().st_size

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        directory = self._path(_dir_prefix(prefix))
        if directory.is_dir():
            shutil.rmtree(directory)

    def presigned_url(self, key: str, *, filename: str | None = None) -> str | None:
        return None  # nothing to sign: the API streams local objects itself

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise Unavailable(f"object store directory {self.root} is not writable: {exc}") from exc

    def _keys_under(self, base: str) -> Iterator[str]:
        directory = self._path(base)
        if not directory.is_dir():
            return
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not path.name.endswith(_TMP_SUFFIX):
                yield path.relative_to(self.root).as_posix()


class S3Store(_Store):
    """Any S3-compatible endpoint (AWS, MinIO, moto) through one thread-safe boto3 client."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        chunk_bytes: int = 16 * MiB,
        presign_ttl_seconds: int = 600,
        create_bucket: bool = False,
        connect_timeout: float = 10.0,
        max_attempts: int = 5,
    ) -> None:
        if not 1 <= presign_ttl_seconds <= 900:
            raise ValueError("presign_ttl_seconds must be between 1 and 900 (15 minutes)")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.presign_ttl_seconds = presign_ttl_seconds
        # None keys fall through to boto3's own chain (environment, profile, instance role).
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            # Path style works with MinIO and any endpoint without wildcard DNS.
            s3={"addressing_style": "path"},
            signature_version="s3v4",  # X-Amz-Expires on presigned URLs
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # Presigned URLs name the host they were signed for: the one clients can reach
        # (MinIO is http://minio:9000 to the workers but 127.0.0.1:9000 to a laptop).
        self._presigner = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self._client
        )
        self._transfer = TransferConfig(
            multipart_threshold=chunk_bytes, multipart_chunksize=chunk_bytes
        )
        if create_bucket:
            self._create_bucket_if_missing(region)

    def _create_bucket_if_missing(self, region: str) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in {"404", "NoSuchBucket"}:
                raise
        extra: dict[str, Any] = {}
        if region != "us-east-1":  # the one region that takes no LocationConstraint
            extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(Bucket=self.bucket, **extra)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":  # another process won the race
                raise

    def put_file(self, key: str, path: Path) -> None:
        self._client.upload_file(str(path), self.bucket, key, Config=self._transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get_file(self, key: str, path: Path) -> None:
        with _missing_as_not_found(key), _atomic_path(path) as tmp:
            self._client.download_file(self.bucket, key, str(tmp), Config=self._transfer)

    def open_stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with _missing_as_not_found(key):
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        return _read_chunks(body, chunk_size)

    def size(self, key: str) -> int:
        with _missing_as_not_found(key):
            return self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> None:
        # A listing page holds at most 1000 keys, the most one delete_objects call takes.
        for page in self._pages(_dir_prefix(prefix)):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if not objects:
                continue
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
            )
            if errors := response.get("Errors"):
                raise TuneqError(
                    f"could not delete {len(errors)} objects under {prefix!r}: {errors[0]}"
                )

    def presigned_url(self, key: str, *, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": key}
        if filename is not None:
            params["ResponseContentDisposition"] = attachment_disposition(filename)
        return self._presigner.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self.presign_ttl_seconds
        )

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            where = self.endpoint_url or "AWS"
            raise Unavailable(
                f"object store bucket {self.bucket!r} at {where} is not reachable: {exc}"
            ) from exc

    def _pages(self, base: str) -> Iterator[dict[str, Any]]:
        paginator = self._client.get_paginator("list_objects_v2")
        return iter(paginator.paginate(Bucket=self.bucket, Prefix=base))

    def _keys_under(self, base: str) -> Iterator[str]:
        for page in self._pages(base):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):  # folder markers some tools create
                    yield item["Key"]


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name: a directory when embedded, S3 in production."""
    if settings.store == "local":
        return LocalStore(settings.resolved_store_dir)
    secret = settings.s3_secret_access_key
    return S3Store(
        bucket=settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        public_endpoint_url=settings.s3_public_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        chunk_bytes=settings.multipart_chunk_bytes,
        presign_ttl_seconds=settings.presign_ttl_seconds,
    )


def _join(root: Path, key: str) -> Path:
    """root/key, refusing keys that could name a file outside root."""
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or ".." in parts:
        raise ValueError(f"invalid object key {key!r}: must be a relative path without '..'")
    return root.joinpath(*parts)


def _dir_prefix(prefix: str) -> str:
    """'jobs/1' → 'jobs/1/'; an empty prefix is refused so nothing deletes the whole store."""
    stripped = prefix.strip("/")
    if not stripped:
        raise ValueError("an object prefix must not be empty")
    return stripped + "/"


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it only once the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _missing_as_not_found(key: str) -> Iterator[None]:
    """Turn "no such object" from either backend into the domain's NotFound."""
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFound(f"no object {key!r}") from exc
    except ClientError as exc:
        if _error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
            raise NotFound(f"no object {key!r}") from exc
        raise


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _read_chunks(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(chunk_size):
            yield chunk


def attachment_disposition(filename: str) -> str:
    """Content-Disposition for a download: an ASCII fallback plus the exact UTF-8 name."""
    fallback = filename.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename)}"

"""Reading a multipart/form-data upload as it arrives, never spooled whole.

`request.form()` writes each file part to a temporary file before the route runs; here
the `file` part's bytes go on to the caller chunk by chunk, so hashing, validation and
the temporary copy all happen in one pass over the body. The parsing is synchronous (and
CPU-bound), so it runs in a worker thread, fed by the event loop reading the body ahead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import PureWindowsPath
from typing import TypeVar

import anyio
from anyio import from_thread
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from tuneq.errors import InvalidRequest, PayloadTooLarge, field_error

# Room for the boundaries, the part headers and the small fields around the file's bytes.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_FIELD_BYTES = 1024
READ_AHEAD_BYTES = 4 << 20  # body read ahead of the parsing thread, at most (plus one piece)
FILE_FIELD = "file"
OTHER_FIELDS = frozenset({"purpose"})
DEFAULT_FILENAME = "upload.jsonl"

T = TypeVar("T")


class MultipartUpload:
    """One multipart body: the small fields are kept, the `file` part is streamed through."""

    def __init__(self, body: Iterable[bytes], *, boundary: bytes, max_body_bytes: int) -> None:
        self.filename = DEFAULT_FILENAME
        self.fields: dict[str, str] = {}
        self._body = body
        self._max_body_bytes = max_body_bytes
        self._received = 0
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._part_name: str | None = None
        self._field_value = bytearray()
        self._file_data: list[bytes] = []  # the file's bytes parsed from the last body chunk
        self._file_seen = False
        self._ended = False

    @property
    def purpose(self) -> str | None:
        """The `purpose` field, when sent; known once `file_chunks` is read to its end."""
        return self.fields.get("purpose")

    def file_chunks(self) -> Iterator[bytes]:
        """The `file` part's bytes as they arrive. Reading on to the end also collects the
        fields sent after the file, and checks the body was whole and had a `file` part."""
        for chunk in self._body:
            self._received += len(chunk)
            if self._received > self._max_body_bytes:
                raise PayloadTooLarge(
                    f"the request body is larger than the limit of {self._max_body_bytes} bytes",
                    param=FILE_FIELD,
                )
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                raise InvalidRequest(f"the multipart body is malformed: {exc}") from None
            pending, self._file_data = self._file_data, []
            yield from pending
        self._parser.finalize()
        if not self._ended:
            raise InvalidRequest("the multipart body ended before its closing boundary")
        if not self._file_seen:
            raise field_error(FILE_FIELD, "required: the dataset to upload")

    def _on_part_begin(self) -> None:
        self._disposition = b""
        self._part_name = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self._file_seen:
                raise field_error(FILE_FIELD, "sent more than once: upload one file at a time")
            self._file_seen = True
            sent = options.get(b"filename", b"").decode("utf-8", "replace")
            # Some clients send the path the file had on their machine; keep its last part.
            self.filename = PureWindowsPath(sent).name[:255] or DEFAULT_FILENAME
        elif name not in OTHER_FIELDS:
            raise field_error(name or "(no name)", "unknown field")
        self._part_name = name

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_name == FILE_FIELD:
            self._file_data.append(data[start:end])
            return
        self._field_value += data[start:end]
        if len(self._field_value) > MAX_FIELD_BYTES:
            raise field_error(str(self._part_name), f"longer than {MAX_FIELD_BYTES} bytes")

    def _on_part_end(self) -> None:
        if self._part_name != FILE_FIELD:
            self.fields[str(self._part_name)] = self._field_value.decode("utf-8", "replace")
        self._field_value.clear()
        self._part_name = None

    def _on_end(self) -> None:
        self._ended = True


async def read_upload(
    request: Request, *, max_upload_bytes: int, work: Callable[[MultipartUpload], T]
) -> T:
    """Check the request's headers, then run `work(upload)` in a worker thread while the
    event loop reads the body ahead of it.

    A declared Content-Length over the limit is refused before any byte is read.
    """
    max_body_bytes = max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body_bytes:
        raise PayloadTooLarge(
            f"the request body ({length} bytes) is larger than the limit of {max_body_bytes} bytes",
            param=FILE_FIELD,
        )
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequest(
            "send the file as multipart/form-data, in a field named 'file'",
            param="Content-Type",
        )
    body = _BodyReader(request.stream())
    upload = MultipartUpload(
        body.in_thread(), boundary=options[b"boundary"], max_body_bytes=max_body_bytes
    )
    error: Exception | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(body.fill)
        try:
            result = await run_in_threadpool(work, upload)
        except Exception as exc:  # raised below: out of the task group, not wrapped in a group
            error = exc
        finally:
            tasks.cancel_scope.cancel()  # `work` may stop early (a limit, an invalid file)
    if error is not None:
        raise error
    return result


class _BodyReader:
    """The request body, read on the event loop ahead of the thread that parses it.

    The server hands the body over in pieces of about 64 kB; fetching each one from the
    worker thread cost a trip to the event loop per piece, and nothing arrived while the
    thread parsed. Here the loop keeps reading (up to READ_AHEAD_BYTES) and the thread
    takes everything that has arrived in one trip. State is touched on the loop only.
    """

    def __init__(self, stream: AsyncIterator[bytes]) -> None:
        self._stream = stream
        self._chunks: list[bytes] = []
        self._size = 0
        self._ended = False
        self._error: Exception | None = None
        self._changed = anyio.Event()

    async def fill(self) -> None:
        """Read the body to its end, pausing while the thread is READ_AHEAD_BYTES behind."""
        try:
            async for chunk in self._stream:
                if not chunk:  # Starlette ends the stream with an empty piece
                    continue
                while self._size >= READ_AHEAD_BYTES:
                    await self._wait()
                self._chunks.append(chunk)
                self._size += len(chunk)
                self._notify()
        except Exception as exc:  # the client went away: the thread hears of it in order
            self._error = exc
        finally:
            self._ended = True
            self._notify()

    def in_thread(self) -> Iterator[bytes]:
        """The body for the worker thread, in the batches it finds waiting."""
        while (batch := from_thread.run(self._take)) is not None:
            yield batch

    async def _take(self) -> bytes | None:
        while not self._chunks and not self._ended:
            await self._wait()
        if self._chunks:
            batch = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            self._notify()
            return batch
        if self._error is not None:
            raise self._error
        return None

    async def _wait(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()  # anyio events fire once

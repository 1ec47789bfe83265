"""Downloads of stored objects: a redirect to a short-lived presigned URL where the store
signs one (S3), else a stream through the API (the local store)."""

from __future__ import annotations

from fastapi.responses import RedirectResponse, Response, StreamingResponse

from tuneq.storage import ObjectStore, attachment_disposition


def stored_object_response(
    store: ObjectStore, key: str, *, filename: str, media_type: str, size: int
) -> Response:
    url = store.presigned_url(key, filename=filename)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    return StreamingResponse(
        store.open_stream(key),
        media_type=media_type,
        headers={
            "Content-Length": str(size),
            "Content-Disposition": attachment_disposition(filename),
        },
    )

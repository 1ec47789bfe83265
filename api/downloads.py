"""Downloads of stored objects: a redirect to a short-lived presigned URL where the store
signs one (S3), else a stream through the API (the local store).

`?redirect=false` answers the presigned URL as JSON instead of redirecting to it: a browser
page that sends its key in a header cannot follow a redirect to another origin with
`fetch`, but it can navigate to the URL. Where the store signs nothing, the content is
streamed as always."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from tuneq.storage import ObjectStore, attachment_disposition

Redirect = Annotated[
    bool,
    Query(description="false: answer `{\"object\": \"download\", \"url\": ...}` (200) instead "
          "of a redirect to the presigned URL; a store that signs nothing streams anyway"),
]  # fmt: skip


def stored_object_response(
    store: ObjectStore,
    key: str,
    *,
    filename: str,
    media_type: str,
    size: int,
    redirect: bool = True,
) -> Response:
    url = store.presigned_url(key, filename=filename)
    if url is not None and not redirect:
        return JSONResponse({"object": "download", "url": url, "filename": filename})
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

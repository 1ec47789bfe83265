"""`/files`: upload a dataset (streamed, validated on the way), list, read, download, delete.

Thin: the rules (idempotency, limits, validation, storing) live in tuneq.files.service;
this module reads the HTTP request and renders the answer.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response

from api.deps import Caller, CallerDep, DbDep, SessionsDep, SettingsDep, StoreDep, TeamDep
from api.downloads import Redirect, stored_object_response
from api.openapi_docs import responses
from api.uploads import MultipartUpload, read_upload
from tuneq.files import service
from tuneq.files.schemas import FileDeleted, FilePublic, FilesPublic
from tuneq.settings import Settings
from tuneq.storage import ObjectStore

router = APIRouter(prefix="/files", tags=["files"])

Limit = Annotated[int, Query(ge=1, le=100)]
NO_FILE = (404, "no such file (another team's file does not exist for you)")
STORE = (503, "the object store did not answer")
# What an upload can be refused for (the facade's upload too, in OpenAI's shape).
UPLOAD_REFUSALS = (
    (403, "the team's stored bytes would pass its quota (the problem names it)"),
    (409, "a request with the same Idempotency-Key is still in progress"),
    (413, "the file is over TUNEQ_MAX_UPLOAD_BYTES; refused before it is read whole"),
    (422, "the body is not multipart/form-data with one `file`, or the file is not a valid "
          "dataset: `errors[]` names each line or archive member at fault, or the archive "
          "breaks a limit (invalid_training_file)"),
    STORE,
)  # fmt: skip

# The upload's multipart body in OpenAPI (read by api.uploads, not by FastAPI); the
# facade's upload (api/openai) takes the same body.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": sorted(service.PURPOSES)},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=FilePublic,
    openapi_extra=UPLOAD_BODY,
    responses=responses(*UPLOAD_REFUSALS),
)
async def upload_file(
    request: Request,
    caller: CallerDep,
    sessions: SessionsDep,
    store: StoreDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    public = await receive_upload(
        request,
        caller=caller,
        sessions=sessions,
        store=store,
        settings=settings,
        idempotency_key=idempotency_key,
    )
    return JSONResponse(public, status_code=201)


async def receive_upload(
    request: Request,
    *,
    caller: Caller,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    settings: Settings,
    idempotency_key: str | None,
) -> dict[str, Any]:
    """The upload in the request's multipart body, kept by the one upload use case: the new
    file as `FilePublic` JSON. Every road that takes uploads (the facade too) comes here."""

    def create(upload: MultipartUpload) -> dict[str, Any]:
        return service.upload_file(
            sessions=sessions,
            store=store,
            settings=settings,
            team=caller.team,
            upload=upload,
            idempotency_key=idempotency_key,
            actor=caller.actor,
        )

    # Reading, validating and storing are blocking work: all of it off the event loop.
    return await read_upload(request, max_upload_bytes=settings.max_upload_bytes, work=create)


@router.get("", response_model=FilesPublic)
def list_files(team: TeamDep, db: DbDep, limit: Limit = 20, after: str | None = None) -> Any:
    files, has_more = service.list_files(db=db, team=team, limit=limit, after=after)
    return FilesPublic(data=[FilePublic.of(f) for f in files], has_more=has_more)


@router.get("/{file_id}", response_model=FilePublic, responses=responses(NO_FILE))
def get_file(file_id: str, team: TeamDep, db: DbDep) -> Any:
    return FilePublic.of(service.get_file(db=db, team=team, file_id=file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"description": "the file's bytes", "content": {"application/octet-stream": {}}},
        307: {"description": "redirect=true on S3: a short-lived presigned URL in Location"},
        **responses(NO_FILE, STORE),
    },
)
def download_file(
    file_id: str, team: TeamDep, db: DbDep, store: StoreDep, redirect: Redirect = True
) -> Response:
    file = service.get_file(db=db, team=team, file_id=file_id)
    return stored_object_response(
        store,
        file.storage_key,
        filename=file.filename,
        media_type="application/octet-stream",
        size=file.bytes,
        redirect=redirect,
    )


@router.delete(
    "/{file_id}",
    response_model=FileDeleted,
    responses=responses(NO_FILE, (409, "a job that can still run uses the file"), STORE),
)
def delete_file(
    file_id: str, caller: CallerDep, db: DbDep, store: StoreDep, settings: SettingsDep
) -> Any:
    file = service.delete_file(
        db=db,
        store=store,
        team=caller.team,
        file_id=file_id,
        actor=caller.actor,
        cache=service.file_cache(settings),
    )
    return FileDeleted(id=file.id)

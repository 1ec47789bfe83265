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

from api.deps import DbDep, SessionsDep, SettingsDep, StoreDep, TeamDep
from api.downloads import Redirect, stored_object_response
from api.uploads import MultipartUpload, read_upload
from tuneq.files import service
from tuneq.files.schemas import FileDeleted, FilePublic, FilesPublic
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team

router = APIRouter(prefix="/files", tags=["files"])

Limit = Annotated[int, Query(ge=1, le=100)]

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


@router.post("", status_code=201, response_model=FilePublic, openapi_extra=UPLOAD_BODY)
async def upload_file(
    request: Request,
    team: TeamDep,
    sessions: SessionsDep,
    store: StoreDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    public = await receive_upload(
        request,
        team=team,
        sessions=sessions,
        store=store,
        settings=settings,
        idempotency_key=idempotency_key,
    )
    return JSONResponse(public, status_code=201)


async def receive_upload(
    request: Request,
    *,
    team: Team,
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
            team=team,
            upload=upload,
            idempotency_key=idempotency_key,
        )

    # Reading, validating and storing are blocking work: all of it off the event loop.
    return await read_upload(request, max_upload_bytes=settings.max_upload_bytes, work=create)


@router.get("", response_model=FilesPublic)
def list_files(team: TeamDep, db: DbDep, limit: Limit = 20, after: str | None = None) -> Any:
    files, has_more = service.list_files(db=db, team=team, limit=limit, after=after)
    return FilesPublic(data=[FilePublic.of(f) for f in files], has_more=has_more)


@router.get("/{file_id}", response_model=FilePublic)
def get_file(file_id: str, team: TeamDep, db: DbDep) -> Any:
    return FilePublic.of(service.get_file(db=db, team=team, file_id=file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 307: {}},
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


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, team: TeamDep, db: DbDep, store: StoreDep) -> Any:
    file = service.delete_file(db=db, store=store, team=team, file_id=file_id)
    return FileDeleted(id=file.id)

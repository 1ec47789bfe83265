"""`/files`: upload a dataset (streamed, validated on the way), list, read, download, delete.

Thin: the rules live in tuneq.files.service; this module reads the HTTP request and
applies the Idempotency-Key around the upload.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response

from api.deps import DbDep, SessionsDep, SettingsDep, StoreDep, TeamDep
from api.downloads import stored_object_response
from api.uploads import MultipartUpload, read_upload
from tuneq.db import transaction
from tuneq.files import service
from tuneq.files.schemas import FileDeleted, FilePublic, FilesPublic
from tuneq.idempotency.service import idempotent, request_hash
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team

router = APIRouter(prefix="/files", tags=["files"])

METHOD_PATH = "POST /files"
Limit = Annotated[int, Query(ge=1, le=100)]

_UPLOAD_BODY = {
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


@router.post("", status_code=201, response_model=FilePublic, openapi_extra=_UPLOAD_BODY)
async def upload_file(
    request: Request,
    team: TeamDep,
    sessions: SessionsDep,
    store: StoreDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    # Parsing, hashing, validating and storing are blocking work: all of it off the loop.
    create = partial(
        _create_file,
        team=team,
        sessions=sessions,
        object_store=store,
        settings=settings,
        idempotency_key=idempotency_key,
    )
    return await read_upload(request, max_upload_bytes=settings.max_upload_bytes, work=create)


def _create_file(
    upload: MultipartUpload,
    *,
    team: Team,
    sessions: sessionmaker[Session],
    object_store: ObjectStore,
    settings: Settings,
    idempotency_key: str | None,
) -> JSONResponse:
    with service.ingest_upload(chunks=upload.file_chunks(), settings=settings) as ingested:
        purpose = upload.fields.get("purpose", service.DEFAULT_PURPOSE)

        # The content's hash is known only now, so the key is claimed after reading the
        # body and before storing anything.
        with idempotent(
            sessions,
            team_id=team.id,
            key=idempotency_key,
            method_path=METHOD_PATH,
            fingerprint=request_hash(METHOD_PATH, ingested.sha256, upload.filename, purpose),
        ) as request:
            if request.replay is not None:
                return JSONResponse(request.replay.body, status_code=request.replay.status)
            with transaction(sessions) as db:
                file = service.store_upload(
                    db=db,
                    store=object_store,
                    team=team,
                    upload=ingested,
                    filename=upload.filename,
                    purpose=purpose,
                )
                public = FilePublic.of(file).model_dump(mode="json")
                request.record(db, 201, public)
    return JSONResponse(public, status_code=201)


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
def download_file(file_id: str, team: TeamDep, db: DbDep, store: StoreDep) -> Response:
    file = service.get_file(db=db, team=team, file_id=file_id)
    return stored_object_response(
        store,
        file.storage_key,
        filename=file.filename,
        media_type="application/octet-stream",
        size=file.bytes,
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, team: TeamDep, db: DbDep, store: StoreDep) -> Any:
    file = service.delete_file(db=db, store=store, team=team, file_id=file_id)
    return FileDeleted(id=file.id)

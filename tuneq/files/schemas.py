"""What the API says about files: OpenAI's file object, plus what validation found."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from tuneq.files.models import File


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int  # unix seconds, as OpenAI
    filename: str
    purpose: str
    format: str
    examples: int
    status: Literal["processed"] = "processed"  # only valid files are kept
    report: dict[str, Any]

    @classmethod
    def of(cls, file: File) -> FilePublic:
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=int(file.created_at.timestamp()),
            filename=file.filename,
            purpose=file.purpose,
            format=file.format,
            examples=file.examples,
            report=file.report,
        )


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True

"""Documents the API shows, each defined once: an ordered table of fields.

A `Field` names a document's member, its type, the ORM attribute (and JSON member) it comes
from, and how the stored value shows (`Shown`). `public_model` makes the pydantic schema from
the table, with `of(row_object)`; api/job_reads.py makes the job document's SELECT and its
fast encoder from the same table, so that the two roads cannot drift apart in names, order
or conversions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Self

from pydantic import BaseModel, create_model
from sqlalchemy import JSON, Column
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql import ColumnElement


def unix_seconds(value: datetime | None) -> int | None:
    """A timestamp as the API shows it: whole seconds since the epoch."""
    return int(value.timestamp()) if value is not None else None


@dataclass(frozen=True, eq=False)
class Shown:
    """How a stored value shows in a document, here from the ORM's Python value (the fast
    road in api/job_reads.py has its conversion from the driver's value for each)."""

    name: str
    from_orm: Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def _object(value: dict[str, Any] | None) -> dict[str, Any]:
    return value or {}


def _seconds_or_zero(value: datetime | None) -> int:
    return unix_seconds(value) or 0


AS_STORED = Shown("a plain value, as stored", _same)
JSON_OR_NULL = Shown("a JSON value, null for SQL NULL", _same)
OBJECT = Shown("a JSON object, {} for SQL NULL or JSON null", _object)
FLAG = Shown("a boolean", _same)
SECONDS = Shown("a timestamp in seconds, null for none", unix_seconds)
SECONDS_OR_ZERO = Shown("a timestamp in seconds, 0 for none", _seconds_or_zero)


@dataclass(frozen=True)
class Field:
    """One member of a document: from `source` (a JSON column's `member` when given) shown
    as `shown`; a field with no source is the constant `constant`."""

    name: str
    annotation: Any
    source: QueryableAttribute[Any] | None = None
    member: str | None = None
    shown: Shown = AS_STORED
    constant: Any = None

    def read(self, obj: Any) -> Any:
        """The field's value in the document of an ORM object."""
        assert self.source is not None, self.name
        value = getattr(obj, self.source.key)
        if self.member is not None:
            value = (value or {}).get(self.member)
        return self.shown.from_orm(value)

    def column(self) -> ColumnElement[Any]:
        """What a SELECT reads for the field, from the table (not the ORM entity)."""
        assert self.source is not None, self.name
        column: Column[Any] = self.source.property.columns[0]
        if self.member is None:
            return column
        assert isinstance(column.type, JSON), f"{self.name}: a member of a non-JSON column"
        return column[self.member]


class PublicDocument(BaseModel):
    """A schema made by `public_model`: its fields are `document_fields`, in their order."""

    document_fields: ClassVar[tuple[Field, ...]] = ()

    @classmethod
    def of(cls, obj: Any) -> Self:
        return cls(**{f.name: f.read(obj) for f in cls.document_fields if f.source is not None})


def public_model(name: str, fields: Sequence[Field], *, module: str) -> type[PublicDocument]:
    """The pydantic schema of a document: one field per `Field`, in the table's order."""
    definitions: dict[str, Any] = {
        f.name: (f.annotation, ... if f.source is not None else f.constant) for f in fields
    }
    model = create_model(name, __base__=PublicDocument, __module__=module, **definitions)
    model.document_fields = tuple(fields)
    return model

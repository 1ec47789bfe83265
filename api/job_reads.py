"""The two reads clients poll: `GET /jobs/{id}` and `GET /jobs`, from rows straight to bytes.

Every other route goes through the ORM (tuneq.jobs.service) in a worker thread. These two
are most of an API's traffic (a client polls its job every few seconds while it trains), so
they take a shorter road, with the same answers:

- PostgreSQL: asyncpg on the event loop. No thread hop, no ORM identity map, no pool
  pre-ping (a connection the server closed is seen by the loop as it closes), statements
  prepared once per connection. Measured per request on 2 cores (bench/api_load.py): the
  thread + psycopg + ORM road cost ~1.2 ms of the API's CPU, this one a fraction of it.
- SQLite (the embedded shape): the same statements through the pool's raw sqlite3
  connection in a worker thread, outside a transaction: a plain read in WAL mode takes no
  lock, where a session's BEGIN IMMEDIATE took the write lock.

The document is the job's table of fields (tuneq.jobs.schemas.JOB_DOCUMENT), the one
`JobPublic` is made from: its SELECT's columns (`COLUMNS`), the encoded struct
(`JobDocument`) and each field's conversion come from that table, in its order. The
statements are SQLAlchemy Core on the jobs table, compiled once per dialect and per shape of
filters, and run by the driver directly. The JSON columns are not decoded: their text (from
the database) goes into the response as it is (`msgspec.Raw`), and the rest of the document
is encoded in one C pass (tests/test_job_reads.py holds the documents equal to
`JobPublic.of(job)` for jobs in every state, on both databases).

PgBouncer in transaction mode does not keep prepared statements: set
TUNEQ_DATABASE_STATEMENT_CACHE=0 behind one (asyncpg's `statement_cache_size`). The API's
PostgreSQL URL is SQLAlchemy's with the driver left out (asyncpg reads libpq's parameters,
such as sslmode, and takes any other query parameter as a server setting).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any, ClassVar

import anyio
import msgspec
from sqlalchemy import JSON, Integer, Select, bindparam, select
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Dialect, Engine

from tuneq.documents import (
    AS_STORED,
    FLAG,
    JSON_OR_NULL,
    OBJECT,
    SECONDS,
    SECONDS_OR_ZERO,
    Shown,
    unix_seconds,
)
from tuneq.jobs.models import Job
from tuneq.jobs.schemas import JOB_DOCUMENT

_JOBS = Job.__table__
COLUMNS = tuple(f.column() for f in JOB_DOCUMENT if f.source is not None)
_CONSTANTS = tuple((i, f.constant) for i, f in enumerate(JOB_DOCUMENT) if f.source is None)
_RAW = (OBJECT, JSON_OR_NULL)  # JSON text from the database, passed through

JobDocument = msgspec.defstruct(
    "JobDocument",
    [(f.name, msgspec.Raw if f.shown in _RAW else f.annotation) for f in JOB_DOCUMENT],
    gc=False,
    module=__name__,
)


class JobList(msgspec.Struct, gc=False):
    object: str
    data: list[JobDocument]
    has_more: bool


_encode = msgspec.json.Encoder().encode
_EMPTY = msgspec.Raw(b"{}")
_NULL = msgspec.Raw(b"null")


def _object(text: str | None) -> msgspec.Raw:
    """A JSON column that is always an object in the document ({} for NULL or null)."""
    return _EMPTY if text is None or text == "null" else msgspec.Raw(text)


def _nullable(text: str | None) -> msgspec.Raw:
    return _NULL if text is None else msgspec.Raw(text)


def _from_row(seconds: Callable[[Any], int | None]) -> dict[Shown, Callable[[Any], Any] | None]:
    """Each way a field shows (tuneq.documents), from a driver's value: JSON as the
    database's text, timestamps through `seconds`; None where the value is shown as it is."""
    return {
        AS_STORED: None,
        JSON_OR_NULL: _nullable,
        OBJECT: _object,
        FLAG: bool,  # SQLite's 0 and 1
        SECONDS: seconds,
        SECONDS_OR_ZERO: lambda value: seconds(value) or 0,
    }


class _Documents:
    """Rows of COLUMNS as documents, with one driver's timestamps."""

    def __init__(self, seconds: Callable[[Any], int | None]) -> None:
        shown = _from_row(seconds)  # a field shown some other way: a KeyError at import
        self._conversions = tuple(
            (i, convert)
            for i, f in enumerate(JOB_DOCUMENT)
            if f.source is not None and (convert := shown[f.shown]) is not None
        )

    def one(self, row: Sequence[Any]) -> Any:
        values = list(row)
        for i, constant in _CONSTANTS:
            values.insert(i, constant)
        for i, convert in self._conversions:
            values[i] = convert(values[i])
        return JobDocument(*values)

    def encode(self, row: Sequence[Any]) -> bytes:
        return _encode(self.one(row))

    def encode_page(self, rows: Sequence[Sequence[Any]], limit: int) -> bytes:
        """A page's document from up to `limit` + 1 rows (the extra one: `has_more`)."""
        documents = [self.one(row) for row in rows[:limit]]
        return _encode(JobList("list", documents, len(rows) > limit))


@dataclass(frozen=True)
class JobQuery:
    """A page of a team's jobs: newest first, before `after`, with the filters given."""

    team_id: str
    limit: int
    after: str | None = None
    status: str | None = None
    model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def values(self) -> dict[str, Any]:
        """The page statement's parameters by name (one more row than the page: `has_more`)."""
        values: dict[str, Any] = {
            "team_id": self.team_id,
            "after": self.after,
            "status": self.status,
            "model": self.model,
            "limit": self.limit + 1,
        }
        for n, (key, value) in enumerate(self.metadata.items()):
            values[f"key_{n}"], values[f"value_{n}"] = key, value
        return values


@dataclass(frozen=True)
class _Shape:
    """Which filters a page has: each shape is a statement of its own."""

    after: bool
    status: bool
    model: bool
    metadata: int

    @classmethod
    def of(cls, query: JobQuery) -> _Shape:
        return cls(bool(query.after), bool(query.status), bool(query.model), len(query.metadata))


def _page_select(shape: _Shape) -> Select[Any]:
    """Newest first, with the shape's filters; metadata values compare as text (as
    `Job.metadata_[key].as_string()` does)."""
    where = [_JOBS.c.team_id == bindparam("team_id")]
    if shape.after:
        where.append(_JOBS.c.id < bindparam("after"))
    if shape.status:
        where.append(_JOBS.c.state == bindparam("status"))
    if shape.model:
        where.append(_JOBS.c.model == bindparam("model"))
    for n in range(shape.metadata):
        key = bindparam(f"key_{n}", type_=JSON.JSONStrIndexType)
        where.append(_JOBS.c.metadata[key].as_string() == bindparam(f"value_{n}"))
    return (
        select(*COLUMNS)
        .where(*where)
        .order_by(_JOBS.c.id.desc())
        .limit(bindparam("limit", type_=Integer))
    )


@dataclass(frozen=True)
class _Compiled:
    """A statement in one driver's SQL, with its positional parameters: each a name to take
    from the values given, or a constant of the statement (a JSON member's key), both
    prepared for the driver as SQLAlchemy would (SQLite's JSON paths: '$."key"')."""

    sql: str
    params: tuple[tuple[str | None, Any, Callable[[Any], Any] | None], ...]

    @classmethod
    def of(cls, statement: Select[Any], dialect: Dialect) -> _Compiled:
        compiled = statement.compile(dialect=dialect)
        params = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                params.append((name, None, process))
            else:
                params.append((None, process(bind.value) if process else bind.value, None))
        return cls(compiled.string, tuple(params))

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        return [
            constant if name is None else process(values[name]) if process else values[name]
            for name, constant, process in self.params
        ]


@cache
def _dialect(name: str) -> Dialect:
    """The dialect the statements are written in: the driver's paramstyle ($1 or ?)."""
    return {"postgresql": PGDialect_asyncpg, "sqlite": SQLiteDialect_pysqlite}[name]()


@cache
def _get(dialect: str) -> _Compiled:
    """The job by id, if the team's."""
    by_id = _JOBS.c.id == bindparam("job_id"), _JOBS.c.team_id == bindparam("team_id")
    return _Compiled.of(select(*COLUMNS).where(*by_id), _dialect(dialect))


@lru_cache(maxsize=64)  # a shape per combination of filters and count of metadata keys
def _page(dialect: str, shape: _Shape) -> _Compiled:
    return _Compiled.of(_page_select(shape), _dialect(dialect))


class JobReads(ABC):
    """The job document by id, and a page of a team's jobs, as response bytes: the same
    statements (in the reader's `dialect`) and documents for every driver, which only runs
    them (`_rows`)."""

    dialect: ClassVar[str]
    documents: ClassVar[_Documents]

    @abstractmethod
    async def _rows(self, sql: str, args: list[Any]) -> Sequence[Sequence[Any]]:
        """The statement's rows, through the driver."""

    async def get(self, *, team_id: str, job_id: str) -> bytes | None:
        """The job's document, or None when the team has no such job."""
        statement = _get(self.dialect)
        args = statement.args({"job_id": job_id, "team_id": team_id})
        rows = await self._rows(statement.sql, args)
        return self.documents.encode(rows[0]) if rows else None

    async def page(self, query: JobQuery) -> bytes:
        """`{"object": "list", "data": [...], "has_more": ...}`, newest first."""
        statement = _page(self.dialect, _Shape.of(query))
        rows = await self._rows(statement.sql, statement.args(query.values()))
        return self.documents.encode_page(rows, query.limit)

    async def close(self) -> None:  # noqa: B027 - most readers hold nothing
        """Release what the reader holds."""


# ----------------------------------------------------------------------------- PostgreSQL


async def _nothing_to_reset(connection: Any) -> None:
    """These connections run single SELECTs and change no session state: no reset query
    (asyncpg's default, a second round trip per read) before one goes back to the pool.
    asyncpg still rolls back a transaction left open, had one been."""


class PostgresJobReads(JobReads):
    """Reads on the event loop through an asyncpg pool, opened lazily (the API starts while
    the database is down, as it does with SQLAlchemy's pool)."""

    dialect = "postgresql"
    documents = _Documents(unix_seconds)

    def __init__(self, dsn: str, *, max_connections: int, statement_cache_size: int) -> None:
        self._dsn = dsn
        self._max = max_connections
        self._statement_cache_size = statement_cache_size
        self._pool: Any = None
        self._opening = anyio.Lock()

    async def _connections(self) -> Any:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    import asyncpg

                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._max,
                        statement_cache_size=self._statement_cache_size,
                        reset=_nothing_to_reset,
                    )
        return self._pool

    async def _rows(self, sql: str, args: list[Any]) -> Sequence[Sequence[Any]]:
        pool = await self._connections()
        return await pool.fetch(sql, *args)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


# ----------------------------------------------------------------------------- SQLite


def _sqlite_seconds(value: str | None) -> int | None:
    """SQLite keeps the UTC time as text (tuneq.db.UTCDateTime, or strftime for db_now)."""
    if value is None:
        return None
    return int(datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp())


class SqliteJobReads(JobReads):
    """Reads through the engine's pooled sqlite3 connections, in worker threads (at most as
    many at once as the pool holds), each a single statement with no transaction around it."""

    dialect = "sqlite"
    documents = _Documents(_sqlite_seconds)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._limiter = anyio.CapacityLimiter(max(1, getattr(engine.pool, "size", lambda: 1)()))

    def _fetch(self, statement: str, args: Sequence[Any]) -> list[Any]:
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(statement, tuple(args))
                return cursor.fetchall()
            finally:
                cursor.close()
        finally:
            connection.close()  # back to the pool

    async def _rows(self, sql: str, args: list[Any]) -> Sequence[Sequence[Any]]:
        return await anyio.to_thread.run_sync(self._fetch, sql, args, limiter=self._limiter)


def open_job_reads(
    engine: Engine, *, read_connections: int = 20, statement_cache_size: int = 100
) -> JobReads:
    """The reader for the engine's database: on PostgreSQL, a pool of its own of at most
    `read_connections` (opened as needed), on SQLite the engine's pool."""
    if engine.dialect.name == "postgresql":
        dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        return PostgresJobReads(
            dsn, max_connections=read_connections, statement_cache_size=statement_cache_size
        )
    if engine.dialect.name == "sqlite":
        return SqliteJobReads(engine)
    raise ValueError(f"no job reader for the {engine.dialect.name} dialect")

"""The two reads clients poll: `GET /jobs/{id}` and `GET /jobs`, from rows straight to bytes.

Every other route goes through the ORM (tuneq.jobs.service) in a worker thread. These two
are most of an API's traffic (a client polls its job every few seconds while it trains), so
they take a shorter road, with the same answers:

- PostgreSQL: asyncpg on the event loop. No thread hop, no ORM identity map, no pool
  pre-ping (a connection the server closed is seen by the loop as it closes), statements
  prepared once per connection. Measured per request on 2 cores (bench/api_load.py): the
  thread + psycopg + ORM road cost ~1.2 ms of the API's CPU, this one a fraction of it.
- SQLite (the embedded shape): the same SQL through the pool's raw sqlite3 connection in a
  worker thread, outside a transaction: a plain read in WAL mode takes no lock, where a
  session's BEGIN IMMEDIATE took the write lock.

The JSON columns are not decoded: their text (from the database) goes into the response as
it is (`msgspec.Raw`), and the rest of the document is encoded in one C pass. A document
here is the one `JobPublic.of(job)` makes, field for field and in the same order
(tests/test_job_reads.py holds the two equal for jobs in every state, on both databases).
The columns are named once, in `COLUMNS`; `document` turns one row of them into bytes.

PgBouncer in transaction mode does not keep prepared statements: set
TUNEQ_DATABASE_STATEMENT_CACHE=0 behind one (asyncpg's `statement_cache_size`). The API's
PostgreSQL URL is SQLAlchemy's with the driver left out (asyncpg reads libpq's parameters,
such as sslmode, and takes any other query parameter as a server setting).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from sqlalchemy.engine import Engine

from tuneq.jobs.schemas import unix_seconds

COLUMNS = (
    "id",
    "state",
    "model",
    "task",
    "{method}",
    "{hyperparameters}",
    "training_file_id",
    "validation_file_id",
    "suffix",
    "metadata",
    "estimate",
    "progress",
    "attempt",
    "trained_tokens",
    "error",
    "result",
    "cancel_requested",
    "created_at",
    "started_at",
    "finished_at",
)

_EMPTY = msgspec.Raw(b"{}")
_NULL = msgspec.Raw(b"null")


class JobDocument(msgspec.Struct, gc=False):
    """`JobPublic`'s fields in its order; the JSON columns as the database holds them."""

    id: str
    object: str
    status: str
    model: str
    task: str
    method: msgspec.Raw
    hyperparameters: msgspec.Raw
    training_file: str
    validation_file: str | None
    suffix: str | None
    metadata: msgspec.Raw
    estimate: msgspec.Raw
    progress: msgspec.Raw
    attempt: int
    trained_tokens: int | None
    error: msgspec.Raw
    result: msgspec.Raw
    cancel_requested: bool
    created_at: int
    started_at: int | None
    finished_at: int | None


class JobList(msgspec.Struct, gc=False):
    object: str
    data: list[JobDocument]
    has_more: bool


_encode = msgspec.json.Encoder().encode


def _object(text: str | None) -> msgspec.Raw:
    """A JSON column that is always an object in the document ({} for NULL or null)."""
    return _EMPTY if text is None or text == "null" else msgspec.Raw(text)


def _nullable(text: str | None) -> msgspec.Raw:
    return _NULL if text is None else msgspec.Raw(text)


def document(row: Sequence[Any], when: Callable[[Any], int | None]) -> JobDocument:
    """One row of COLUMNS as the document; `when` turns the driver's timestamp to seconds."""
    (
        id_,
        state,
        model,
        task,
        method,
        hyperparameters,
        training_file,
        validation_file,
        suffix,
        metadata,
        estimate,
        progress,
        attempt,
        trained_tokens,
        error,
        result,
        cancel_requested,
        created_at,
        started_at,
        finished_at,
    ) = row
    return JobDocument(
        id_,
        "job",
        state,
        model,
        task,
        _object(method),
        _object(hyperparameters),
        training_file,
        validation_file,
        suffix,
        _object(metadata),
        _nullable(estimate),
        _nullable(progress),
        attempt,
        trained_tokens,
        _nullable(error),
        _nullable(result),
        bool(cancel_requested),
        when(created_at) or 0,
        when(started_at),
        when(finished_at),
    )


def _encode_page(
    rows: Sequence[Sequence[Any]], limit: int, when: Callable[[Any], int | None]
) -> bytes:
    """A page's document from up to `limit` + 1 rows (the extra one: `has_more`)."""
    documents = [document(row, when) for row in rows[:limit]]
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


class JobReads(ABC):
    """The job document by id, and a page of a team's jobs, as response bytes."""

    @abstractmethod
    async def get(self, *, team_id: str, job_id: str) -> bytes | None:
        """The job's document, or None when the team has no such job."""

    @abstractmethod
    async def page(self, query: JobQuery) -> bytes:
        """`{"object": "list", "data": [...], "has_more": ...}`, newest first."""

    async def close(self) -> None:  # noqa: B027 - most readers hold nothing
        """Release what the reader holds."""


class _Sql:
    """The two statements in one dialect: `param(n)` writes the n-th placeholder (1-based),
    `json_field(column, key)` an object member as JSON text, `json_text(column, param)` a
    member named by a parameter as SQL text (metadata values are strings), `key_arg(key)`
    that parameter's value."""

    def __init__(
        self,
        *,
        param: Callable[[int], str],
        json_field: Callable[[str, str], str],
        json_text: Callable[[str, str], str],
        key_arg: Callable[[str], str] = str,
    ) -> None:
        self.param = param
        self.json_text = json_text
        self.key_arg = key_arg
        fields = {name: json_field("resolved", name) for name in ("method", "hyperparameters")}
        self.columns = ", ".join(column.format(**fields) for column in COLUMNS)
        self.get = f"SELECT {self.columns} FROM jobs WHERE id = {param(1)} AND team_id = {param(2)}"

    def page(self, query: JobQuery) -> tuple[str, list[Any]]:
        """The statement and its arguments (one more row than the page: `has_more`)."""
        args: list[Any] = [query.team_id]
        where = [f"team_id = {self.param(1)}"]

        def arg(value: Any) -> str:
            args.append(value)
            return self.param(len(args))

        if query.after:
            where.append(f"id < {arg(query.after)}")
        if query.status:
            where.append(f"state = {arg(query.status)}")
        if query.model:
            where.append(f"model = {arg(query.model)}")
        for key, value in query.metadata.items():
            where.append(f"{self.json_text('metadata', arg(self.key_arg(key)))} = {arg(value)}")
        statement = (
            f"SELECT {self.columns} FROM jobs WHERE {' AND '.join(where)} "
            f"ORDER BY id DESC LIMIT {arg(query.limit + 1)}"
        )
        return statement, args


# ----------------------------------------------------------------------------- PostgreSQL


_PG = _Sql(
    param=lambda n: f"${n}",
    json_field=lambda column, key: f"{column} -> '{key}'",
    json_text=lambda column, key: f"({column} ->> {key}::text)",
)


async def _nothing_to_reset(connection: Any) -> None:
    """These connections run single SELECTs and change no session state: no reset query
    (asyncpg's default, a second round trip per read) before one goes back to the pool.
    asyncpg still rolls back a transaction left open, had one been."""


class PostgresJobReads(JobReads):
    """Reads on the event loop through an asyncpg pool, opened lazily (the API starts while
    the database is down, as it does with SQLAlchemy's pool)."""

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

    async def get(self, *, team_id: str, job_id: str) -> bytes | None:
        pool = await self._connections()
        row = await pool.fetchrow(_PG.get, job_id, team_id)
        return None if row is None else _encode(document(row, unix_seconds))

    async def page(self, query: JobQuery) -> bytes:
        statement, args = _PG.page(query)
        pool = await self._connections()
        rows = await pool.fetch(statement, *args)
        return _encode_page(rows, query.limit, unix_seconds)

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


def _sqlite_key_path(key: str) -> str:
    # As SQLAlchemy's JSON index on SQLite writes it: '$."key"'.
    return f'$."{key}"'


_SQLITE = _Sql(
    param=lambda n: "?",
    # json_extract gives an object member as its JSON text (a string member would come
    # back as bare SQL text: method and hyperparameters are always objects).
    json_field=lambda column, key: f"json_extract({column}, '$.{key}')",
    json_text=lambda column, key: f"json_extract({column}, {key})",
    key_arg=_sqlite_key_path,
)


class SqliteJobReads(JobReads):
    """Reads through the engine's pooled sqlite3 connections, in worker threads (at most as
    many at once as the pool holds), each a single statement with no transaction around it."""

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

    async def get(self, *, team_id: str, job_id: str) -> bytes | None:
        rows = await anyio.to_thread.run_sync(
            self._fetch, _SQLITE.get, (job_id, team_id), limiter=self._limiter
        )
        return _encode(document(rows[0], _sqlite_seconds)) if rows else None

    async def page(self, query: JobQuery) -> bytes:
        statement, args = _SQLITE.page(query)
        rows = await anyio.to_thread.run_sync(self._fetch, statement, args, limiter=self._limiter)
        return _encode_page(rows, query.limit, _sqlite_seconds)


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

"""The database: engine, sessions, and the two SQL clock expressions leases need.

PostgreSQL in production, SQLite when embedded; the same models and queries run on both.
Time that decides ownership (leases) is always the database's clock, never a worker's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, MetaData, create_engine, event, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import TypeDecorator

# The largest integer SQLite's INTEGER and PostgreSQL's BIGINT hold: a row id, a cursor. A
# number past it given in a request is refused as invalid, never sent to the database.
MAX_ROW_ID = 2**63 - 1

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the way out, on PostgreSQL and on SQLite alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # a timestamp SQLite computed itself (db_now)
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class db_now(FunctionElement[datetime]):  # noqa: N801 - reads as SQL
    """The database's current time."""

    type = UTCDateTime()
    inherit_cache = True


class seconds_from_now(FunctionElement[datetime]):  # noqa: N801 - reads as SQL
    """The database's current time plus a number of seconds (a lease deadline)."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = float(seconds)


@compiles(db_now)
def _now_default(element: db_now, compiler: Any, **kw: Any) -> str:
    return "clock_timestamp()"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


@compiles(seconds_from_now)
def _later_default(element: seconds_from_now, compiler: Any, **kw: Any) -> str:
    return f"(clock_timestamp() + interval '{element.seconds:.3f} seconds')"


@compiles(seconds_from_now, "sqlite")
def _later_sqlite(element: seconds_from_now, compiler: Any, **kw: Any) -> str:
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', '{element.seconds:+.3f} seconds')"


_clock_skew = timedelta(0)


def utcnow() -> datetime:
    """This process's clock. Leases and outbox delays are judged by the database's clock
    (`db_now`), never by this one: a worker's clock may be off (tuneq/faults.py skews it)."""
    return datetime.now(UTC) + _clock_skew


def set_clock_skew(seconds: float) -> None:
    global _clock_skew
    _clock_skew = timedelta(seconds=seconds)


def make_engine(url: str, *, idle_in_transaction_seconds: float = 60.0) -> Engine:
    """An engine on `url`. On PostgreSQL a session left idle inside a transaction for
    `idle_in_transaction_seconds` is ended by the server, its locks released."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":  # a fresh TUNEQ_HOME: create it
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            # Unescaped UTF-8 in JSON columns: SQLite's json paths ($."équipe") compare the
            # stored text, which json.dumps would have turned into \u escapes.
            json_serializer=partial(json.dumps, ensure_ascii=False),
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    engine = create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=_PG_NETWORK
    )
    event.listen(
        engine, "connect", partial(_pg_session, idle_ms=int(idle_in_transaction_seconds * 1000))
    )
    return engine


def _pg_session(dbapi_connection: Any, _record: Any, *, idle_ms: int) -> None:
    """The server's side of a client that vanished mid-transaction (a partition sends no
    reset): the server ends the session once it sits idle in its transaction too long, or
    once its keepalives go unanswered, and the transaction's row locks go with it; else a
    cut-off worker's open transaction would hold its job's row, and every cancel and the
    reaper behind it, for as long as the server's TCP stack waits (hours)."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")
    for name, value in (("idle", 10), ("interval", 5), ("count", 3)):
        cursor.execute(f"SET tcp_keepalives_{name} = {value}")
    cursor.close()
    dbapi_connection.commit()  # SET is transactional: keep it past the first rollback


# A database that vanishes without a word (a host gone, a partition that drops packets)
# must fail a connect or a query in seconds, not after TCP's quarter of an hour: a worker
# judges its lease by the clock and must get its thread back to stop by itself in time.
_PG_NETWORK = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # ms: data sent and not acknowledged for this long fails
}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Autocommit at the driver level so that BEGIN below is ours, not pysqlite's.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    # Take the write lock at BEGIN: a read-then-write transaction (a claim, an idempotency
    # key) cannot be overtaken between its read and its write by another process.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit at the end, roll back on any exception."""
    with factory() as session, session.begin():
        yield session

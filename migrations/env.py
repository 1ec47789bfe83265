"""Alembic environment: the URL comes from tuneq.migrate, the engine from tuneq.db.make_engine.

make_engine puts SQLite in driver-level autocommit and issues BEGIN IMMEDIATE itself, so
DDL is transactional there too: every pending revision runs in one transaction on both
databases, and a failed upgrade leaves the schema as it was.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import event

import tuneq.models
from tuneq.db import UTCDateTime, make_engine


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Migrations hold plain SQLAlchemy types, so that they keep working when tuneq.db changes.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _foreign_keys_off(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA foreign_keys=OFF")


def run_migrations() -> None:
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table (copy, drop, rename); with foreign keys on, the drop
        # would cascade into the child rows. SQLite ignores the pragma inside a transaction,
        # so it is set on connect, and the references are checked before commit instead.
        event.listen(engine, "connect", _foreign_keys_off)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=tuneq.models.Base.metadata,
                render_as_batch=True,
                compare_type=True,
                render_item=render_item,
                transactional_ddl=True,
            )
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration broke foreign keys: {broken[:5]}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("tuneq migrations run against a database; offline (--sql) mode is off")
run_migrations()

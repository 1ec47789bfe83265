"""Migrations build exactly the models' schema, on SQLite and on PostgreSQL, and undo it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
from tuneq import migrate
from tuneq.db import make_engine
from tuneq.models import Base

BROKEN_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))
    raise RuntimeError("migration failed halfway")


def downgrade():
    pass
"""


@pytest.fixture(scope="module")
def postgres_server() -> str:
    return require(postgres_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tuneq.db'}"
        return
    url = fresh_postgres_database(request.getfixturevalue("postgres_server"))
    yield url
    drop_postgres_database(url)


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return set(sa.inspect(connection).get_table_names())
    finally:
        engine.dispose()


def schema_differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_builds_exactly_the_models_schema(database_url: str) -> None:
    assert migrate.current(database_url) is None

    migrate.upgrade(database_url)

    assert migrate.current(database_url) == migrate.head()
    assert tables(database_url) == set(Base.metadata.tables) | {"alembic_version"}
    assert schema_differences(database_url) == []


def test_downgrade_to_base_drops_every_table(database_url: str) -> None:
    migrate.upgrade(database_url)

    migrate.downgrade(database_url, "base")

    assert tables(database_url) == {"alembic_version"}
    assert migrate.current(database_url) is None


def test_a_failed_upgrade_leaves_the_database_as_it_was(database_url: str, tmp_path: Path) -> None:
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    broken = BROKEN_REVISION.format(head=migrate.head())
    (scripts / "versions" / "9999_broken.py").write_text(broken)
    config = migrate.alembic_config(database_url)
    config.set_main_option("script_location", str(scripts))

    with pytest.raises(RuntimeError, match="halfway"):
        command.upgrade(config, "head")

    # Every pending revision runs in one transaction, SQLite included.
    assert tables(database_url) == set()
    assert migrate.current(database_url) is None

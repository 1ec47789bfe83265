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


def _jobs_indexes(url: str) -> dict[str, str]:
    """The jobs table's indexes by name, each with its definition (PostgreSQL's pg_indexes,
    SQLite's sqlite_master), and the table's storage options (PostgreSQL; "" on SQLite)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                rows = connection.exec_driver_sql(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND "
                    "tbl_name = 'jobs' AND sql IS NOT NULL"
                ).all()
                return dict(rows) | {"options": ""}
            rows = connection.exec_driver_sql(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'jobs'"
            ).all()
            options = connection.exec_driver_sql(
                "SELECT coalesce(array_to_string(reloptions, ','), '') FROM pg_class "
                "WHERE relname = 'jobs'"
            ).scalar_one()
            return dict(rows) | {"options": options}
    finally:
        engine.dispose()


def test_0006_indexes_the_claim_and_leaves_the_heartbeat_hot_and_undoes_it(
    database_url: str,
) -> None:
    migrate.upgrade(database_url, "0006")

    indexes = _jobs_indexes(database_url)
    assert "ix_jobs_state_lease" not in indexes
    assert "(queue, team_id, created_at, id) WHERE" in indexes["ix_jobs_queued"]
    assert "queued" in indexes["ix_jobs_queued"].split("WHERE")[1]
    assert "running" in indexes["ix_jobs_leased"].split("WHERE")[1]
    assert not any("lease_expires_at" in d or "progress" in d for d in indexes.values())
    postgresql = database_url.startswith("postgresql")
    assert indexes["options"] == ("fillfactor=80" if postgresql else "")

    migrate.downgrade(database_url, "0005")

    indexes = _jobs_indexes(database_url)
    assert {"ix_jobs_queued", "ix_jobs_leased"}.isdisjoint(indexes)
    assert "(state, lease_expires_at)" in indexes["ix_jobs_state_lease"]
    assert indexes["options"] == ""


def test_0007_keeps_throughput_per_method_and_the_old_rows_as_method_unknown(
    database_url: str,
) -> None:
    migrate.upgrade(database_url, "0006")
    row = (
        "INSERT INTO model_throughput (model, task, device, jobs, train_tokens_per_second, "
        "updated_at) VALUES ('m', 'causal_lm', 'cpu', 3, {speed}, '2026-12-01 00:00:00+00')"
    )
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(row.format(speed=100.0))
        migrate.upgrade(database_url, "0007")
        with engine.begin() as connection:
            connection.exec_driver_sql(  # the same model, task and device: another method
                row.replace("(model,", "(method, model,").replace("('m',", "('full', 'm',")
                .format(speed=30.0)
            )  # fmt: skip
            rows = connection.exec_driver_sql(
                "SELECT method, train_tokens_per_second FROM model_throughput ORDER BY id"
            ).all()
        assert [tuple(r) for r in rows] == [("", 100.0), ("full", 30.0)]

        migrate.downgrade(database_url, "0006")  # one row a key again: the newest

        with engine.connect() as connection:
            rows = connection.exec_driver_sql(
                "SELECT model, train_tokens_per_second FROM model_throughput"
            ).all()
            columns = {c["name"] for c in sa.inspect(connection).get_columns("model_throughput")}
        assert [tuple(r) for r in rows] == [("m", 30.0)] and "method" not in columns
    finally:
        engine.dispose()

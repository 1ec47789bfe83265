"""Alembic, configured in code: upgrade, downgrade and read the schema revision of a database.

There is no alembic.ini; the scripts live in the repository's `migrations/` directory,
found next to the package: an editable install sees the checkout, and the Dockerfiles
copy `migrations/` beside the installed package.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from tuneq.db import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(
            f"Alembic scripts not found at {MIGRATIONS_DIR}: run tuneq from a checkout of "
            "the repository (pip install -e .), not from a wheel"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url is not None:
        # A ConfigParser value: a literal % (a percent-encoded password) must be doubled.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def head() -> str | None:
    """The newest revision in `migrations/versions/`."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current(database_url: str) -> str | None:
    """The revision the database is at; None before the first upgrade."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()

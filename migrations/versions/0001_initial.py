"""Initial schema: teams and API keys, files, jobs with their events, metrics, checkpoints,
artifacts and outbox, and idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    _create_teams()
    _create_api_keys()
    _create_files()
    _create_idempotency_keys()
    _create_jobs()
    _create_job_events()
    _create_job_metrics()
    _create_job_checkpoints()
    _create_job_artifacts()
    _create_outbox()


def _create_owned_table(
    name: str,
    parent: str,
    *columns: sa.Column,
    serial: bool = True,
    unique: tuple[str, ...] = (),
    index_parent: bool = True,
) -> None:
    """Create `name`: an `id` key, a `<parent>_id` column whose row goes with its parent's
    (indexed unless `index_parent` is false), then `columns`, then a unique constraint."""
    parent_id = f"{parent.removesuffix('s')}_id"
    key = sa.Column("id", sa.Integer(), autoincrement=True, nullable=False) if serial else _id()
    # Constraints are emitted in the order they are built: primary key, foreign key, unique.
    constraints = [
        sa.PrimaryKeyConstraint("id", name=f"pk_{name}"),
        sa.ForeignKeyConstraint(
            [parent_id],
            [f"{parent}.id"],
            name=f"fk_{name}_{parent_id}_{parent}",
            ondelete="CASCADE",
        ),
    ]
    if unique:
        constraints.append(sa.UniqueConstraint(*unique, name=f"uq_{name}_{'_'.join(unique)}"))
    op.create_table(name, key, _id(parent_id), *columns, *constraints)
    if index_parent:
        op.create_index(f"ix_{name}_{parent_id}", name, [parent_id])


def _id(name: str = "id", *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(40), nullable=nullable)


def _timestamp(name: str = "created_at", *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _create_teams() -> None:
    op.create_table(
        "teams",
        _id(),
        sa.Column("name", sa.String(100), nullable=False),
        _timestamp(),
        sa.PrimaryKeyConstraint("id", name="pk_teams"),
        sa.UniqueConstraint("name", name="uq_teams_name"),
    )


def _create_api_keys() -> None:
    _create_owned_table(
        "api_keys",
        "teams",
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _timestamp(),
        _timestamp("revoked_at", nullable=True),
        serial=False,
        unique=("key_hash",),
    )


def _create_files() -> None:
    _create_owned_table(
        "files",
        "teams",
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("storage_key", sa.String(512), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        _timestamp(),
        serial=False,
    )


def _create_idempotency_keys() -> None:
    _create_owned_table(
        "idempotency_keys",
        "teams",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("method_path", sa.String(255), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.JSON(), nullable=True),
        _timestamp(),
        unique=("team_id", "key"),
        index_parent=False,  # the unique constraint leads with team_id
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def _create_jobs() -> None:
    _create_owned_table(
        "jobs",
        "teams",
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        _id("training_file_id"),
        _id("validation_file_id", nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("resolved", sa.JSON(), nullable=False),
        sa.Column("estimate", sa.JSON(), nullable=False),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        # the lease (DESIGN §3)
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("fence", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        _timestamp("lease_expires_at", nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("pause_requested", sa.Boolean(), nullable=False),
        # progress and outcome
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("latest_checkpoint_key", sa.String(512), nullable=True),
        sa.Column("latest_checkpoint_step", sa.Integer(), nullable=True),
        sa.Column("trained_tokens", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        _timestamp(),
        _timestamp("started_at", nullable=True),
        _timestamp("finished_at", nullable=True),
        serial=False,
    )
    op.create_index("ix_jobs_training_file_id", "jobs", ["training_file_id"])
    op.create_index("ix_jobs_validation_file_id", "jobs", ["validation_file_id"])
    op.create_index("ix_jobs_state_lease", "jobs", ["state", "lease_expires_at"])


def _create_job_events() -> None:
    _create_owned_table(
        "job_events",
        "jobs",
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        _timestamp(),
    )


def _create_job_metrics() -> None:
    _create_owned_table(
        "job_metrics",
        "jobs",
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("values", sa.JSON(), nullable=False),
        _timestamp(),
    )


def _create_job_checkpoints() -> None:
    _create_owned_table(
        "job_checkpoints",
        "jobs",
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("storage_prefix", sa.String(512), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _timestamp(),
    )


def _create_job_artifacts() -> None:
    _create_owned_table(
        "job_artifacts",
        "jobs",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("storage_key", sa.String(512), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _timestamp(),
    )


def _create_outbox() -> None:
    _create_owned_table("outbox", "jobs", _timestamp(), _timestamp("sent_at", nullable=True))
    op.create_index("ix_outbox_sent_at", "outbox", ["sent_at"])


def downgrade() -> None:
    # Children before parents; a table's indexes go with it.
    for table in (
        "outbox",
        "job_artifacts",
        "job_checkpoints",
        "job_metrics",
        "job_events",
        "jobs",
        "idempotency_keys",
        "files",
        "api_keys",
        "teams",
    ):
        op.drop_table(table)

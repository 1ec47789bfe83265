"""Model throughput: each model's train and eval speed, load and checkpoint seconds, per
task and kind of device, measured by the workers from succeeded jobs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_throughput",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("device", sa.String(255), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.Column("train_tokens_per_second", sa.Float(), nullable=False),
        sa.Column("eval_tokens_per_second", sa.Float(), nullable=True),
        sa.Column("load_seconds", sa.Float(), nullable=True),
        sa.Column("seconds_per_checkpoint", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_throughput"),
        sa.UniqueConstraint(
            "model", "task", "device", name="uq_model_throughput_model_task_device"
        ),
    )


def downgrade() -> None:
    op.drop_table("model_throughput")

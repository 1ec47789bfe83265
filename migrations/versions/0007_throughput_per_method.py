"""Model throughput per method: a full fine-tune's step costs several LoRA steps, and a
frozen body's a fraction of one, so a model's speed is kept per method type as well.

Rows recorded before this revision keep the method `""` (not known): an estimate falls
back to them, as to any other method's row, until a job of its own method has finished.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = "uq_model_throughput_model_task_device"
NEW_KEY = "uq_model_throughput_model_task_method_device"


def upgrade() -> None:
    with op.batch_alter_table("model_throughput") as batch:
        batch.add_column(sa.Column("method", sa.String(32), nullable=False, server_default=""))
        batch.drop_constraint(OLD_KEY, type_="unique")
        batch.create_unique_constraint(NEW_KEY, ["model", "task", "method", "device"])


def downgrade() -> None:
    # The old key holds one row a (model, task, device): keep each one's newest method.
    op.execute(
        "DELETE FROM model_throughput WHERE id NOT IN ("
        " SELECT max(id) FROM model_throughput GROUP BY model, task, device)"
    )
    with op.batch_alter_table("model_throughput") as batch:
        batch.drop_constraint(NEW_KEY, type_="unique")
        batch.create_unique_constraint(OLD_KEY, ["model", "task", "device"])
        batch.drop_column("method")

"""The control plane for a thousand workers: a claim reads the queue through a partial index
on queued jobs, and a heartbeat writes no indexed column, so its UPDATE is HOT.

- `ix_jobs_queued` (queue, team_id, created_at, id) WHERE state = 'queued': the claim's
  candidates are each open team's oldest queued jobs, read in that order from the index;
  before it, every claim read and sorted the whole queue.
- `ix_jobs_leased` (team_id) WHERE state IN ('running', 'cancelling'): the running work
  per team (fair share, quotas) and the reaper's expired leases; it replaces
  `ix_jobs_state_lease` (state, lease_expires_at), which every heartbeat's new
  `lease_expires_at` wrote a new entry into. The leased set is at most one job a worker.
- PostgreSQL only: the jobs table's fillfactor 80, room on each page for the heartbeats'
  new row versions (a HOT update needs its page to hold the new version). It applies to
  the pages written from now on; existing pages keep theirs until the table is rewritten.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = sa.text("state = 'queued'")
LEASED = sa.text("state IN ('running', 'cancelling')")
FILLFACTOR = 80


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    op.drop_index("ix_jobs_state_lease", table_name="jobs")
    op.create_index(
        "ix_jobs_queued",
        "jobs",
        ["queue", "team_id", "created_at", "id"],
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )
    op.create_index(
        "ix_jobs_leased", "jobs", ["team_id"], postgresql_where=LEASED, sqlite_where=LEASED
    )
    if _postgresql():
        op.execute(f"ALTER TABLE jobs SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if _postgresql():
        op.execute("ALTER TABLE jobs RESET (fillfactor)")
    op.drop_index("ix_jobs_leased", table_name="jobs")
    op.drop_index("ix_jobs_queued", table_name="jobs")
    op.create_index("ix_jobs_state_lease", "jobs", ["state", "lease_expires_at"])

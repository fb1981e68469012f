"""Names that say what they hold: `cpu` (wall-clock seconds of a run) becomes `elapsed` in tasks and
attempts, a volunteer's `cpu_seconds` (the sum of those) becomes `task_seconds`, and a task that is
not final yet is stored as "open" (it may be queued, leased or running: only the queue knows which),
no longer as "queued".

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"

TABLES = ("tasks", "attempts")


def _rename(old: str, new: str, tables: tuple[str, ...] = TABLES, nullable: bool = True) -> None:
    for table in tables:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(old, new_column_name=new, existing_type=sa.Double, existing_nullable=nullable)


def upgrade() -> None:
    _rename("cpu", "elapsed")
    _rename("cpu_seconds", "task_seconds", ("volunteers",), nullable=False)
    op.execute("UPDATE tasks SET state = 'open' WHERE state = 'queued'")


def downgrade() -> None:
    op.execute("UPDATE tasks SET state = 'queued' WHERE state = 'open'")
    _rename("task_seconds", "cpu_seconds", ("volunteers",), nullable=False)
    _rename("elapsed", "cpu")

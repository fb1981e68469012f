"""Fair share and quotas: each researcher's share and limits, and the result bytes each job stores;
the queued tasks of a job in input order from one index (job_id, state, idx).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"

COLUMNS = {
    "researchers": [
        sa.Column("share", sa.Double),
        sa.Column("max_queued_tasks", sa.BigInteger),
        sa.Column("max_stored_bytes", sa.BigInteger),
        sa.Column("max_requests_per_second", sa.Double),
    ],
    "jobs": [sa.Column("result_bytes", sa.BigInteger, nullable=False, server_default="0")],
}


def upgrade() -> None:
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.add_column(column)
    op.create_index("ix_tasks_job_state_idx", "tasks", ["job_id", "state", "idx"])
    op.drop_index("ix_tasks_job_state", table_name="tasks")


def downgrade() -> None:
    op.create_index("ix_tasks_job_state", "tasks", ["job_id", "state"])
    op.drop_index("ix_tasks_job_state_idx", table_name="tasks")
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.drop_column(column.name)

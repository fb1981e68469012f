"""Long tasks: checkpoints (with progress) and partial results.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"

Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("task_id", Id, nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("job_id", Id, nullable=False),
        sa.Column("attempt", sa.String(32), nullable=False),
        sa.Column("state_ct", Blob),
        sa.Column("progress", sa.Double),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.UniqueConstraint("task_id", "owner", name="uq_checkpoints_task_owner"),
    )
    op.create_index("ix_checkpoints_job_id", "checkpoints", ["job_id"])
    op.create_table(
        "partials",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("task_id", Id, nullable=False),
        sa.Column("job_id", Id, nullable=False),
        sa.Column("attempt", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("value_ct", Blob, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.UniqueConstraint("task_id", "seq", name="uq_partials_task_seq"),
    )
    op.create_index("ix_partials_job_task", "partials", ["job_id", "task_id"])


def downgrade() -> None:
    op.drop_table("partials")
    op.drop_table("checkpoints")

"""Lazy hand-out: a job's tasks are made ready in windows as hand-out reaches them, and
``jobs.materialised`` says how far: the tasks of indices below it exist as rows and were given to
the ready queue. Jobs from before this revision had every task made ready at submit.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("materialised", sa.Integer, nullable=False, server_default="0"))
    op.execute("UPDATE jobs SET materialised = n_tasks")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("materialised")

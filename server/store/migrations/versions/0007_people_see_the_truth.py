"""Researchers and volunteers see the truth (issue 11): a job's public description and the time its
first task started (throughput once finished), volunteers' opt-in public nicknames, the CPU seconds
credited to each validated result, and an index for their credit (validated results by volunteer).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # existing jobs have no description: "" (NOT NULL, so the column needs a server default)
        batch.add_column(sa.Column("description", sa.String(500), nullable=False, server_default=""))
        batch.add_column(sa.Column("started_at", sa.Double))
    with op.batch_alter_table("volunteers") as batch:
        batch.add_column(sa.Column("nickname", sa.String(32)))
    op.create_index("ix_volunteers_nickname", "volunteers", ["nickname"], unique=True)
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("credit", sa.Double))
    op.create_index("ix_attempts_volunteer_verdict", "attempts", ["volunteer", "verdict"])


def downgrade() -> None:
    op.drop_index("ix_attempts_volunteer_verdict", table_name="attempts")
    op.drop_index("ix_volunteers_nickname", table_name="volunteers")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("credit")
    with op.batch_alter_table("volunteers") as batch:
        batch.drop_column("nickname")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("started_at")
        batch.drop_column("description")

"""Researchers and volunteers see the truth (issue 11): a job's public description and the time its
first task started (throughput once finished), volunteers' opt-in public nicknames, and an index for
their credit (validated results by volunteer).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"

COLUMNS = {
    "jobs": [
        sa.Column("description", sa.String(500), nullable=False, server_default=""),
        sa.Column("started_at", sa.Double),
    ],
    "volunteers": [sa.Column("nickname", sa.String(32))],
}


def upgrade() -> None:
    # 0001 is still `metadata.create_all` (the whole current schema on a fresh database): skip what exists.
    inspector = sa.inspect(op.get_bind())
    for table, columns in COLUMNS.items():
        have = {c["name"] for c in inspector.get_columns(table)}
        with op.batch_alter_table(table) as batch:
            for column in columns:
                if column.name not in have:
                    batch.add_column(column)
    if "ix_volunteers_nickname" not in {i["name"] for i in inspector.get_indexes("volunteers")}:
        op.create_index("ix_volunteers_nickname", "volunteers", ["nickname"], unique=True)
    if "ix_attempts_volunteer_verdict" not in {i["name"] for i in inspector.get_indexes("attempts")}:
        op.create_index("ix_attempts_volunteer_verdict", "attempts", ["volunteer", "verdict"])


def downgrade() -> None:
    op.drop_index("ix_attempts_volunteer_verdict", table_name="attempts")
    op.drop_index("ix_volunteers_nickname", table_name="volunteers")
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.drop_column(column.name)

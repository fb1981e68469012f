"""Verified results: replication settings and validation counters, replicas per task, what each
attempt reported and its verdict, and the volunteers' reputation.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"

Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")

COLUMNS: dict[str, list[sa.Column]] = {
    "jobs": [
        sa.Column("quorum", sa.Integer, nullable=False, server_default="1"),
        sa.Column("max_replicas", sa.Integer, nullable=False, server_default="4"),
        sa.Column("tolerance", sa.String(200)),
        sa.Column("n_validated", sa.Integer, nullable=False, server_default="0"),
        sa.Column("n_pending", sa.Integer, nullable=False, server_default="0"),
        sa.Column("n_disagreements", sa.Integer, nullable=False, server_default="0"),
        sa.Column("n_results", sa.Integer, nullable=False, server_default="0"),
    ],
    "tasks": [
        sa.Column("replicas", sa.Integer, nullable=False, server_default="0"),
        sa.Column("accepted", sa.String(32)),
    ],
    "attempts": [
        sa.Column("reported_ct", Blob),
        sa.Column("verdict", sa.String(8)),
    ],
}


def upgrade() -> None:
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.add_column(column)
    op.create_table(
        "reputation",
        sa.Column("volunteer", sa.String(64), primary_key=True),
        sa.Column("consecutive", sa.Integer, nullable=False),
        sa.Column("validated", sa.Integer, nullable=False),
        sa.Column("invalid", sa.Integer, nullable=False),
        sa.Column("last_invalid_at", sa.Double),
    )


def downgrade() -> None:
    op.drop_table("reputation")
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.drop_column(column.name)

"""Key fingerprints: one row per key id seen, so a server with a different key refuses to start.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
# MERGE NOTE: chained after the "verify" branch's 0002. On the ops branch alone there is no 0002 yet,
# so it revises 0001 there; the lead sets this to "0002" when merging.
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "key_fingerprints",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.Double, nullable=False),
        sa.Column("retired_at", sa.Double),
    )


def downgrade() -> None:
    op.drop_table("key_fingerprints")

"""Initial schema: researchers, sessions, jobs, tasks, attempts, volunteers.

Revision ID: 0001
Revises:
"""

from alembic import op

from server.store.tables import metadata

revision = "0001"
down_revision = None


def upgrade() -> None:
    # The first revision is the schema as first released; every later change is an explicit
    # revision, and tests/test_migrations.py checks migrated == declared.
    metadata.create_all(op.get_bind())

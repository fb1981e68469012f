"""Initial schema: researchers, sessions, jobs, tasks, attempts, volunteers.

Revision ID: 0001
Revises:

Written out as explicit operations, never derived from ``server/store/tables.py``: the migration test
(``tests/test_migrations.py``) compares what these operations build with the declared tables, so a
column declared there without a revision fails it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None

# The column types as they were at this revision (copied, not imported: tables.py moves on).
Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "researchers",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("email", sa.String(254), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("approved", sa.Boolean, nullable=False),
        sa.Column("operator", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("researcher_id", Id, sa.ForeignKey("researchers.id"), nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
    )
    op.create_index("ix_sessions_researcher_id", "sessions", ["researcher_id"])
    op.create_table(
        "jobs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("researcher_id", Id, sa.ForeignKey("researchers.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("code_ct", Blob, nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("inputs_kind", sa.String(8), nullable=False),
        sa.Column("range_start", sa.BigInteger),
        sa.Column("range_step", sa.BigInteger),
        sa.Column("n_tasks", sa.Integer, nullable=False),
        sa.Column("n_done", sa.Integer, nullable=False),
        sa.Column("n_failed", sa.Integer, nullable=False),
        sa.Column("timeout", sa.Double, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("requirements", sa.Text, nullable=False),
        sa.Column("replication", sa.Integer, nullable=False),
        sa.Column("parent_job_id", Id, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double),
    )
    op.create_index("ix_jobs_researcher_id", "jobs", ["researcher_id"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_parent_job_id", "jobs", ["parent_job_id"])
    op.create_table(
        "tasks",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("job_id", Id, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("input_ct", Blob),
        sa.Column("result_ct", Blob),
        sa.Column("output_ct", Blob),
        sa.Column("error_ct", Blob),
        sa.Column("volunteer", sa.String(64)),
        sa.Column("cpu", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.UniqueConstraint("job_id", "idx", name="uq_tasks_job_idx"),
    )
    op.create_index("ix_tasks_job_state", "tasks", ["job_id", "state"])
    op.create_index("ix_tasks_job_finished", "tasks", ["job_id", "finished_at"])
    op.create_table(
        "attempts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("task_id", Id, nullable=False),
        sa.Column("job_id", Id, nullable=False),
        sa.Column("volunteer", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("cpu", sa.Double),
        sa.Column("finished_at", sa.Double, nullable=False),
    )
    op.create_index("ix_attempts_task_id", "attempts", ["task_id"])
    op.create_table(
        "volunteers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("first_seen", sa.Double, nullable=False),
        sa.Column("last_seen", sa.Double, nullable=False),
        sa.Column("capabilities", sa.Text, nullable=False),
        sa.Column("throttle", sa.Text, nullable=False),
        sa.Column("tasks_done", sa.Integer, nullable=False),
        sa.Column("cpu_seconds", sa.Double, nullable=False),
    )


def downgrade() -> None:
    for table in ("volunteers", "attempts", "tasks", "jobs", "sessions", "researchers"):
        op.drop_table(table)

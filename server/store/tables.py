"""The schema (SQLAlchemy Core). MySQL/MariaDB is the system of record; SQLite the embedded default.

Changing a table here needs a new Alembic revision in ``server/store/migrations/versions`` (explicit
operations); ``tests/test_migrations.py`` fails when the migrated schema and this module disagree.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

metadata = sa.MetaData()

# Ciphertext and long text: MySQL's plain BLOB/TEXT stop at 64 KiB.
Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only

researchers = sa.Table(
    "researchers",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(254), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(200), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("approved", sa.Boolean, nullable=False, default=True),
    sa.Column("operator", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Double, nullable=False),
    # Fair share and quotas, set by operators; NULL: the server's default (``server.config``)
    sa.Column("share", sa.Double),  # weight in hand-out between researchers
    sa.Column("max_queued_tasks", sa.BigInteger),  # tasks not yet finished over all running jobs
    sa.Column("max_stored_bytes", sa.BigInteger),  # result and output ciphertext kept for their jobs
    sa.Column("max_requests_per_second", sa.Double),  # API requests, per server instance
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("researcher_id", Id, sa.ForeignKey("researchers.id"), nullable=False, index=True),
    sa.Column("expires_at", sa.Double, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("researcher_id", Id, sa.ForeignKey("researchers.id"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False, default=""),
    sa.Column("description", sa.String(500), nullable=False, default="", server_default=""),  # public
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("code_ct", Blob, nullable=False),
    sa.Column("code_hash", sa.String(64), nullable=False),
    sa.Column("inputs_kind", sa.String(8), nullable=False),  # list | range | none | after
    sa.Column("range_start", sa.BigInteger),
    sa.Column("range_step", sa.BigInteger),
    sa.Column("n_tasks", sa.Integer, nullable=False),
    sa.Column("n_done", sa.Integer, nullable=False, default=0),
    sa.Column("n_failed", sa.Integer, nullable=False, default=0),
    sa.Column("timeout", sa.Double, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("requirements", sa.Text, nullable=False, default="[]"),
    sa.Column("replication", sa.Integer, nullable=False, default=1),  # 0: adaptive
    sa.Column("quorum", sa.Integer, nullable=False, default=1),
    sa.Column("max_replicas", sa.Integer, nullable=False, default=4),
    sa.Column("tolerance", sa.String(200)),  # JSON {"rtol", "atol"}; NULL: exact equality
    sa.Column("n_validated", sa.Integer, nullable=False, default=0),  # done, confirmed by a quorum of 2+
    sa.Column("n_pending", sa.Integer, nullable=False, default=0),  # queued with a result awaiting confirmation
    sa.Column("n_disagreements", sa.Integer, nullable=False, default=0),  # tasks whose results differed
    sa.Column("n_results", sa.Integer, nullable=False, default=0),  # results and errors received (replicas)
    sa.Column("result_bytes", sa.BigInteger, nullable=False, default=0),  # result + output ciphertext stored
    sa.Column("parent_job_id", Id, nullable=True, index=True),  # results_of / after (pipelines)
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double),  # the first recorded result's finish less its CPU time
    sa.Column("finished_at", sa.Double),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("job_id", Id, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("input_ct", Blob),  # NULL for range sweeps (computed from idx) and for `none`
    sa.Column("result_ct", Blob),
    sa.Column("output_ct", Blob),
    sa.Column("error_ct", Blob),
    sa.Column("volunteer", sa.String(64)),
    sa.Column("elapsed", sa.Double),
    sa.Column("finished_at", sa.Double),
    sa.Column("replicas", sa.Integer, nullable=False, default=0),  # results and errors received
    sa.Column("accepted", sa.String(32)),  # how the result was accepted: "2/3", "trusted 10%", "1/1"
    sa.UniqueConstraint("job_id", "idx", name="uq_tasks_job_idx"),
    sa.Index("ix_tasks_job_state_idx", "job_id", "state", "idx"),  # also serves (job_id, state)
    sa.Index("ix_tasks_job_finished", "job_id", "finished_at"),  # throughput (storage.THROUGHPUT_WINDOW)
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("task_id", Id, nullable=False, index=True),
    sa.Column("job_id", Id, nullable=False),
    sa.Column("volunteer", sa.String(64), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("elapsed", sa.Double),
    sa.Column("finished_at", sa.Double, nullable=False),
    sa.Column("reported_ct", Blob),  # what it reported, for the validator: {"result": v} or {"error": key}
    sa.Column("verdict", sa.String(8)),  # pending | valid | invalid | trusted | single (NULL: no report)
    # CPU seconds credited to the volunteer: set only for a validated result (valid or trusted)
    sa.Column("credit", sa.Double),
    sa.Index("ix_attempts_volunteer_verdict", "volunteer", "verdict"),  # credit and the leaderboard
)

volunteers = sa.Table(
    "volunteers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("first_seen", sa.Double, nullable=False),
    sa.Column("last_seen", sa.Double, nullable=False),
    sa.Column("capabilities", sa.Text, nullable=False, default="{}"),
    sa.Column("throttle", sa.Text, nullable=False, default="{}"),
    sa.Column("tasks_done", sa.Integer, nullable=False, default=0),
    sa.Column("task_seconds", sa.Double, nullable=False, default=0.0),
    sa.Column("nickname", sa.String(32)),  # opt-in, public on the leaderboard; NULL: not listed
    sa.Index("ix_volunteers_nickname", "nickname", unique=True),
)

# One row per key id ever used on this database: a server whose key does not match refuses to start
# (two servers with different keys would each write rows the other cannot read).
key_fingerprints = sa.Table(
    "key_fingerprints",
    metadata,
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("first_seen", sa.Double, nullable=False),
    sa.Column("retired_at", sa.Double),  # set by rotate-key once no row uses this key any more
)

reputation = sa.Table(
    "reputation",
    metadata,
    sa.Column("volunteer", sa.String(64), primary_key=True),
    sa.Column("consecutive", sa.Integer, nullable=False, default=0),  # validated results since the last invalid
    sa.Column("validated", sa.Integer, nullable=False, default=0),
    sa.Column("invalid", sa.Integer, nullable=False, default=0),
    sa.Column("last_invalid_at", sa.Double),
)

# Long tasks: the latest checkpoint and progress of a task, per lineage (``owner``: "" when any
# volunteer may resume the task, the volunteer's id under replication; see server/store/live.py).
checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("task_id", Id, nullable=False),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("job_id", Id, nullable=False, index=True),
    sa.Column("attempt", sa.String(32), nullable=False),
    sa.Column("state_ct", Blob),  # NULL: progress reported, no checkpoint yet
    sa.Column("progress", sa.Double),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.UniqueConstraint("task_id", "owner", name="uq_checkpoints_task_owner"),
)

# Partial results, in the order they arrived (uvm.partial), shown before the task completes.
partials = sa.Table(
    "partials",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("task_id", Id, nullable=False),
    sa.Column("job_id", Id, nullable=False),
    sa.Column("attempt", sa.String(32), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),  # 0, 1, ... per task: their order, and the cap
    sa.Column("value_ct", Blob, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.UniqueConstraint("task_id", "seq", name="uq_partials_task_seq"),
    sa.Index("ix_partials_job_task", "job_id", "task_id"),
)

"""Read-only questions operators' tools ask of the database: is it there, and how many jobs and tasks
in each state (for /metrics). Cheap by design: they read the jobs table, never the tasks table."""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from server.protocol import JobState
from server.store.tables import jobs


@dataclasses.dataclass(frozen=True)
class JobCounts:
    """One job state: how many jobs, and their tasks done, failed and still pending."""

    state: str
    jobs: int
    done: int
    failed: int
    pending: int


async def ping(engine: AsyncEngine) -> None:
    """Raise unless the database answers."""
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))


async def job_counts(engine: AsyncEngine, max_running: int = 10_000) -> tuple[list[JobCounts], list[int]]:
    """Counts per job state, and the ids of running jobs (at most ``max_running``)."""
    query = sa.select(
        jobs.c.state,
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(jobs.c.n_tasks), 0),
        sa.func.coalesce(sa.func.sum(jobs.c.n_done), 0),
        sa.func.coalesce(sa.func.sum(jobs.c.n_failed), 0),
    ).group_by(jobs.c.state)
    running = sa.select(jobs.c.id).where(jobs.c.state == JobState.RUNNING.value).limit(max_running)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
        running_ids = list((await conn.execute(running)).scalars())
    counts = [JobCounts(state, int(n), int(done), int(failed), int(total - done - failed))
              for state, n, total, done, failed in rows]  # fmt: skip
    return counts, running_ids

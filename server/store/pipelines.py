"""Pipelines: a job declared with ``{"after": A}`` gets one task per task of A, fed as A's tasks finish.

Task ``i`` of the downstream job takes the result of A's task ``i`` as its input; if A's task
failed, the downstream task fails with "upstream task failed". Feeding happens in the same
transaction that finishes A's task, and a periodic sweep fills any gap (a downstream job created
while A's tasks were being committed), so every upstream task is fed exactly once: the unique
(job_id, idx) key turns a second feed into a no-op.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from server.protocol import JobState, TaskState
from server.queue import ReadyItem
from server.store.models import Recorded
from server.store.tables import jobs, tasks

if TYPE_CHECKING:
    from server.store.outcomes import Outcomes  # the part of Storage that feeds pipelines
    from server.store.storage import Storage

UPSTREAM_FAILED = "upstream task {idx} of job {job} failed; this task has no input"


async def feed(storage: Outcomes, conn: AsyncConnection, rec: Recorded) -> None:
    """Create downstream tasks for the upstream tasks that finished in this transaction."""
    if not rec.upstream:
        return
    by_job: dict[int, list[tuple]] = {}
    for item in rec.upstream:
        by_job.setdefault(item[0], []).append(item)
    downstream = (
        await conn.execute(
            sa.select(jobs.c.id, jobs.c.parent_job_id, jobs.c.timeout, jobs.c.priority, jobs.c.researcher_id)
            .where(
                jobs.c.parent_job_id.in_(list(by_job)),
                jobs.c.inputs_kind == "after",
                jobs.c.state == JobState.RUNNING.value,
            )
            .with_for_update(read=True)
        )
    ).all()
    for job in downstream:
        for _, _task, idx, state, result in by_job[job.parent_job_id]:
            await _create(storage, conn, rec, job, idx, state, result)


async def _create(
    storage: Outcomes, conn: AsyncConnection, rec: Recorded, job: Any, idx: int, state: str, result: Any
) -> None:
    row: dict[str, Any] = {"job_id": job.id, "idx": idx, "attempts": 0}
    if state == TaskState.DONE.value:
        row["state"] = TaskState.OPEN.value
        row["input_ct"] = storage.box.seal(
            json.dumps(result, separators=(",", ":")).encode(), f"job:{job.id}:input:{idx}"
        )
    else:
        row["state"] = TaskState.FAILED.value
        row["finished_at"] = time.time()
    inserted = await conn.execute(_insert_ignore(conn, row))
    if inserted.rowcount != 1:
        return  # fed already
    task_id = (
        await conn.execute(sa.select(tasks.c.id).where(tasks.c.job_id == job.id, tasks.c.idx == idx))
    ).scalar_one()
    if state == TaskState.DONE.value:
        rec.push.append(ReadyItem(job.id, task_id, idx, job.timeout, job.priority, job.researcher_id))
    else:
        await conn.execute(
            tasks.update()
            .where(tasks.c.id == task_id)
            .values(
                error_ct=storage.box.seal_text(
                    UPSTREAM_FAILED.format(idx=idx, job=job.parent_job_id), f"task:{task_id}:error"
                )
            )
        )
        await conn.execute(jobs.update().where(jobs.c.id == job.id).values(n_failed=jobs.c.n_failed + 1))
        rec.jobs.add(job.id)


def _insert_ignore(conn: AsyncConnection, row: dict) -> Any:
    if conn.dialect.name in ("mysql", "mariadb"):
        return mysql_insert(tasks).values(**row).prefix_with("IGNORE")
    return sqlite_insert(tasks).values(**row).on_conflict_do_nothing(index_elements=["job_id", "idx"])


async def backfill(storage: Storage, conn: AsyncConnection, job_id: int, rec: Recorded, limit: int = 2000) -> int:
    """Feed a pipeline job from upstream tasks that finished but have no downstream task yet."""
    job = (
        await conn.execute(
            sa.select(jobs.c.id, jobs.c.parent_job_id, jobs.c.timeout, jobs.c.priority, jobs.c.researcher_id).where(
                jobs.c.id == job_id
            )
        )
    ).one()
    mine = sa.select(tasks.c.idx).where(tasks.c.job_id == job_id).scalar_subquery()
    upstream = (
        await conn.execute(
            sa.select(tasks.c.id, tasks.c.idx, tasks.c.state, tasks.c.result_ct)
            .where(
                tasks.c.job_id == job.parent_job_id,
                tasks.c.state.in_([TaskState.DONE.value, TaskState.FAILED.value, TaskState.CANCELLED.value]),
                tasks.c.idx.not_in(mine),
            )
            .order_by(tasks.c.idx)
            .limit(limit)
        )
    ).all()
    for r in upstream:
        result = storage.box.open_json(r.result_ct, f"task:{r.id}:result") if r.result_ct is not None else None
        await _create(storage, conn, rec, job, r.idx, r.state, result)
    return len(upstream)


async def sweep(storage: Storage) -> Recorded:
    """Fill the gaps of every running pipeline job (run periodically by the dispatcher)."""
    rec = Recorded()
    async with storage.engine.connect() as conn:
        ids = (
            (
                await conn.execute(
                    sa.select(jobs.c.id).where(jobs.c.inputs_kind == "after", jobs.c.state == JobState.RUNNING.value)
                )
            )
            .scalars()
            .all()
        )
    for job_id in ids:
        async with storage.engine.begin() as conn:
            await backfill(storage, conn, job_id, rec)
            await storage.finish_jobs(conn, rec.jobs)
    return rec


async def downstream_of(storage: Storage, job_id: int) -> list[int]:
    async with storage.engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    sa.select(jobs.c.id).where(
                        jobs.c.parent_job_id == job_id,
                        jobs.c.inputs_kind == "after",
                        jobs.c.state == JobState.RUNNING.value,
                    )
                )
            ).scalars()
        )

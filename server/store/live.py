"""Long tasks in the database: each task's latest checkpoint and progress, and its partial results.

A checkpoint belongs to a lineage, its ``owner``. The rule (README, "Long tasks"): under replication 1
the owner is "" and the next attempt on ANY volunteer resumes from it; under replication (a fixed
count, or adaptive) the owner is the volunteer, so a replica resumes only from checkpoints it wrote
itself and no two replicas of a task ever share state (replicas of a task go to distinct volunteers).
States and partial results are research data: sealed like results, with associated data naming the
row (``checkpoint:<task>:<owner>``, ``partial:<task>:<seq>``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from server.protocol import MAX_PARTIALS_PER_TASK, TaskState
from server.store.tables import checkpoints, partials, tasks

if TYPE_CHECKING:
    from server.store.storage import Storage


def owner_of(replicated: bool, volunteer: str) -> str:
    """The lineage an attempt writes and resumes: the task's ("") or, under replication, its volunteer's."""
    return volunteer if replicated else ""


async def save(
    storage: Storage,
    task: int,
    job: int,
    owner: str,
    attempt: str,
    state: str | None,
    progress: float | None,
    values: list[Any],
) -> int:
    """Store an update of a running attempt (latest state and progress win); returns partials kept."""
    now = time.time()
    state_ct = None if state is None else storage.box.seal_text(state, f"checkpoint:{task}:{owner}")

    async def work(conn: Any) -> int:
        if state is not None or progress is not None:
            row = {"task_id": task, "owner": owner, "job_id": job, "attempt": attempt, "updated_at": now}
            changes = {"attempt": attempt, "updated_at": now}
            if state_ct is not None:
                row["state_ct"] = changes["state_ct"] = state_ct
            if progress is not None:
                row["progress"] = changes["progress"] = progress
            stmt: Any
            if conn.dialect.name == "sqlite":
                stmt = sqlite_insert(checkpoints).values(**row)
                stmt = stmt.on_conflict_do_update(index_elements=["task_id", "owner"], set_=changes)
            else:
                stmt = mysql_insert(checkpoints).values(**row).on_duplicate_key_update(**changes)
            await conn.execute(stmt)
        if not values:
            return 0
        have = (
            await conn.execute(sa.select(sa.func.count()).select_from(partials).where(partials.c.task_id == task))
        ).scalar() or 0
        keep = values[: max(0, MAX_PARTIALS_PER_TASK - have)]
        rows = [
            {
                "task_id": task,
                "job_id": job,
                "attempt": attempt,
                "seq": have + i,
                "value_ct": storage.box.seal_json(value, f"partial:{task}:{have + i}"),
                "created_at": now,
            }
            for i, value in enumerate(keep)
        ]
        if rows:
            await conn.execute(partials.insert(), rows)
        return len(rows)

    return await storage._retry(work)


async def restore(storage: Storage, wanted: dict[int, str]) -> dict[int, str]:
    """The JSON text of the last checkpoint of each task's lineage (``{task: owner}``), where there is one.

    One query for a whole lease batch, and for the lease batches of many volunteers at once when they
    come together (a wake): a job that never checkpoints pays one indexed look-up per batch."""
    return await storage.checkpoint_reads.load(wanted)


_CHECKPOINTS = sa.select(checkpoints.c.task_id, checkpoints.c.owner, checkpoints.c.state_ct).where(
    checkpoints.c.task_id.in_(sa.bindparam("ids", expanding=True)), checkpoints.c.state_ct.is_not(None)
)  # built once: a lease batch's task ids go in as one expanding parameter


async def read_checkpoints(storage: Storage, wanted: dict[int, str]) -> dict[int, str]:
    """``restore``'s query, for the calls ``storage.checkpoint_reads`` merged."""
    async with storage.engine.connect() as conn:
        rows = (await conn.execute(_CHECKPOINTS, {"ids": list(wanted)})).all()
    return {
        r.task_id: storage.box.open_text(r.state_ct, f"checkpoint:{r.task_id}:{r.owner}")
        for r in rows
        if wanted[r.task_id] == r.owner
    }


async def progress(storage: Storage, job: int) -> list[dict]:
    """The latest progress of the job's unfinished tasks: ``[{"index", "progress", "at"}]``."""
    query = (
        sa.select(tasks.c.idx, sa.func.max(checkpoints.c.progress), sa.func.max(checkpoints.c.updated_at))
        .select_from(checkpoints.join(tasks, tasks.c.id == checkpoints.c.task_id))
        .where(checkpoints.c.job_id == job, tasks.c.state == TaskState.OPEN.value, checkpoints.c.progress.is_not(None))
        .group_by(tasks.c.idx)
        .order_by(tasks.c.idx)
        .limit(1000)
    )
    async with storage.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [{"index": r[0], "progress": r[1], "at": r[2]} for r in rows]


async def partials_of(storage: Storage, job: int, indices: list[int]) -> dict[int, list]:
    """The partial results of these tasks of a job, by task index, in the order they came."""
    if not indices:
        return {}
    out: dict[int, list] = {}
    for r in await partial_rows(storage, job, tasks.c.idx.in_(indices)):
        out.setdefault(r.idx, []).append(storage.box.open_json(r.value_ct, f"partial:{r.task_id}:{r.seq}"))
    return out


async def partial_rows(storage: Storage, job: int, which: sa.ColumnElement[bool]) -> list[Any]:
    """The sealed partial results of a job's tasks that ``which`` (a condition on ``tasks``) picks:
    ``idx``, ``task_id``, ``seq``, ``value_ct``, in task index order, then in the order they came."""
    query = (
        sa.select(tasks.c.idx, partials.c.task_id, partials.c.seq, partials.c.value_ct)
        .select_from(partials.join(tasks, tasks.c.id == partials.c.task_id))
        .where(partials.c.job_id == job, which)
        .order_by(tasks.c.idx, partials.c.seq)
    )
    async with storage.engine.connect() as conn:
        return list((await conn.execute(query)).all())

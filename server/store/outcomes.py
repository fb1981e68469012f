"""Recording what volunteers send back: results, errors, lost leases. Idempotent per attempt and task."""

from __future__ import annotations

import collections
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.crypto import Box
from server.protocol import AttemptOutcome, JobState, Outcome, TaskState
from server.queue import ReadyItem
from server.store import pipelines
from server.store.models import Recorded
from server.store.models import now as _now
from server.store.tables import attempts, jobs, tasks, volunteers

_TaskRow = collections.namedtuple("_TaskRow", "id job_id idx state attempts")


class Outcomes:
    """Mixed into ``Storage``; uses its ``engine``, ``box``, ``job_info``, ``forget_job`` and ``_retry``."""

    engine: AsyncEngine
    box: Box

    async def record(self, items: list[tuple[str, Outcome]], live: dict[str, Any]) -> Recorded:
        """Commit a batch of (volunteer, outcome) in one transaction; idempotent per attempt and task.

        ``live`` maps attempt -> Lease for the leases still live. An outcome whose lease is gone
        is accepted only if its attempt was handed to this volunteer (recorded when it expired
        or was abandoned); otherwise it is ignored.
        """
        return await self._retry(lambda conn: self._record(conn, items, live))

    async def _record(  # noqa: C901 - one pass deciding each outcome, then batched writes
        self, conn: AsyncConnection, items: list[tuple[str, Outcome]], live: dict[str, Any]
    ) -> Recorded:
        rec = Recorded()
        now = _now()
        known = {
            r.id: r
            for r in (
                await conn.execute(
                    sa.select(attempts.c.id, attempts.c.task_id, attempts.c.volunteer, attempts.c.outcome).where(
                        attempts.c.id.in_([o.attempt for _, o in items])
                    )
                )
            ).all()
        }
        accepted: list[tuple[str, Outcome, bool]] = []
        for volunteer, o in items:
            lease = live.get(o.attempt)
            prior = known.get(o.attempt)
            if lease is not None:
                ok = lease.task == o.task and lease.volunteer == volunteer
            else:  # lease gone: accept only an attempt that expired or was abandoned by this volunteer
                ok = (
                    prior is not None
                    and prior.task_id == o.task
                    and prior.volunteer == volunteer
                    and prior.outcome in (AttemptOutcome.EXPIRED.value, AttemptOutcome.ABANDONED.value)
                )
            if ok:
                accepted.append((volunteer, o, lease is not None))
            else:
                rec.ignored.append(o.attempt)  # unknown, duplicate, or not this volunteer's
        if not accepted:
            return rec
        # Lock the tasks (one statement), decide, then write in a few executemany statements.
        rows = {
            r.id: _TaskRow(*r)
            for r in (
                await conn.execute(
                    sa.select(tasks.c.id, tasks.c.job_id, tasks.c.idx, tasks.c.state, tasks.c.attempts)
                    .where(tasks.c.id.in_([o.task for _, o, _ in accepted]))
                    .with_for_update()
                )
            ).all()
        }
        done_rows: list[dict] = []
        attempt_rows: list[dict] = []
        updated_attempts: list[dict] = []
        done_by_job: dict[int, int] = {}
        per_volunteer: dict[str, list[float]] = {}
        for volunteer, o, is_live in accepted:
            task = rows.get(o.task)
            if task is None:
                rec.ignored.append(o.attempt)
                continue
            rec.jobs.add(task.job_id)
            if task.state != TaskState.QUEUED.value:
                outcome = AttemptOutcome.LATE
                rec.ignored.append(o.attempt)
                if is_live:
                    rec.release.append(o.attempt)
            elif o.error is None:
                outcome = AttemptOutcome.DONE
                aad = f"task:{task.id}"
                done_rows.append(
                    {
                        "id": task.id,
                        "job_id": task.job_id,
                        "idx": task.idx,
                        "state": TaskState.DONE.value,
                        "attempts": task.attempts,
                        "result_ct": self.box.seal_json(o.result, aad + ":result"),
                        "output_ct": self.box.seal_text(o.output, aad + ":output") if o.output else None,
                        "error_ct": None,
                        "volunteer": volunteer,
                        "cpu": o.cpu,
                        "finished_at": now,
                    }
                )
                rows[o.task] = task._replace(state=TaskState.DONE.value)  # a second outcome in this batch is late
                rec.acked.append(o.attempt)
                rec.upstream.append((task.job_id, task.id, task.idx, TaskState.DONE.value, o.result))
                done_by_job[task.job_id] = done_by_job.get(task.job_id, 0) + 1
                if is_live:
                    rec.release.append(o.attempt)
                else:  # its lease had expired: the task may be waiting in the ready queue again
                    info = await self.job_info(task.job_id)
                    if info is not None:
                        rec.drop.append(ReadyItem(task.job_id, task.id, task.idx, info.timeout, info.priority))
            else:
                outcome = await self._record_error(conn, rec, task, o, volunteer, now, is_live)
                rows[o.task] = task._replace(attempts=task.attempts + 1)
            stats = per_volunteer.setdefault(volunteer, [0, 0.0])
            stats[0] += outcome is AttemptOutcome.DONE
            stats[1] += max(0.0, float(o.cpu))
            row = {
                "id": o.attempt,
                "task_id": task.id,
                "job_id": task.job_id,
                "volunteer": volunteer,
                "outcome": outcome.value,
                "cpu": o.cpu,
                "finished_at": now,
            }
            (updated_attempts if o.attempt in known else attempt_rows).append(row)
        if done_rows:
            await self._mark_done(conn, done_rows, done_by_job)
        if attempt_rows:
            await conn.execute(attempts.insert(), attempt_rows)
        for row in updated_attempts:
            await conn.execute(attempts.update().where(attempts.c.id == row["id"]).values(**row))
        for job_id, n in done_by_job.items():
            await conn.execute(jobs.update().where(jobs.c.id == job_id).values(n_done=jobs.c.n_done + n))
        await pipelines.feed(self, conn, rec)
        await self.finish_jobs(conn, rec.jobs)
        if per_volunteer:
            rows = [
                {
                    "id": v,
                    "first_seen": now,
                    "last_seen": now,
                    "capabilities": "{}",
                    "throttle": "{}",
                    "tasks_done": int(n),
                    "cpu_seconds": c,
                }
                for v, (n, c) in per_volunteer.items()
            ]
            await conn.execute(
                self._bulk_update(volunteers, ["id"], rows, replace=["last_seen"], add=["tasks_done", "cpu_seconds"])
            )
        return rec

    async def _mark_done(self, conn: AsyncConnection, rows: list[dict], done_by_job: dict[int, int]) -> None:
        if self.engine.dialect.name in ("mysql", "mariadb"):
            # One multi-row statement: the rows are locked (FOR UPDATE) and known to be queued, so
            # this "upsert" only ever updates (aiomysql runs an UPDATE executemany row by row).
            await conn.execute(self._bulk_update(tasks, ["id"], rows, replace=list(rows[0])))
            return
        # SQLite: the driver starts the transaction at the first write, so the state read above
        # was not locked: keep the guard in the statement (in-process, executemany is cheap).
        result = await conn.execute(
            tasks.update()
            .where(tasks.c.id == sa.bindparam("tid"), tasks.c.state == TaskState.QUEUED.value)
            .values({c: sa.bindparam(f"v_{c}") for c in rows[0] if c not in ("id", "job_id", "idx", "attempts")}),
            [{"tid": r["id"], **{f"v_{c}": v for c, v in r.items()}} for r in rows],
        )
        if result.rowcount != len(rows):  # a task finished otherwise meanwhile: count from the table
            for job_id in done_by_job:
                done_by_job[job_id] = 0
                n = (
                    await conn.execute(
                        sa.select(sa.func.count()).where(
                            tasks.c.job_id == job_id, tasks.c.state == TaskState.DONE.value
                        )
                    )
                ).scalar()
                await conn.execute(jobs.update().where(jobs.c.id == job_id).values(n_done=n))

    def _bulk_update(
        self, table: sa.Table, key: list[str], rows: list[dict], replace: list[str], add: list[str] = ()
    ) -> Any:
        """INSERT ... ON DUPLICATE KEY / ON CONFLICT UPDATE of many rows in one statement.

        ``replace`` columns take the new value, ``add`` columns are incremented by it.
        """
        if self.engine.dialect.name in ("mysql", "mariadb"):
            stmt = mysql_insert(table).values(rows)
            new = stmt.inserted
            return stmt.on_duplicate_key_update(
                {c: new[c] for c in replace if c not in key} | {c: table.c[c] + new[c] for c in add}
            )
        stmt = sqlite_insert(table).values(rows)
        new = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=key,
            set_={c: new[c] for c in replace if c not in key} | {c: table.c[c] + new[c] for c in add},
        )

    async def _record_error(
        self, conn: AsyncConnection, rec: Recorded, task: Any, o: Outcome, volunteer: str, now: float, live: bool
    ) -> AttemptOutcome:
        """The task raised (or timed out): count the attempt; fail the task after max_attempts."""
        aad = f"task:{task.id}"
        info = await self.job_info(task.job_id)
        max_attempts = info.max_attempts if info else 1
        failed = task.attempts + 1 >= max_attempts
        values: dict[str, Any] = {
            "attempts": task.attempts + 1,
            "error_ct": self.box.seal_text(o.error, aad + ":error"),
            "output_ct": self.box.seal_text(o.output, aad + ":output") if o.output else None,
            "volunteer": volunteer,
        }
        if failed:
            values.update(state=TaskState.FAILED.value, finished_at=now)
        await conn.execute(
            tasks.update().where(tasks.c.id == task.id, tasks.c.state == TaskState.QUEUED.value).values(**values)
        )
        rec.acked.append(o.attempt)
        if failed:
            rec.upstream.append((task.job_id, task.id, task.idx, TaskState.FAILED.value, None))
            await conn.execute(jobs.update().where(jobs.c.id == task.job_id).values(n_failed=jobs.c.n_failed + 1))
            if live:
                rec.release.append(o.attempt)
            elif info is not None:
                rec.drop.append(ReadyItem(task.job_id, task.id, task.idx, info.timeout, info.priority))
        elif live:
            rec.requeue.append(o.attempt)
        return AttemptOutcome.TIMEOUT if o.timeout else AttemptOutcome.ERROR

    async def record_lost(self, leases: list[Any], outcome: AttemptOutcome) -> Recorded:
        """Leases that expired or whose volunteer left (already requeued in the queue); retried on a
        deadlock or a lost connection, as ``record`` is."""
        return await self._retry_call(lambda: self._record_lost(leases, outcome))

    async def _record_lost(self, leases: list[Any], outcome: AttemptOutcome) -> Recorded:
        rec = Recorded()
        if not leases:
            return rec
        now = _now()
        counted = outcome in (AttemptOutcome.EXPIRED,)
        async with self.engine.begin() as conn:
            for lease in leases:
                await conn.execute(
                    attempts.insert().values(
                        id=lease.attempt,
                        task_id=lease.task,
                        job_id=lease.job,
                        volunteer=lease.volunteer,
                        outcome=outcome.value,
                        finished_at=now,
                    )
                )
                if not counted:
                    continue
                task = (
                    await conn.execute(sa.select(tasks.c.attempts, tasks.c.state).where(tasks.c.id == lease.task))
                ).first()
                if task is None or task.state != TaskState.QUEUED.value:
                    rec.drop.append(ReadyItem(lease.job, lease.task, lease.index, lease.timeout))
                    continue
                info = await self.job_info(lease.job)
                failed = info is None or task.attempts + 1 >= info.max_attempts
                values: dict[str, Any] = {"attempts": task.attempts + 1}
                if failed:
                    message = f"lease expired: no result or heartbeat within {lease.timeout:g} s + grace"
                    values.update(
                        state=TaskState.FAILED.value,
                        finished_at=now,
                        error_ct=self.box.seal_text(message, f"task:{lease.task}:error"),
                    )
                    rec.drop.append(ReadyItem(lease.job, lease.task, lease.index, lease.timeout))
                    rec.jobs.add(lease.job)
                    rec.upstream.append((lease.job, lease.task, lease.index, TaskState.FAILED.value, None))
                    await conn.execute(jobs.update().where(jobs.c.id == lease.job).values(n_failed=jobs.c.n_failed + 1))
                await conn.execute(
                    tasks.update()
                    .where(tasks.c.id == lease.task, tasks.c.state == TaskState.QUEUED.value)
                    .values(**values)
                )
            await pipelines.feed(self, conn, rec)
            await self.finish_jobs(conn, rec.jobs)
        return rec

    async def finish_jobs(self, conn: AsyncConnection, job_ids: set[int]) -> None:
        if not job_ids:
            return
        result = await conn.execute(
            jobs.update()
            .where(
                jobs.c.id.in_(list(job_ids)),
                jobs.c.state == JobState.RUNNING.value,
                jobs.c.n_done + jobs.c.n_failed >= jobs.c.n_tasks,
            )
            .values(
                state=sa.case((jobs.c.n_failed > 0, JobState.FAILED.value), else_=JobState.DONE.value),
                finished_at=_now(),
            )
        )
        if result.rowcount:  # a job finished: its cached info (state) is stale; otherwise keep the cache
            for job_id in job_ids:
                self.forget_job(job_id)

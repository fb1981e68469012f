"""Writing what volunteers send back, as the validator (server/jobs/validator.py) decides; lost leases.

No decision about a task's result is made here: the validator reads through ``admissible``,
``lock_tasks``, ``pending_reports`` and ``reputations``, decides, and hands ``write_outcomes`` the writes.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.crypto import Box
from server.protocol import AttemptOutcome, JobState, Outcome, TaskState
from server.queue import ReadyItem
from server.spec import attempts_exhausted
from server.store import pipelines
from server.store.models import JobInfo, OutcomeWrites, Recorded, TaskDecision
from server.store.models import now as _now
from server.store.tables import attempts, jobs, reputation, tasks, volunteers

TaskRow = collections.namedtuple("TaskRow", "id job_id idx state attempts replicas")


@dataclasses.dataclass(frozen=True)
class Positional:
    """A statement compiled once for the engine's dialect: its SQL with positional parameters, and
    the names of the values that fill them, in order."""

    sql: str
    names: tuple[str, ...]

    def values(self, rows: list[dict]) -> list[tuple]:
        """Each row's values in the order of the statement's parameters."""
        get = operator.itemgetter(*self.names)
        return [get(row) for row in rows] if len(self.names) > 1 else [(get(row),) for row in rows]


def _positional(stmt: Any, dialect: Any, columns: tuple[str, ...] | None = None) -> Positional:
    """Compile ``stmt`` (an INSERT of ``columns``, or a statement of bound parameters) to SQL with
    positional parameters (both drivers' paramstyles are: ``?`` and ``%s``)."""
    compiled = stmt.compile(dialect=dialect, column_keys=list(columns) if columns is not None else None)
    names = compiled.positiontup
    if names is None:
        raise TypeError(f"the {dialect.name} dialect does not bind parameters by position")
    fixed = [name for name in names if not compiled.binds[name].required]
    if fixed:  # a literal in the statement: every value must come from the rows
        raise TypeError(f"bind {', '.join(fixed)} by name: the rows give every value")
    return Positional(compiled.string, tuple(names))


async def _executemany(conn: AsyncConnection, sql: Positional, rows: list[dict]) -> int:
    """Run a compiled statement for many rows straight through the driver; returns the rows it
    changed. The rows' values are plain (numbers, text, bytes, None): SQLAlchemy's per-row
    parameter processing, which they do not need, was a tenth of the server's CPU a task."""
    result = await conn.exec_driver_sql(sql.sql, sql.values(rows))
    return result.rowcount


# The statements of every results batch, built once; the ids go in as one expanding parameter (an
# IN list of literals was a bound parameter made and coerced per id, in every statement).
_KNOWN = sa.select(attempts.c.id, attempts.c.task_id, attempts.c.volunteer, attempts.c.outcome).where(
    attempts.c.id.in_(sa.bindparam("ids", expanding=True))
)
_LOCK_TASKS = (
    sa.select(tasks.c.id, tasks.c.job_id, tasks.c.idx, tasks.c.state, tasks.c.attempts, tasks.c.replicas)
    .where(tasks.c.id.in_(sa.bindparam("ids", expanding=True)))
    .with_for_update()
)


class Outcomes:
    """Mixed into ``Storage``; uses its ``engine``, ``box``, ``job_info``, ``forget_job`` and ``_retry``."""

    engine: AsyncEngine
    box: Box
    _compiled: dict[tuple, Positional]

    if TYPE_CHECKING:  # Storage's, declared here so the mixin is type-checked against them

        async def _retry(self, work: Callable[[AsyncConnection], Awaitable[Any]], attempts: int = 5) -> Any: ...
        async def _retry_call(self, call: Callable[[], Awaitable[Any]], attempts: int = 5) -> Any: ...
        async def job_info(self, job_id: int) -> JobInfo | None: ...
        def forget_job(self, job_id: int) -> None: ...

    async def run_in_transaction(self, work: Callable[[AsyncConnection], Awaitable[Any]]) -> Any:
        """Run ``work(conn)`` in one transaction, again if it was a deadlock victim (the validator's)."""
        return await self._retry(work)

    async def admissible(
        self, conn: AsyncConnection, items: list[tuple[str, Outcome]], live: dict[str, Any], rec: Recorded
    ) -> list[tuple[str, Outcome, bool]]:
        """The outcomes this volunteer may report: (volunteer, outcome, lease still live); the rest
        go to ``rec.ignored``. With its lease gone, an outcome counts only if its attempt was handed
        to this volunteer and then expired or was abandoned (not recorded yet)."""
        known = {r.id: r for r in (await conn.execute(_KNOWN, {"ids": [o.attempt for _, o in items]})).all()}
        accepted = []
        for volunteer, o in items:
            lease = live.get(o.attempt)
            prior = known.get(o.attempt)
            if lease is not None:
                ok = lease.task == o.task and lease.volunteer == volunteer
            else:
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
        return accepted

    async def lock_tasks(self, conn: AsyncConnection, task_ids: list[int]) -> dict[int, TaskRow]:
        """The tasks, locked (one statement) until the transaction ends."""
        rows = await conn.execute(_LOCK_TASKS, {"ids": task_ids})
        return {r.id: TaskRow(*r) for r in rows.all()}

    async def pending_reports(self, conn: AsyncConnection, task_ids: list[int]) -> dict[int, list[tuple]]:
        """Reports awaiting a decision, per task, oldest first: (attempt, volunteer, {"result"|"error": v},
        seconds the run took as claimed)."""
        out: dict[int, list[tuple]] = {}
        if not task_ids:
            return out
        rows = await conn.execute(
            sa.select(
                attempts.c.id, attempts.c.task_id, attempts.c.volunteer, attempts.c.reported_ct, attempts.c.elapsed
            )
            .where(attempts.c.task_id.in_(task_ids), attempts.c.verdict == "pending")
            .order_by(attempts.c.finished_at, attempts.c.id)
        )
        for r in rows.all():
            reported = self.box.open_json(r.reported_ct, f"attempt:{r.id}:reported")
            out.setdefault(r.task_id, []).append((r.id, r.volunteer, reported, r.elapsed or 0.0))
        return out

    async def reporters(self, task_ids: list[int]) -> list[tuple[int, str]]:
        """(task, volunteer) for every report awaiting a decision: what the queue's exclusions are
        rebuilt from after a Redis flush."""
        if not task_ids:
            return []
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(attempts.c.task_id, attempts.c.volunteer).where(
                    attempts.c.task_id.in_(task_ids), attempts.c.verdict == "pending"
                )
            )
            return [(r.task_id, r.volunteer) for r in rows.all()]

    async def reputations(self, conn: AsyncConnection, volunteers: list[str]) -> dict[str, Any]:
        """Reputation rows (locked) of these volunteers; a volunteer with none has none yet."""
        if not volunteers:
            return {}
        rows = await conn.execute(
            sa.select(reputation).where(reputation.c.volunteer.in_(sorted(set(volunteers)))).with_for_update()
        )
        return {r.volunteer: r for r in rows.all()}

    async def _write_job_counts(self, conn: AsyncConnection, writes: OutcomeWrites, now: float) -> None:
        """Add the batch's deltas to its jobs' counters, and set a job's ``started_at`` the first time."""
        starts: dict[int, float] = {}  # per job: when this batch's earliest task started (finish less run time)
        for a in writes.attempts:
            job_id = a["task"].job_id
            starts[job_id] = min(starts.get(job_id, now), now - max(0.0, float(a["outcome"].elapsed or 0.0)))
        for job_id, deltas in writes.counts.items():
            values = {c: jobs.c[c] + n for c, n in deltas.items() if n}
            if values and job_id in starts:  # throughput once finished counts from the first start
                values["started_at"] = sa.func.coalesce(jobs.c.started_at, starts[job_id])
            if values:
                await conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))

    async def write_outcomes(self, conn: AsyncConnection, writes: OutcomeWrites, rec: Recorded) -> None:
        """Write what the validator decided: attempts, verdicts, tasks, job counters, reputations."""
        now = _now()
        await self._write_attempts(conn, writes, now)
        done_rows = [self._done_row(d, now) for d in writes.decisions if d.state is TaskState.DONE]
        for row in done_rows:  # what the researcher's stored-bytes quota counts
            writes.count(row["job_id"], "result_bytes", len(row["result_ct"]) + len(row["output_ct"] or b""))
        if done_rows:
            await self._mark_done(conn, done_rows)
        for d in writes.decisions:
            if d.state is TaskState.FAILED:
                await self._mark_failed(conn, d, now)
        for task, o, _volunteer in writes.progress:
            await self._mark_progress(conn, task, o)
        if writes.reputation:
            await self._write_reputation(conn, writes.reputation, now)
        if writes.reopen:
            await self._reopen(conn, writes, rec)
        await self._write_job_counts(conn, writes, now)
        await pipelines.feed(self, conn, rec)
        await self.finish_jobs(conn, rec.jobs)
        if writes.stats:
            rows = [
                {
                    "id": v,
                    "first_seen": now,
                    "last_seen": now,
                    "capabilities": "{}",
                    "throttle": "{}",
                    "tasks_done": int(n),
                    "task_seconds": c,
                }
                for v, (n, c) in writes.stats.items()
            ]
            await self._upsert(
                conn, volunteers, ["id"], rows, replace=["last_seen"], add=["tasks_done", "task_seconds"]
            )

    async def _write_attempts(self, conn: AsyncConnection, writes: OutcomeWrites, now: float) -> None:
        rows = []
        for a in writes.attempts:
            o, task = a["outcome"], a["task"]
            reported = a["reported"]
            verdict = writes.verdicts.get(o.attempt, "pending") if reported is not None else None
            # A lone result accepted under replication 1 is never compared again: the task row holds
            # it, so its attempt keeps only the verdict (one seal a task less).
            kept = reported if verdict != "single" else None
            rows.append(
                {
                    "id": o.attempt,
                    "task_id": task.id,
                    "job_id": task.job_id,
                    "volunteer": a["volunteer"],
                    "outcome": a["kind"].value,
                    "elapsed": o.elapsed,
                    "finished_at": now,
                    "reported_ct": (
                        self.box.seal_json(kept, f"attempt:{o.attempt}:reported") if kept is not None else None
                    ),
                    "verdict": verdict,
                    "credit": writes.credit.get(o.attempt),
                }
            )
        if rows:
            await self._upsert(conn, attempts, ["id"], rows, replace=list(rows[0]))
        mine = {r["id"] for r in rows}
        # earlier replicas decided now: few statements, the replicas of one quorum share their credit
        by_verdict: dict[tuple[str, float | None], list[str]] = {}
        for attempt, verdict in writes.verdicts.items():
            if attempt not in mine:
                by_verdict.setdefault((verdict, writes.credit.get(attempt)), []).append(attempt)
        for (verdict, credit), ids in by_verdict.items():
            await conn.execute(attempts.update().where(attempts.c.id.in_(ids)).values(verdict=verdict, credit=credit))

    def _done_row(self, d: TaskDecision, now: float) -> dict:
        aad = f"task:{d.task.id}"
        return {
            "id": d.task.id,
            "job_id": d.task.job_id,
            "idx": d.task.idx,
            "state": TaskState.DONE.value,
            "attempts": d.task.attempts,
            "result_ct": self.box.seal_json(d.result, aad + ":result"),
            "output_ct": self.box.seal_text(d.output, aad + ":output") if d.output else None,
            "error_ct": None,
            "volunteer": d.volunteer,
            "elapsed": d.elapsed,
            "finished_at": now,
            "replicas": d.replicas,
            "accepted": d.how[:32],
        }

    async def _mark_failed(self, conn: AsyncConnection, d: TaskDecision, now: float) -> None:
        aad = f"task:{d.task.id}"
        values: dict[str, Any] = {
            "state": TaskState.FAILED.value,
            "attempts": d.failures,
            "replicas": d.replicas,
            "error_ct": self.box.seal_text(d.error or "", aad + ":error"),
            "volunteer": d.volunteer,
            "finished_at": now,
        }
        if d.output:
            values["output_ct"] = self.box.seal_text(d.output, aad + ":output")
        await conn.execute(
            tasks.update().where(tasks.c.id == d.task.id, tasks.c.state == TaskState.OPEN.value).values(**values)
        )

    async def _mark_progress(self, conn: AsyncConnection, task: TaskRow, o: Outcome) -> None:
        """A task that needs another volunteer: count the replica (and the failure, for an error)."""
        values: dict[str, Any] = {"replicas": task.replicas}
        if o.error is not None:
            aad = f"task:{task.id}"
            values.update(
                attempts=task.attempts,
                error_ct=self.box.seal_text(o.error, aad + ":error"),
                output_ct=self.box.seal_text(o.output, aad + ":output") if o.output else None,
            )
        await conn.execute(
            tasks.update().where(tasks.c.id == task.id, tasks.c.state == TaskState.OPEN.value).values(**values)
        )

    async def _write_reputation(self, conn: AsyncConnection, changes: dict[str, tuple], now: float) -> None:
        rows = [
            {
                "volunteer": v,
                "consecutive": consecutive,
                "validated": validated,
                "invalid": invalid,
                "last_invalid_at": last_invalid,
            }
            for v, (consecutive, validated, invalid, last_invalid) in changes.items()
        ]
        await self._upsert(conn, reputation, ["volunteer"], rows, replace=list(rows[0]))

    async def _reopen(self, conn: AsyncConnection, writes: OutcomeWrites, rec: Recorded) -> None:
        """Results accepted on the word of volunteers just found invalid go back to replication:
        their tasks in running jobs are queued again, with that report pending confirmation."""
        rows = (
            await conn.execute(
                sa.select(tasks.c.id, tasks.c.job_id, tasks.c.idx, tasks.c.volunteer, jobs.c.timeout, jobs.c.priority)
                .join(jobs, jobs.c.id == tasks.c.job_id)
                .where(
                    tasks.c.volunteer.in_(writes.reopen),
                    tasks.c.state == TaskState.DONE.value,
                    tasks.c.accepted.like("trusted%"),
                    jobs.c.state == JobState.RUNNING.value,
                )
                .with_for_update()
            )
        ).all()
        if not rows:
            return
        ids = [r.id for r in rows]
        await conn.execute(
            tasks.update()
            .where(tasks.c.id.in_(ids))
            .values(state=TaskState.OPEN.value, accepted=None, result_ct=None, finished_at=None)
        )
        await conn.execute(
            attempts.update()
            .where(attempts.c.task_id.in_(ids), attempts.c.verdict == "trusted")
            .values(verdict="pending", credit=None)  # re-checked: no credit unless confirmed
        )
        for r in rows:
            writes.count(r.job_id, "n_done", -1)
            writes.count(r.job_id, "n_pending")
            rec.jobs.add(r.job_id)
            rec.exclude.append((r.id, r.volunteer))
            rec.push.append(ReadyItem(r.job_id, r.id, r.idx, r.timeout, r.priority))

    async def _mark_done(self, conn: AsyncConnection, rows: list[dict]) -> None:
        if self.engine.dialect.name in ("mysql", "mariadb"):
            # One multi-row statement: the rows are locked (FOR UPDATE) and known to be queued, so
            # this "upsert" only ever updates (the driver runs an UPDATE executemany row by row).
            await self._upsert(conn, tasks, ["id"], rows, replace=list(rows[0]))
            return
        # SQLite: the driver starts the transaction at the first write, so the state read above
        # was not locked: keep the guard in the statement (in-process, executemany is cheap).
        shape = ("mark_done", tuple(rows[0]))
        sql = self._compiled.get(shape)
        if sql is None:
            stmt = (
                tasks.update()
                .where(tasks.c.id == sa.bindparam("tid"), tasks.c.state == sa.bindparam("open"))
                .values({c: sa.bindparam(f"v_{c}") for c in rows[0] if c not in ("id", "job_id", "idx", "attempts")})
            )
            sql = self._compiled[shape] = _positional(stmt, self.engine.dialect)
        renamed = [{"tid": r["id"], "open": TaskState.OPEN.value, **{f"v_{c}": v for c, v in r.items()}} for r in rows]
        if await _executemany(conn, sql, renamed) != len(rows):
            # a task finished otherwise meanwhile: count from the table
            for job_id in {r["job_id"] for r in rows}:
                n = (
                    await conn.execute(
                        sa.select(sa.func.count()).where(
                            tasks.c.job_id == job_id, tasks.c.state == TaskState.DONE.value
                        )
                    )
                ).scalar()
                mine = sum(r["job_id"] == job_id for r in rows)  # added by the caller's counters
                await conn.execute(jobs.update().where(jobs.c.id == job_id).values(n_done=n - mine))

    async def _insert_many(self, conn: AsyncConnection, table: sa.Table, rows: list[dict]) -> None:
        """INSERT many rows (all with the same columns): compiled once, run through the driver."""
        if not rows:
            return
        columns = tuple(rows[0])
        shape = ("insert", table.name, columns)
        sql = self._compiled.get(shape)
        if sql is None:
            sql = self._compiled[shape] = _positional(table.insert(), self.engine.dialect, columns)
        await _executemany(conn, sql, rows)

    async def _upsert(
        self,
        conn: AsyncConnection,
        table: sa.Table,
        key: list[str],
        rows: list[dict],
        replace: list[str],
        add: tuple[str, ...] | list[str] = (),
    ) -> None:
        """INSERT ... ON DUPLICATE KEY / ON CONFLICT UPDATE of many rows (all with the same columns).

        ``replace`` columns take the new value, ``add`` columns are incremented by it. One statement
        of one row, executed for many (the MySQL driver sends them as one multi-row INSERT): its SQL
        is compiled once and cached, where a statement of N rows' VALUES was compiled afresh for each
        batch (the largest part of the server's CPU per task when results came in batches).
        """
        columns = tuple(rows[0])
        shape = (table.name, columns, tuple(key), tuple(replace), tuple(add))
        sql = self._compiled.get(shape)
        if sql is None:
            stmt: Any
            if self.engine.dialect.name in ("mysql", "mariadb"):
                stmt = mysql_insert(table)
                new = stmt.inserted
                stmt = stmt.on_duplicate_key_update(
                    {c: new[c] for c in replace if c not in key} | {c: table.c[c] + new[c] for c in add}
                )
            else:
                stmt = sqlite_insert(table)
                new = stmt.excluded
                stmt = stmt.on_conflict_do_update(
                    index_elements=key,
                    set_={c: new[c] for c in replace if c not in key} | {c: table.c[c] + new[c] for c in add},
                )
            sql = self._compiled[shape] = _positional(stmt, self.engine.dialect, columns)
        await _executemany(conn, sql, rows)

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
            # An attempt may have a row already: abandoned, then resumed by its volunteer (same id),
            # or its result arrived just before the lease ended (then the result stands).
            found = await conn.execute(
                sa.select(attempts.c.id, attempts.c.outcome).where(attempts.c.id.in_([le.attempt for le in leases]))
            )
            existing = {r.id: r.outcome for r in found.all()}
            for lease in leases:
                before = existing.get(lease.attempt)
                if before is None:
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
                elif before == AttemptOutcome.ABANDONED.value:
                    await conn.execute(
                        attempts.update()
                        .where(attempts.c.id == lease.attempt)
                        .values(outcome=outcome.value, finished_at=now)
                    )
                else:
                    continue
                if not counted:
                    continue
                task = (
                    await conn.execute(sa.select(tasks.c.attempts, tasks.c.state).where(tasks.c.id == lease.task))
                ).first()
                if task is None or task.state != TaskState.OPEN.value:
                    rec.drop.append(ReadyItem(lease.job, lease.task, lease.index, lease.timeout))
                    continue
                info = await self.job_info(lease.job)
                failed = info is None or attempts_exhausted(task.attempts + 1, info.max_attempts)
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
                    .where(tasks.c.id == lease.task, tasks.c.state == TaskState.OPEN.value)
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

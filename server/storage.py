"""The storage layer: every SQL statement, over both dialects, with encryption at rest.

Values that hold research data (code, inputs, results, output, errors) are sealed with
``Box`` under associated data naming their row, e.g. ``task:17:result``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server import pipelines
from server.crypto import Box, code_hash
from server.jobspec import InvalidJob, JobSpec, encode_input
from server.protocol import JOB_TERMINAL, AttemptOutcome, JobState, Outcome, TaskState
from server.queue import ReadyItem
from server.tables import attempts, jobs, researchers, sessions, tasks, volunteers

INSERT_CHUNK = 1000
_TaskRow = collections.namedtuple("_TaskRow", "id job_id idx state attempts")


class NotFound(Exception):
    """No such row, or not the caller's."""


class Conflict(Exception):
    """A unique value already exists, or the row is in a state that forbids the change."""


@dataclasses.dataclass(frozen=True)
class Researcher:
    id: int
    email: str
    approved: bool
    operator: bool


@dataclasses.dataclass(frozen=True)
class JobInfo:
    """What dispatch needs of a job, cached in memory (no plaintext code)."""

    id: int
    researcher_id: int
    state: str
    code_hash: str
    inputs_kind: str
    range_start: int
    range_step: int
    timeout: float
    priority: int
    max_attempts: int
    requirements: list

    def input_at(self, index: int) -> Any:
        return self.range_start + index * self.range_step if self.inputs_kind == "range" else None


@dataclasses.dataclass
class Recorded:
    """What committing a batch of outcomes did, for the dispatcher to act on in Redis."""

    acked: list[str] = dataclasses.field(default_factory=list)  # committed: tell the volunteer
    ignored: list[str] = dataclasses.field(default_factory=list)  # late or duplicate: drop it
    release: list[str] = dataclasses.field(default_factory=list)  # end these leases
    requeue: list[str] = dataclasses.field(default_factory=list)  # end and make ready again
    drop: list[ReadyItem] = dataclasses.field(default_factory=list)  # failed: out of the queue
    jobs: set[int] = dataclasses.field(default_factory=set)  # jobs whose counts changed
    push: list[ReadyItem] = dataclasses.field(default_factory=list)  # new tasks to make ready
    upstream: list[tuple] = dataclasses.field(default_factory=list)  # (job, task, idx, state, result) finished


def _now() -> float:
    return time.time()


class Storage:
    def __init__(self, engine: AsyncEngine, box: Box) -> None:
        self.engine = engine
        self.box = box
        self._jobs: dict[int, JobInfo] = {}

    # ------------------------------------------------------------------------- researchers
    async def add_researcher(self, email: str, password_hash: str, token_hash: str, operator: bool = False) -> int:
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    researchers.insert().values(
                        email=email,
                        password_hash=password_hash,
                        token_hash=token_hash,
                        approved=True,
                        operator=operator,
                        created_at=_now(),
                    )
                )
                return int(result.inserted_primary_key[0])
        except IntegrityError:
            raise Conflict(f"a researcher with email {email} exists") from None

    async def researcher_by_token(self, token_hash: str) -> Researcher | None:
        return await self._researcher(researchers.c.token_hash == token_hash)

    async def researcher_by_email(self, email: str) -> tuple[Researcher, str] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(researchers).where(researchers.c.email == email))).first()
        if row is None:
            return None
        return Researcher(row.id, row.email, row.approved, row.operator), row.password_hash

    async def researcher_by_session(self, id_hash: str) -> Researcher | None:
        query = (
            sa.select(researchers)
            .join(sessions, sessions.c.researcher_id == researchers.c.id)
            .where(sessions.c.id_hash == id_hash, sessions.c.expires_at > _now())
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else Researcher(row.id, row.email, row.approved, row.operator)

    async def _researcher(self, where: Any) -> Researcher | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(researchers).where(where))).first()
        return None if row is None else Researcher(row.id, row.email, row.approved, row.operator)

    async def add_session(self, id_hash: str, researcher_id: int, ttl: float) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sessions.insert().values(id_hash=id_hash, researcher_id=researcher_id, expires_at=_now() + ttl)
            )

    async def drop_session(self, id_hash: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(sessions.delete().where(sessions.c.id_hash == id_hash))

    async def set_approved(self, researcher_id: int, approved: bool) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                researchers.update().where(researchers.c.id == researcher_id).values(approved=approved)
            )
        if result.rowcount == 0:
            raise NotFound(f"no researcher {researcher_id}")

    async def list_researchers(self) -> list[dict]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(researchers).order_by(researchers.c.id))).all()
        return [
            {"id": r.id, "email": r.email, "approved": r.approved, "operator": r.operator, "created_at": r.created_at}
            for r in rows
        ]

    # -------------------------------------------------------------------------------- jobs
    async def create_job(self, researcher_id: int, spec: JobSpec, limit: int) -> int:
        """Insert the job and its tasks (streamed in chunks) in one transaction; state running."""
        async with self.engine.begin() as conn:
            n_tasks = spec.n_tasks
            if spec.inputs_kind == "after":
                n_tasks = await self._upstream_size(conn, researcher_id, spec.parent_job_id)
            result = await conn.execute(
                jobs.insert().values(
                    researcher_id=researcher_id,
                    name=spec.name,
                    state=JobState.QUEUED.value,
                    code_ct=b"",
                    code_hash=code_hash(spec.code),
                    inputs_kind=spec.inputs_kind,
                    range_start=spec.range_start,
                    range_step=spec.range_step,
                    n_tasks=n_tasks,
                    n_done=0,
                    n_failed=0,
                    timeout=spec.timeout,
                    max_attempts=spec.max_attempts,
                    priority=spec.priority,
                    requirements=json.dumps(spec.requirements),
                    replication=spec.replication,
                    parent_job_id=spec.parent_job_id,
                    created_at=_now(),
                )
            )
            job_id = int(result.inserted_primary_key[0])
            await conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(code_ct=self.box.seal_text(spec.code, f"job:{job_id}:code"))
            )
            for chunk in _chunks(range(spec.n_tasks), INSERT_CHUNK):
                rows = []
                for index in chunk:
                    row = {"job_id": job_id, "idx": index, "state": TaskState.QUEUED.value, "attempts": 0}
                    if spec.inputs_kind == "list":
                        try:
                            data = encode_input(spec.inputs[index], limit)
                        except ValueError as exc:
                            if isinstance(exc, InvalidJob):
                                raise
                            raise InvalidJob(f"input {index} is not valid JSON: {exc}", field="inputs") from None
                        row["input_ct"] = self.box.seal(data, f"job:{job_id}:input:{index}")
                    rows.append(row)
                await conn.execute(tasks.insert(), rows)
            await conn.execute(jobs.update().where(jobs.c.id == job_id).values(state=JobState.RUNNING.value))
            if spec.inputs_kind == "after":
                rec = Recorded()
                while await pipelines.backfill(self, conn, job_id, rec):
                    pass
                await self.finish_jobs(conn, {job_id})
        return job_id

    async def _upstream_size(self, conn: AsyncConnection, researcher_id: int, upstream: int | None) -> int:
        """Lock the upstream job of a pipeline stage (so no result slips between read and feed)."""
        row = (
            await conn.execute(
                sa.select(jobs.c.n_tasks, jobs.c.state)
                .where(jobs.c.id == upstream, jobs.c.researcher_id == researcher_id)
                .with_for_update()
            )
        ).first()
        if row is None:
            raise InvalidJob(f"'after': no job {upstream} of yours", field="inputs")
        if row.state == JobState.CANCELLED.value:
            raise InvalidJob(f"'after': job {upstream} was cancelled", field="inputs")
        return row.n_tasks

    async def job_info(self, job_id: int) -> JobInfo | None:
        info = self._jobs.get(job_id)
        if info is not None and info.state not in JOB_TERMINAL:
            return info
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(jobs).where(jobs.c.id == job_id))).first()
        if row is None:
            return None
        info = JobInfo(
            row.id,
            row.researcher_id,
            row.state,
            row.code_hash,
            row.inputs_kind,
            row.range_start or 0,
            row.range_step or 1,
            row.timeout,
            row.priority,
            row.max_attempts,
            json.loads(row.requirements),
        )
        if len(self._jobs) > 10_000:
            self._jobs.clear()
        self._jobs[job_id] = info
        return info

    def forget_job(self, job_id: int) -> None:
        self._jobs.pop(job_id, None)

    async def job_code(self, job_id: int) -> str:
        async with self.engine.connect() as conn:
            blob = (await conn.execute(sa.select(jobs.c.code_ct).where(jobs.c.id == job_id))).scalar()
        if blob is None:
            raise NotFound(f"no job {job_id}")
        return self.box.open_text(blob, f"job:{job_id}:code")

    async def get_job(self, researcher_id: int | None, job_id: int) -> dict:
        where = [jobs.c.id == job_id]
        if researcher_id is not None:
            where.append(jobs.c.researcher_id == researcher_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(*_JOB_COLUMNS).where(*where))).first()
            if row is None:
                raise NotFound(f"no job {job_id}")
            job = _job_dict(row)
            since = _now() - 30.0
            recent = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(tasks)
                    .where(tasks.c.job_id == job_id, tasks.c.finished_at > since)
                )
            ).scalar()
        job["throughput"] = round((recent or 0) / 30.0, 3)
        return job

    async def list_jobs(self, researcher_id: int, limit: int = 200) -> list[dict]:
        query = (
            sa.select(*_JOB_COLUMNS)
            .where(jobs.c.researcher_id == researcher_id)
            .order_by(jobs.c.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [_job_dict(row) for row in (await conn.execute(query)).all()]

    async def cancel_job(self, researcher_id: int, job_id: int) -> bool:
        """Cancel a running job: its unfinished tasks become cancelled. False if it had ended."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(jobs.c.state).where(jobs.c.id == job_id, jobs.c.researcher_id == researcher_id)
                )
            ).first()
            if row is None:
                raise NotFound(f"no job {job_id}")
            if row.state in {s.value for s in JOB_TERMINAL}:
                return False
            await conn.execute(
                tasks.update()
                .where(tasks.c.job_id == job_id, tasks.c.state == TaskState.QUEUED.value)
                .values(state=TaskState.CANCELLED.value, finished_at=_now())
            )
            await conn.execute(
                jobs.update().where(jobs.c.id == job_id).values(state=JobState.CANCELLED.value, finished_at=_now())
            )
        self.forget_job(job_id)
        return True

    async def ready_items(self, job_ids: Iterable[int] | None = None) -> AsyncIterator[list[ReadyItem]]:
        """The queued tasks of running jobs, in chunks: what the ready queue is rebuilt from."""
        query = sa.select(jobs.c.id, jobs.c.timeout, jobs.c.priority).where(jobs.c.state == JobState.RUNNING.value)
        if job_ids is not None:
            query = query.where(jobs.c.id.in_(list(job_ids)))
        async with self.engine.connect() as conn:
            running = (await conn.execute(query)).all()
        for job in running:
            last = -1
            while True:
                async with self.engine.connect() as conn:
                    rows = (
                        await conn.execute(
                            sa.select(tasks.c.id, tasks.c.idx)
                            .where(
                                tasks.c.job_id == job.id,
                                tasks.c.state == TaskState.QUEUED.value,
                                tasks.c.idx > last,
                            )
                            .order_by(tasks.c.idx)
                            .limit(INSERT_CHUNK * 5)
                        )
                    ).all()
                if not rows:
                    break
                last = rows[-1].idx
                yield [ReadyItem(job.id, r.id, r.idx, job.timeout, job.priority) for r in rows]

    async def task_inputs(self, task_ids: list[int]) -> dict[int, Any]:
        """Decrypted inputs of list-input tasks (other kinds have no stored input)."""
        if not task_ids:
            return {}
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(tasks.c.id, tasks.c.job_id, tasks.c.idx, tasks.c.input_ct).where(
                        tasks.c.id.in_(task_ids), tasks.c.input_ct.is_not(None)
                    )
                )
            ).all()
        return {r.id: self.box.open_json(r.input_ct, f"job:{r.job_id}:input:{r.idx}") for r in rows}

    # ---------------------------------------------------------------------------- outcomes
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
        """Leases that expired or whose volunteer left (already requeued in the queue)."""
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
        await conn.execute(
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
        for job_id in job_ids:
            self.forget_job(job_id)

    async def retry_failed(self, researcher_id: int, job_id: int) -> int:
        """Failed tasks become queued again with fresh attempts; the job runs again."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(jobs.c.state).where(jobs.c.id == job_id, jobs.c.researcher_id == researcher_id)
                )
            ).first()
            if row is None:
                raise NotFound(f"no job {job_id}")
            if row.state == JobState.CANCELLED.value:
                raise Conflict("a cancelled job cannot be retried")
            result = await conn.execute(
                tasks.update()
                .where(tasks.c.job_id == job_id, tasks.c.state == TaskState.FAILED.value)
                .values(state=TaskState.QUEUED.value, attempts=0, finished_at=None)
            )
            n = result.rowcount
            if n:
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(n_failed=jobs.c.n_failed - n, state=JobState.RUNNING.value, finished_at=None)
                )
        self.forget_job(job_id)
        return n

    # ----------------------------------------------------------------------------- exports
    async def iter_tasks(self, job_id: int, only_errors: bool = False) -> AsyncIterator[dict]:
        """Every task of a job in input order, decrypted, fetched in pages (constant memory)."""
        info = await self.job_info(job_id)
        if info is None:
            raise NotFound(f"no job {job_id}")
        last = -1
        while True:
            query = (
                sa.select(
                    tasks.c.id,
                    tasks.c.idx,
                    tasks.c.state,
                    tasks.c.attempts,
                    tasks.c.input_ct,
                    tasks.c.result_ct,
                    tasks.c.output_ct,
                    tasks.c.error_ct,
                )
                .where(tasks.c.job_id == job_id, tasks.c.idx > last)
                .order_by(tasks.c.idx)
                .limit(500)
            )
            if only_errors:
                query = query.where(tasks.c.error_ct.is_not(None))
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
            if not rows:
                return
            for r in rows:
                aad = f"task:{r.id}"
                yield {
                    "index": r.idx,
                    "input": (
                        self.box.open_json(r.input_ct, f"job:{job_id}:input:{r.idx}")
                        if r.input_ct is not None
                        else info.input_at(r.idx)
                    ),
                    "state": r.state,
                    "result": self.box.open_json(r.result_ct, aad + ":result") if r.result_ct is not None else None,
                    "error": self.box.open_text(r.error_ct, aad + ":error") or None,
                    "output": self.box.open_text(r.output_ct, aad + ":output"),
                    "attempts": r.attempts,
                }
            last = rows[-1].idx

    # -------------------------------------------------------------------------- volunteers
    async def volunteer_seen(self, volunteer: str, capabilities: dict) -> None:
        """Insert or update a volunteer in one statement (a read-then-insert deadlocks on MySQL)."""
        now = _now()
        caps = json.dumps(capabilities)[:4000]
        row = {
            "id": volunteer,
            "first_seen": now,
            "last_seen": now,
            "capabilities": caps,
            "throttle": "{}",
            "tasks_done": 0,
            "cpu_seconds": 0.0,
        }
        if self.engine.dialect.name in ("mysql", "mariadb"):
            stmt = mysql_insert(volunteers).values(**row)
            stmt = stmt.on_duplicate_key_update(last_seen=now, capabilities=caps)
        else:
            stmt = sqlite_insert(volunteers).values(**row)
            stmt = stmt.on_conflict_do_update(index_elements=["id"], set_={"last_seen": now, "capabilities": caps})
        await self._retry(lambda conn: conn.execute(stmt))

    async def _retry(self, work: Any, attempts: int = 5) -> Any:
        """Run ``work(conn)`` in a transaction, again if the database chose it as a deadlock victim."""
        for attempt in range(attempts):
            try:
                async with self.engine.begin() as conn:
                    return await work(conn)
            except OperationalError as exc:
                code = getattr(exc.orig, "args", [None])[0]
                if code not in (1213, 1205) or attempt == attempts - 1:  # deadlock, lock wait timeout
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        return None

    async def volunteer_throttle(self, volunteer: str, state: dict) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                volunteers.update()
                .where(volunteers.c.id == volunteer)
                .values(throttle=json.dumps(state)[:4000], last_seen=_now())
            )

    async def volunteer_stats(self, volunteer: str) -> dict:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(volunteers).where(volunteers.c.id == volunteer))).first()
        if row is None:
            raise NotFound(f"no volunteer {volunteer}")
        return {
            "id": row.id,
            "tasks_done": row.tasks_done,
            "cpu_seconds": row.cpu_seconds,
            "throttle": json.loads(row.throttle),
            "first_seen": row.first_seen,
            "last_seen": row.last_seen,
        }


_JOB_COLUMNS = (
    jobs.c.id,
    jobs.c.name,
    jobs.c.state,
    jobs.c.inputs_kind,
    jobs.c.n_tasks,
    jobs.c.n_done,
    jobs.c.n_failed,
    jobs.c.timeout,
    jobs.c.max_attempts,
    jobs.c.priority,
    jobs.c.requirements,
    jobs.c.replication,
    jobs.c.parent_job_id,
    jobs.c.code_hash,
    jobs.c.created_at,
    jobs.c.finished_at,
)


def _job_dict(row: Any) -> dict:
    cancelled = row.n_tasks - row.n_done - row.n_failed if row.state == JobState.CANCELLED.value else 0
    return {
        "id": row.id,
        "name": row.name,
        "state": row.state,
        "inputs_kind": row.inputs_kind,
        "n_tasks": row.n_tasks,
        "counts": {
            "queued": row.n_tasks - row.n_done - row.n_failed - cancelled,
            "running": 0,
            "done": row.n_done,
            "failed": row.n_failed,
            "cancelled": cancelled,
        },
        "timeout": row.timeout,
        "max_attempts": row.max_attempts,
        "priority": row.priority,
        "requirements": json.loads(row.requirements),
        "replication": row.replication,
        "parent_job_id": row.parent_job_id,
        "code_hash": row.code_hash,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
    }


def _chunks(items: Iterable[int], size: int) -> Iterable[list[int]]:
    chunk: list[int] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

"""The storage layer: every SQL statement, over both dialects, with encryption at rest.

Values that hold research data (code, inputs, results, output, errors) are sealed with
``Box`` under associated data naming their row, e.g. ``task:17:result``.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.batching import Coalescer
from server.crypto import Box, code_hash
from server.protocol import JOB_TERMINAL, AttemptOutcome, JobState, TaskState
from server.queue import ReadyItem
from server.spec import ADAPTIVE, InvalidJob, JobSpec, Verification, encode_input
from server.store import live, pipelines
from server.store.accounts import Accounts
from server.store.credit import Credit
from server.store.models import Conflict, JobInfo, NotFound, Recorded, Researcher, inserted_id
from server.store.models import now as _now
from server.store.outcomes import Outcomes, Positional
from server.store.tables import attempts, jobs, tasks

INSERT_CHUNK = 1000
CODE_KEPT = 32  # jobs whose code (at most UVM_MAX_CODE_BYTES each), name and description are kept decrypted
TXN_TASKS = 20_000  # tasks saved per transaction when a job has more
# Tasks made ready at a time (server/jobs/feeder.py): a range job's task rows and ready-queue entries
# are created window by window as hand-out reaches them; a list job's rows all at submit (its inputs
# are the researcher's data), its ready-queue entries window by window.
WINDOW = 2_000  # small: a window is one short transaction (SQLite has one writer), and the submit makes one
# ...and when many volunteers wait, the feeder makes windows one after the other until what they ask
# for is ready (10,000 waiters at prefetch 2: 20,000), at most this many tasks of a job ahead of hand-out
AHEAD_MOST = 25 * WINDOW
THROUGHPUT_WINDOW = 30.0  # seconds: a running job's throughput is over this much of its latest run
__all__ = ["Conflict", "JobInfo", "NotFound", "Recorded", "Researcher", "Storage"]


_INPUTS = sa.select(tasks.c.id, tasks.c.job_id, tasks.c.idx, tasks.c.input_ct).where(
    tasks.c.id.in_(sa.bindparam("ids", expanding=True)), tasks.c.input_ct.is_not(None)
)  # built once: the ids of a lease batch go in as one expanding parameter


class Storage(Accounts, Outcomes, Credit):
    """Jobs and tasks here; accounts, outcome recording and volunteers' credit in their own modules."""

    def __init__(self, engine: AsyncEngine, box: Box) -> None:
        self.engine = engine
        self.box = box
        self._jobs: dict[int, JobInfo] = {}
        # Inputs and checkpoints of the tasks leased: one query for all the leases made at once (a wake)
        self._input_reads: Coalescer[int, Any] = Coalescer(self._read_inputs)
        self._info_reads: Coalescer[int, JobInfo] = Coalescer(self._read_infos)
        self.checkpoint_reads: Coalescer[int, str] = Coalescer(functools.partial(live.read_checkpoints, self))
        self._shown: dict[int, tuple[str, str, str]] = {}  # job -> code, name, description (see _job_shown)
        self._shown_reads: Coalescer[int, tuple[str, str, str]] = Coalescer(self._read_shown)
        self._compiled: dict[tuple, Positional] = {}  # hot executemany statements, compiled once (outcomes.py)

    # -------------------------------------------------------------------------------- jobs
    async def create_job(self, researcher_id: int, spec: JobSpec, limit: int) -> int:
        """Insert the job and the tasks it has rows for at once, then make it running: in one
        transaction, or for a list job of more than TXN_TASKS tasks in several (the job is "queued",
        so not handed out, until all are in). A range job gets the rows of its first WINDOW only
        (``materialise`` adds the others as hand-out reaches them); a pipeline stage none (they are
        fed as its upstream job's tasks finish)."""
        policy = Verification.of(spec.replication, spec.quorum, spec.max_replicas, spec.tolerance)
        rows_now = min(spec.n_tasks, WINDOW) if spec.inputs_kind == "range" else spec.n_tasks
        async with self.engine.begin() as conn:
            n_tasks = spec.n_tasks
            if spec.inputs_kind == "after":
                n_tasks = await self._upstream_size(conn, researcher_id, spec.parent_job_id)
            result = await conn.execute(
                jobs.insert().values(
                    researcher_id=researcher_id,
                    name=spec.name,
                    description=spec.description,
                    state=JobState.QUEUED.value,
                    code_ct=b"",
                    code_hash=code_hash(spec.code),
                    inputs_kind=spec.inputs_kind,
                    range_start=spec.range_start,
                    range_step=spec.range_step,
                    n_tasks=n_tasks,
                    materialised=n_tasks if spec.inputs_kind == "after" else min(n_tasks, WINDOW),
                    n_done=0,
                    n_failed=0,
                    timeout=spec.timeout,
                    max_attempts=spec.max_attempts,
                    priority=spec.priority,
                    requirements=json.dumps(spec.requirements),
                    replication=0 if spec.replication == ADAPTIVE else spec.replication,
                    quorum=policy.quorum,
                    max_replicas=policy.max_replicas,
                    tolerance=json.dumps(spec.tolerance) if spec.tolerance else None,
                    n_validated=0,
                    n_pending=0,
                    n_disagreements=0,
                    n_results=0,
                    parent_job_id=spec.parent_job_id,
                    created_at=_now(),
                )
            )
            job_id = inserted_id(result)
            await conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(code_ct=self.box.seal_text(spec.code, f"job:{job_id}:code"))
            )
            if rows_now <= TXN_TASKS:  # most jobs: all in one transaction
                await self._insert_tasks(conn, job_id, spec, range(rows_now), limit)
                await self._start_job(conn, job_id, spec)
                return job_id
        # A big list job's tasks go in transactions of TXN_TASKS rows, so that other writers (SQLite
        # has one at a time) get their turns meanwhile; the job is handed out once all are in.
        try:
            for chunk in _chunks(range(rows_now), TXN_TASKS):
                async with self.engine.begin() as conn:
                    await self._insert_tasks(conn, job_id, spec, chunk, limit)
                await asyncio.sleep(0.01)  # a writer waiting on SQLite's lock polls: leave it a gap
            async with self.engine.begin() as conn:
                await self._start_job(conn, job_id, spec)
        except BaseException:
            await asyncio.shield(self._drop_job(job_id))  # a bad input half way: nothing of it stays
            raise
        return job_id

    async def _insert_tasks(
        self, conn: AsyncConnection, job_id: int, spec: JobSpec, indices: Iterable[int], limit: int
    ) -> None:
        inputs = spec.inputs or []
        for chunk in _chunks(indices, INSERT_CHUNK):
            rows = []
            for index in chunk:
                row = {"job_id": job_id, "idx": index, "state": TaskState.OPEN.value, "attempts": 0}
                row["replicas"] = 0
                if spec.inputs_kind == "list":
                    try:
                        data = encode_input(inputs[index], limit)
                    except ValueError as exc:
                        if isinstance(exc, InvalidJob):
                            raise
                        raise InvalidJob(f"input {index} is not valid JSON: {exc}", field="inputs") from None
                    row["input_ct"] = self.box.seal(data, f"job:{job_id}:input:{index}")
                rows.append(row)
            await self._insert_many(conn, tasks, rows)

    async def _start_job(self, conn: AsyncConnection, job_id: int, spec: JobSpec) -> None:
        """Queued -> running (unless it was cancelled while its tasks were saved)."""
        await conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id, jobs.c.state == JobState.QUEUED.value)
            .values(state=JobState.RUNNING.value)
        )
        if spec.inputs_kind == "after":
            rec = Recorded()
            while await pipelines.backfill(self, conn, job_id, rec):
                pass
            await self.finish_jobs(conn, {job_id})

    async def _drop_job(self, job_id: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(tasks.delete().where(tasks.c.job_id == job_id))
            await conn.execute(jobs.delete().where(jobs.c.id == job_id))

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
        info = (await self._info_reads.load({job_id: None})).get(job_id)
        if info is not None:
            if len(self._jobs) > 10_000:
                self._jobs.clear()
            self._jobs[job_id] = info
        return info

    async def _read_infos(self, wanted: dict[int, None]) -> dict[int, JobInfo]:
        """``job_info``'s query, for the calls made together (a wake's leases of a new job)."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(jobs).where(jobs.c.id.in_(list(wanted))))).all()
        return {
            row.id: JobInfo(
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
                _verification(row),
            )
            for row in rows
        }

    def forget_job(self, job_id: int) -> None:
        self._jobs.pop(job_id, None)

    async def job_code(self, job_id: int) -> str:
        return (await self._job_shown(job_id))[0]

    async def job_about(self, job_id: int) -> tuple[str, str]:
        """A job's name and public description: what its volunteers are shown."""
        _, name, description = await self._job_shown(job_id)
        return name, description

    async def _job_shown(self, job_id: int) -> tuple[str, str, str]:
        """A job's code, name and description (none of which change), kept for the last CODE_KEPT jobs:
        the volunteers a wake gave a new job's tasks all ask for its code at once."""
        shown = self._shown.get(job_id)
        if shown is None:
            found = await self._shown_reads.load({job_id: None})
            if job_id not in found:
                raise NotFound(f"no job {job_id}")
            shown = self._shown[job_id] = found[job_id]
            while len(self._shown) > CODE_KEPT:
                del self._shown[next(iter(self._shown))]
        return shown

    async def _read_shown(self, wanted: dict[int, None]) -> dict[int, tuple[str, str, str]]:
        query = sa.select(jobs.c.id, jobs.c.code_ct, jobs.c.name, jobs.c.description).where(jobs.c.id.in_(list(wanted)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {r.id: (self.box.open_text(r.code_ct, f"job:{r.id}:code"), r.name, r.description) for r in rows}

    async def get_job(self, researcher_id: int | None, job_id: int) -> dict:
        where = [jobs.c.id == job_id]
        if researcher_id is not None:
            where.append(jobs.c.researcher_id == researcher_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(*_JOB_COLUMNS).where(*where))).first()
            if row is None:
                raise NotFound(f"no job {job_id}")
            job = _job_dict(row)
            recent = await _recent_counts(conn, [job_id] if row.state == JobState.RUNNING.value else [])
        job["throughput"] = throughput(job, recent.get(job_id, 0), _now())
        return job

    async def list_jobs(self, researcher_id: int, limit: int = 200) -> list[dict]:
        query = (
            sa.select(*_JOB_COLUMNS)
            .where(jobs.c.researcher_id == researcher_id)
            .order_by(jobs.c.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            out = [_job_dict(row) for row in (await conn.execute(query)).all()]
            recent = await _recent_counts(conn, [j["id"] for j in out if j["state"] == JobState.RUNNING.value])
        now = _now()
        for job in out:
            job["throughput"] = throughput(job, recent.get(job["id"], 0), now)
        return out

    async def cancel_job(self, researcher_id: int, job_id: int) -> list[ReadyItem] | None:
        """Cancel a running job: its unfinished tasks become cancelled, and no more windows are made
        ready. Returns the tasks that were made ready and still open (to take out of the ready
        queue); None if the job had ended."""

        async def work(conn: AsyncConnection) -> list[ReadyItem] | None:
            row = await _owned_job(conn, researcher_id, job_id)
            if row.state in {s.value for s in JOB_TERMINAL}:
                return None
            job = (
                await conn.execute(
                    sa.select(jobs.c.timeout, jobs.c.priority, jobs.c.materialised).where(jobs.c.id == job_id)
                )
            ).one()
            # at most AHEAD_MOST and two windows are open in a job hand-out is going through (a job from
            # before 0008 may have more: the ready queue skips those of a cancelled job when it meets them)
            query = queued_page_query(job_id, -1, AHEAD_MOST + 4 * WINDOW, below=job.materialised)
            ready = (await conn.execute(query)).all()
            await conn.execute(
                tasks.update()
                .where(tasks.c.job_id == job_id, tasks.c.state == TaskState.OPEN.value)
                .values(state=TaskState.CANCELLED.value, finished_at=_now())
            )
            await conn.execute(
                jobs.update().where(jobs.c.id == job_id).values(state=JobState.CANCELLED.value, finished_at=_now())
            )
            return [ReadyItem(job_id, r.id, r.idx, job.timeout, job.priority, researcher_id) for r in ready]

        changed = await self._retry(work)  # it locks many task rows: a deadlock victim now and then
        self.forget_job(job_id)
        return changed

    async def ready_items(self, job_ids: Iterable[int] | None = None) -> AsyncGenerator[list[ReadyItem]]:
        """The open tasks of running jobs that were made ready (below ``materialised``), in chunks:
        what the ready queue is rebuilt from."""
        query = sa.select(jobs.c.id, jobs.c.timeout, jobs.c.priority, jobs.c.researcher_id, jobs.c.materialised).where(
            jobs.c.state == JobState.RUNNING.value
        )
        if job_ids is not None:
            query = query.where(jobs.c.id.in_(list(job_ids)))
        async with self.engine.connect() as conn:
            running = (await conn.execute(query)).all()
        for job in running:
            last = -1
            while True:
                async with self.engine.connect() as conn:
                    query = queued_page_query(job.id, last, INSERT_CHUNK * 5, below=job.materialised)
                    rows = (await conn.execute(query)).all()
                if not rows:
                    break
                last = rows[-1].idx
                yield [ReadyItem(job.id, r.id, r.idx, job.timeout, job.priority, job.researcher_id) for r in rows]

    async def materialise(self, job_id: int, seen: int) -> tuple[int, int, list[ReadyItem]] | None:
        """Make the next window of a running job ready, if ``materialised`` is still ``seen``.

        Compare-and-swap on ``jobs.materialised`` in the transaction that inserts the window's task
        rows (range jobs; a list job's rows exist already), so of several servers deciding on the
        same ``seen`` one makes the window and the others find it made (the unique (job_id, idx)
        backs this up). Returns (the new ``materialised``, the job's ``n_tasks``, the window's open
        tasks to push), or None
        when there was nothing to do: another server was first, the job was made ready to its end,
        or it is not running (cancelled: no more windows)."""

        async def work(conn: AsyncConnection) -> tuple[int, int, list[ReadyItem]] | None:
            job = (await conn.execute(sa.select(*_WINDOW_COLUMNS).where(jobs.c.id == job_id))).first()
            if job is None or job.state != JobState.RUNNING.value or job.materialised != seen:
                return None
            upto = min(job.n_tasks, seen + WINDOW)
            if upto <= seen:
                return None
            swapped = await conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.materialised == seen, jobs.c.state == JobState.RUNNING.value)
                .values(materialised=upto)
            )
            if swapped.rowcount != 1:
                return None
            if job.inputs_kind == "range":
                for chunk in _chunks(range(seen, upto), INSERT_CHUNK):
                    row = {"job_id": job_id, "state": TaskState.OPEN.value, "attempts": 0, "replicas": 0}
                    await self._insert_many(conn, tasks, [{**row, "idx": i} for i in chunk])
            window = (await conn.execute(queued_page_query(job_id, seen - 1, WINDOW, below=upto))).all()
            items = [ReadyItem(job_id, r.id, r.idx, job.timeout, job.priority, job.researcher_id) for r in window]
            return upto, job.n_tasks, items

        return await self._retry(work)

    async def windows_due(self) -> list[Any]:
        """Running jobs not yet made ready to their end, with how many of the tasks made ready are
        still open (``open``): the feeder's look at every such job (server/jobs/feeder.py)."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(*_WINDOW_COLUMNS).where(
                        jobs.c.state == JobState.RUNNING.value, jobs.c.materialised < jobs.c.n_tasks
                    )
                )
            ).all()
            out = []
            for job in rows:
                n_open = (
                    await conn.execute(
                        sa.select(sa.func.count()).where(
                            tasks.c.job_id == job.id,
                            tasks.c.state == TaskState.OPEN.value,
                            tasks.c.idx < job.materialised,
                        )
                    )
                ).scalar_one()
                out.append((job.id, job.materialised, job.n_tasks, n_open))
        return out

    async def open_counts(self) -> dict[int, int]:
        """Per running job, its open tasks made ready (below ``materialised``): what the safety net
        (``Dispatcher.restore_strays``) compares with the job's live leases before reading them all."""
        query = (
            sa.select(tasks.c.job_id, sa.func.count())
            .select_from(tasks.join(jobs, jobs.c.id == tasks.c.job_id))
            .where(
                jobs.c.state == JobState.RUNNING.value,
                tasks.c.state == TaskState.OPEN.value,
                tasks.c.idx < jobs.c.materialised,
            )
            .group_by(tasks.c.job_id)
        )
        async with self.engine.connect() as conn:
            return {job: n for job, n in (await conn.execute(query)).all()}

    async def window_of(self, job_id: int) -> tuple[str, int, int] | None:
        """(state, materialised, n_tasks) of a job; None if there is no such job."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(*_WINDOW_COLUMNS).where(jobs.c.id == job_id))).first()
        return None if row is None else (row.state, row.materialised, row.n_tasks)

    async def still_open(self, task_ids: list[int]) -> set[int]:
        """Which of these tasks are not final yet."""
        out: set[int] = set()
        async with self.engine.connect() as conn:
            for start in range(0, len(task_ids), INSERT_CHUNK):
                chunk = task_ids[start : start + INSERT_CHUNK]
                query = sa.select(tasks.c.id).where(tasks.c.id.in_(chunk), tasks.c.state == TaskState.OPEN.value)
                out.update((await conn.execute(query)).scalars())
        return out

    async def resumable(self, volunteer: str, attempt_ids: list[str]) -> list[tuple[str, ReadyItem]]:
        """This volunteer's abandoned attempts (its socket closed) whose tasks are still to do."""
        if not attempt_ids:
            return []
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(attempts.c.id, tasks.c.id.label("task"), tasks.c.job_id, tasks.c.idx)
                    .join(tasks, tasks.c.id == attempts.c.task_id)
                    .where(
                        attempts.c.id.in_(attempt_ids),
                        attempts.c.volunteer == volunteer,
                        attempts.c.outcome == AttemptOutcome.ABANDONED.value,
                        tasks.c.state == TaskState.OPEN.value,
                    )
                )
            ).all()
        out = []
        for r in rows:
            info = await self.job_info(r.job_id)
            if info is not None and info.state == JobState.RUNNING.value:
                out.append((r.id, ReadyItem(r.job_id, r.task, r.idx, info.timeout, info.priority)))
        return out

    async def task_inputs(self, task_ids: list[int]) -> dict[int, Any]:
        """Decrypted inputs of list-input tasks (other kinds have no stored input); the calls made
        together share one query."""
        return await self._input_reads.load(dict.fromkeys(task_ids))

    async def _read_inputs(self, wanted: dict[int, None]) -> dict[int, Any]:
        task_ids = list(wanted)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(_INPUTS, {"ids": task_ids})).all()
        return {r.id: self.box.open_json(r.input_ct, f"job:{r.job_id}:input:{r.idx}") for r in rows}

    async def retry_failed(self, researcher_id: int, job_id: int) -> int:
        """Failed tasks become queued again with fresh attempts and no error (the job's errors and
        error groups list what fails from now on); the job runs again."""

        async def work(conn: AsyncConnection) -> int:
            row = await _owned_job(conn, researcher_id, job_id)
            if row.state == JobState.CANCELLED.value:
                raise Conflict("a cancelled job cannot be retried")
            result = await conn.execute(
                tasks.update()
                .where(tasks.c.job_id == job_id, tasks.c.state == TaskState.FAILED.value)
                .values(
                    state=TaskState.OPEN.value,
                    attempts=0,
                    replicas=0,
                    accepted=None,
                    finished_at=None,
                    error_ct=None,
                    output_ct=None,
                )
            )
            if result.rowcount:
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(n_failed=jobs.c.n_failed - result.rowcount, state=JobState.RUNNING.value, finished_at=None)
                )
            return result.rowcount

        n = await self._retry(work)
        self.forget_job(job_id)
        return n

    # ----------------------------------------------------------------------------- exports
    async def finished_runs(self, job_id: int, start: int = 0, limit: int = 100_000) -> tuple[list[list[int]], int]:
        """Indices ``>= start`` of the finished (done or failed) tasks, as half-open runs ``[a, b)``.

        Looks at no more than ``limit`` finished tasks; the second value is where to go on from
        (the end of the job when everything after ``start`` was seen). Lets a client fetch each
        result once, by range, instead of every row on every change.
        """
        query = finished_query(job_id, start, limit)
        async with self.engine.connect() as conn:
            indices = (await conn.execute(query)).scalars().all()
        runs: list[list[int]] = []
        for idx in indices:
            if runs and runs[-1][1] == idx:
                runs[-1][1] = idx + 1
            else:
                runs.append([idx, idx + 1])
        following = runs[-1][1] if len(indices) == limit else -1
        return runs, following

    async def iter_tasks(self, job_id: int, only_errors: bool = False) -> AsyncIterator[dict]:
        """The tasks of a job in input order, decrypted, fetched in pages (constant memory). A
        results download goes through ``server.store.download`` instead (JSON left as text)."""
        info = await self.job_info(job_id)
        window = await self.window_of(job_id)
        if info is None or window is None:
            raise NotFound(f"no job {job_id}")
        last = -1
        while True:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(page_query(job_id, last, PAGE, only_errors))).all()
            if not rows:
                if info.inputs_kind == "range" and not only_errors:  # indices not made ready yet
                    for index in range(last + 1, window[2]):
                        yield _unmaterialised(info, index, window[0])
                return
            parts = await live.partials_of(self, job_id, [r.idx for r in rows])
            for row in rows:
                yield self._task_dict(job_id, info, row, parts.get(row.idx, []))
            last = rows[-1].idx

    def _task_dict(self, job_id: int, info: JobInfo, r: Any, partials: list) -> dict:
        """One task of a download, decrypted (the hot loop: no call for a column that is NULL)."""
        box = self.box
        aad = f"task:{r.id}"
        return {
            "index": r.idx,
            "input": (
                box.open_json(r.input_ct, f"job:{job_id}:input:{r.idx}")
                if r.input_ct is not None
                else info.input_at(r.idx)
            ),
            "state": r.state,
            "result": box.open_json(r.result_ct, aad + ":result") if r.result_ct is not None else None,
            "error": (box.open_text(r.error_ct, aad + ":error") or None) if r.error_ct is not None else None,
            "output": box.open_text(r.output_ct, aad + ":output") if r.output_ct is not None else "",
            "attempts": r.attempts,
            "replicas": r.replicas,
            "accepted": r.accepted,
            "partials": partials,
        }

    async def _retry(self, work: Any, attempts: int = 5) -> Any:
        """Run ``work(conn)`` in a transaction; again if it was a deadlock victim or its connection died
        (a restarted database: SQLAlchemy then drops the stale pooled connections)."""

        async def in_transaction() -> Any:
            async with self.engine.begin() as conn:
                return await work(conn)

        return await self._retry_call(in_transaction, attempts)

    async def _retry_call(self, call: Any, attempts: int = 5) -> Any:
        """Await ``call()`` (which runs its own transaction); again on the errors ``_retry`` names."""
        for attempt in range(attempts):
            try:
                return await call()
            except OperationalError as exc:
                code = getattr(exc.orig, "args", [None])[0]
                # deadlock, lock wait timeout, server gone away, connection lost
                again = code in (1213, 1205, 2006, 2013) or exc.connection_invalidated
                if not again or attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        return None


_WINDOW_COLUMNS = (
    jobs.c.id,
    jobs.c.state,
    jobs.c.inputs_kind,
    jobs.c.materialised,
    jobs.c.n_tasks,
    jobs.c.timeout,
    jobs.c.priority,
    jobs.c.researcher_id,
)

_JOB_COLUMNS = (
    jobs.c.id,
    jobs.c.name,
    jobs.c.state,
    jobs.c.inputs_kind,
    jobs.c.n_tasks,
    jobs.c.materialised,
    jobs.c.n_done,
    jobs.c.n_failed,
    jobs.c.timeout,
    jobs.c.max_attempts,
    jobs.c.priority,
    jobs.c.requirements,
    jobs.c.replication,
    jobs.c.quorum,
    jobs.c.max_replicas,
    jobs.c.tolerance,
    jobs.c.n_validated,
    jobs.c.n_pending,
    jobs.c.n_disagreements,
    jobs.c.n_results,
    jobs.c.parent_job_id,
    jobs.c.code_hash,
    jobs.c.created_at,
    jobs.c.started_at,
    jobs.c.finished_at,
    jobs.c.description,
)


PAGE = 2000  # rows per page of ``iter_tasks`` (a job's errors, the inputs of a ``results_of`` job)


def _walk(query: sa.Select, index: str) -> sa.Select:
    """On MySQL/MariaDB, read ``query`` as a range on ``index``: for a job that is most of the table,
    MariaDB otherwise picks `ref` on job_id alone and reads every row of the job from its first one
    up to the page (ANALYZE does not change that), so a download of 1M rows read 100M index entries."""
    hint = f"FORCE INDEX ({index})"
    return query.with_hint(tasks, hint, "mysql").with_hint(tasks, hint, "mariadb")


def finished_query(job_id: int, start: int, limit: int) -> sa.Select:
    """Indices ``>= start`` of a job's finished tasks, in order (``Storage.finished_runs``)."""
    return _walk(
        sa.select(tasks.c.idx)
        .where(
            tasks.c.job_id == job_id,
            tasks.c.idx >= start,
            tasks.c.state.in_([TaskState.DONE.value, TaskState.FAILED.value]),
        )
        .order_by(tasks.c.idx)
        .limit(limit),
        "uq_tasks_job_idx",
    )


def queued_page_query(job_id: int, after: int, limit: int, below: int | None = None) -> sa.Select:
    """A page of a job's open tasks in input order, of indices below ``below`` when given (what the
    ready queue is filled from): a range on ``ix_tasks_job_state_idx`` (job_id, state, idx), so each
    page reads its own rows only; on (job_id, state) alone every page read and sorted all the open
    tasks left (the 1M-task submit)."""
    query = _walk(
        sa.select(tasks.c.id, tasks.c.idx)
        .where(tasks.c.job_id == job_id, tasks.c.state == TaskState.OPEN.value, tasks.c.idx > after)
        .order_by(tasks.c.idx)
        .limit(limit),
        "ix_tasks_job_state_idx",
    )
    return query if below is None else query.where(tasks.c.idx < below)


def page_query(job_id: int, after: int, limit: int, only_errors: bool = False) -> sa.Select:
    """One page of a job's tasks in input order: index range ``idx > after`` on ``uq_tasks_job_idx``
    (job_id, idx), so a page deep in a 1M-task job reads ``limit`` rows, not the job's rows up to it
    (``tests/test_download.py`` checks the plan with EXPLAIN)."""
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
            tasks.c.replicas,
            tasks.c.accepted,
        )
        .where(tasks.c.job_id == job_id, tasks.c.idx > after)
        .order_by(tasks.c.idx)
        .limit(limit)
    )
    query = _walk(query, "uq_tasks_job_idx")
    return query.where(tasks.c.error_ct.is_not(None)) if only_errors else query


def _unmaterialised(info: JobInfo, index: int, job_state: str) -> dict:
    """A download's row for an index of a range job that hand-out has not reached: it has no task
    row yet, so it is "open" (or "cancelled", when its job was), with its input and nothing else."""
    state = TaskState.CANCELLED.value if job_state == JobState.CANCELLED.value else TaskState.OPEN.value
    return {
        "index": index,
        "input": info.input_at(index),
        "state": state,
        "result": None,
        "error": None,
        "output": "",
        "attempts": 0,
        "replicas": 0,
        "accepted": None,
        "partials": [],
    }


def _verification(row: Any) -> Verification:
    """A job row's verification settings (replication 0 is stored for adaptive)."""
    replication = ADAPTIVE if row.replication == 0 else row.replication
    tolerance = json.loads(row.tolerance) if row.tolerance else None
    return Verification.of(replication, row.quorum, row.max_replicas, tolerance)


def _job_dict(row: Any) -> dict:
    cancelled = row.n_tasks - row.n_done - row.n_failed if row.state == JobState.CANCELLED.value else 0
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "state": row.state,
        "inputs_kind": row.inputs_kind,
        "n_tasks": row.n_tasks,
        "materialised": row.materialised,
        "handed_out": row.n_done + row.n_failed,  # the dispatcher adds the leased ones
        "counts": {
            "queued": row.n_tasks - row.n_done - row.n_failed - cancelled,
            "running": 0,
            "leased": 0,
            "done": row.n_done,
            "failed": row.n_failed,
            "cancelled": cancelled,
        },
        "timeout": row.timeout,
        "max_attempts": row.max_attempts,
        "priority": row.priority,
        "requirements": json.loads(row.requirements),
        "replication": ADAPTIVE if row.replication == 0 else row.replication,
        "quorum": row.quorum,
        "max_replicas": row.max_replicas,
        "tolerance": json.loads(row.tolerance) if row.tolerance else None,
        "validation": {
            "validated": row.n_validated,
            "pending_validation": row.n_pending,
            "disagreements": row.n_disagreements,
            "replicas": row.n_results,
            "replicas_per_task": round(row.n_results / finished, 3) if (finished := row.n_done + row.n_failed) else 0.0,
        },
        "parent_job_id": row.parent_job_id,
        "code_hash": row.code_hash,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
    }


def throughput(job: dict, recent: int, now: float) -> float:
    """Tasks per second, one definition everywhere: while the job runs, the tasks finished over the
    last THROUGHPUT_WINDOW seconds (or since its first task started, if that is more recent); once it
    has ended, all its finished tasks over the time from the first start to the last finish."""
    started = job.get("started_at")
    if job["state"] != JobState.RUNNING.value:
        finished = job["counts"]["done"] + job["counts"]["failed"]
        if not started or not job.get("finished_at") or not finished:
            return 0.0
        return round(finished / max(job["finished_at"] - started, 1e-3), 3)
    window = min(THROUGHPUT_WINDOW, now - started) if started else THROUGHPUT_WINDOW
    return round(recent / max(window, 1.0), 3)


async def _recent_counts(conn: AsyncConnection, job_ids: list[int]) -> dict[int, int]:
    """Tasks finished per job in the last THROUGHPUT_WINDOW seconds (uses ix_tasks_job_finished)."""
    if not job_ids:
        return {}
    rows = await conn.execute(
        sa.select(tasks.c.job_id, sa.func.count())
        .where(tasks.c.job_id.in_(job_ids), tasks.c.finished_at > _now() - THROUGHPUT_WINDOW)
        .group_by(tasks.c.job_id)
    )
    return {job_id: n for job_id, n in rows.all()}


async def _owned_job(conn: AsyncConnection, researcher_id: int, job_id: int) -> Any:
    """The caller's job row, locked (``SELECT ... FOR UPDATE``) until the transaction ends;
    ``NotFound`` if not theirs. Callers retry on deadlock (``_retry``): the recorder locks tasks
    before jobs, the other way round."""
    row = (
        await conn.execute(
            sa.select(jobs.c.state).where(jobs.c.id == job_id, jobs.c.researcher_id == researcher_id).with_for_update()
        )
    ).first()
    if row is None:
        raise NotFound(f"no job {job_id}")
    return row


def _chunks(items: Iterable[int], size: int) -> Iterable[list[int]]:
    chunk: list[int] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

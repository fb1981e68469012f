"""The dispatcher: intake queues, leasing, outcome recording, lease reaping and rebuilds.

Handlers stay thin: they validate cheaply and call one method here. Submissions and outcomes go
through in-process intake queues: submissions are verified and saved one job at a time (a job's
tasks inserted in chunks), outcomes are committed in batches, one transaction per batch. A caller
awaits its future, so nothing is acknowledged before it is committed.

Every background loop (the two intake consumers, the lease reaper, the bus relay, the events
listener) runs under ``supervise.Supervisor``: a failing loop is logged and restarted with backoff,
and ``Dispatcher.loops`` holds each loop's state for ``/api/health`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from typing import Any

from server.config import Config
from server.jobs.supervise import Supervisor
from server.protocol import AttemptOutcome, Cancel, Outcome, TaskSpec
from server.queue import Bus, Lease, Queue
from server.spec import InvalidJob, JobSpec, verify_code
from server.store import pipelines
from server.store.storage import Recorded, Storage

logger = logging.getLogger(__name__)
P_MAX_RESUME = 64  # attempts a reconnecting volunteer may ask to keep
STORED_INPUTS = frozenset({"list", "after"})  # range and none inputs are computed from the index


@dataclasses.dataclass(eq=False)
class Conn:
    """One connected volunteer socket on this instance and the attempts it holds."""

    volunteer: str
    send: Any  # async callable(message dataclass)
    held: dict[str, int] = dataclasses.field(default_factory=dict)  # attempt -> job
    capabilities: dict = dataclasses.field(default_factory=dict)
    throttle: dict = dataclasses.field(default_factory=dict)
    connected_at: float = dataclasses.field(default_factory=time.time)


class Dispatcher:
    def __init__(self, config: Config, storage: Storage, queue: Queue, bus: Bus) -> None:
        self.config = config
        self.storage = storage
        self.queue = queue
        self.bus = bus
        self.conns: set[Conn] = set()
        self._submissions: asyncio.Queue = asyncio.Queue()
        self._outcomes: asyncio.Queue = asyncio.Queue()
        self._passes: set[asyncio.Task] = set()  # reaper passes under way (see _run_reaper)
        self.supervisor = self._supervise()
        self.loops = self.supervisor.loops  # name -> LoopState: /api/health and /metrics read these

    # ------------------------------------------------------------------------ background
    async def run(self) -> None:
        """All background loops, each under the supervisor (restarted with backoff if it fails);
        cancelled at shutdown, when callers still waiting on the intake queues are told so."""
        try:
            await self.supervisor.run()
        finally:
            if self._passes:  # let a reaper pass end before the engine is disposed
                await asyncio.wait(self._passes, timeout=5.0)
            for intake in (self._submissions, self._outcomes):
                while not intake.empty():
                    _settle(intake.get_nowait()[-1], exc=ConnectionError("the server is shutting down"))

    def _supervise(self) -> Supervisor:
        supervisor = Supervisor()
        supervisor.add("submissions", self._run_submissions)
        supervisor.add("outcomes", self._run_outcomes)
        supervisor.add("reaper", self._run_reaper)
        supervisor.add("bus", self._run_bus)
        supervisor.add("events", self._run_events)
        return supervisor

    async def rebuild_if_needed(self) -> int:
        """Refill the ready queue from the database after a start on an empty (or flushed) Redis."""
        if not await self.queue.needs_rebuild():
            return 0
        n = await self._push_ready()
        await self.queue.rebuilt()
        logger.info("ready queue rebuilt from the database: %d tasks", n)
        return n

    async def _push_ready(self, job_ids: list[int] | None = None) -> int:
        """Make the waiting tasks of these jobs (all jobs: None) ready; returns how many were added."""
        n = 0
        # aclosing: a cancelled caller (shutdown) hands the generator's connection back at once,
        # not when the garbage collector finds it after the engine is gone.
        async with contextlib.aclosing(self.storage.ready_items(job_ids)) as chunks:
            async for chunk in chunks:
                n += await self.queue.push(chunk)
        return n

    async def _run_reaper(self) -> None:
        """Rebuild the ready queue when Redis lost it, feed pipeline stages, requeue expired leases."""
        ticks = 0
        while True:
            ticks += 1
            # Shielded: a shutdown lets the pass finish (run() waits for it) rather than cut a query
            # in half, which leaves the SQLite driver a connection it never manages to close.
            one_pass = asyncio.ensure_future(self._reap(sweep=ticks % 2 == 0))
            self._passes.add(one_pass)
            one_pass.add_done_callback(self._pass_ended)
            await asyncio.shield(one_pass)
            self.loops["reaper"].ok()
            await asyncio.sleep(self.config.reaper_interval)

    def _pass_ended(self, one_pass: asyncio.Task) -> None:
        """A reaper pass ended. Its error, if any, is raised in the reaper loop that awaited it;
        retrieved here too, for a pass that outlived its loop (shutdown), so asyncio does not warn."""
        self._passes.discard(one_pass)
        if not one_pass.cancelled():
            one_pass.exception()

    async def _reap(self, sweep: bool) -> None:
        """One pass of the reaper."""
        await self.rebuild_if_needed()
        if sweep:  # pipeline stages: feed anything a race left behind
            await self._apply(await pipelines.sweep(self.storage))
        expired = await self.queue.expire(time.time())
        if expired:
            for conn in self.conns:
                for lease in expired:
                    conn.held.pop(lease.attempt, None)
            await self._apply(await self.storage.record_lost(expired, AttemptOutcome.EXPIRED))

    async def _run_bus(self) -> None:
        """Relay events from other instances (a Redis pub/sub subscription)."""
        await self.bus.run(alive=self.loops["bus"].ok)

    async def _run_events(self) -> None:
        async for event in self.bus.listen():
            if event.get("type") == "cancel":
                await self._cancel_local(int(event["job"]))
            self.loops["events"].ok()

    # ----------------------------------------------------------------------- submissions
    async def submit(self, researcher_id: int, spec: JobSpec) -> int:
        future = asyncio.get_running_loop().create_future()
        await self._submissions.put((researcher_id, spec, future))
        return await future

    async def _run_submissions(self) -> None:
        """Verify and save submissions one at a time (each job's tasks are inserted in chunks)."""
        while True:
            researcher_id, spec, future = await self._submissions.get()
            try:
                _settle(future, result=await self._save_submission(researcher_id, spec))
            except InvalidJob as exc:
                _settle(future, exc=exc)
            except Exception as exc:
                logger.exception("job submission")
                _settle(future, exc=exc)
            finally:  # cancelled half way (shutdown): the caller must not wait forever
                _settle(future, exc=ConnectionError("the server stopped while saving this job; list your jobs"))
            self.loops["submissions"].ok()

    async def _save_submission(self, researcher_id: int, spec: JobSpec) -> int:
        await asyncio.get_running_loop().run_in_executor(None, verify_code, spec.code)
        if spec.results_of is not None:
            await self._resolve_results_of(researcher_id, spec, spec.results_of)
        job_id = await asyncio.shield(self.storage.create_job(researcher_id, spec, self.config.max_input_bytes))
        await self._push_ready([job_id])
        await self.publish_job(job_id, researcher_id)
        return job_id

    async def _resolve_results_of(self, researcher_id: int, spec: JobSpec, upstream_id: int) -> None:
        """``{"results_of": A}``: A's results (its done tasks, in order) become the inputs."""
        upstream = await self.storage.get_job(researcher_id, upstream_id)
        if upstream["state"] not in ("done", "failed"):
            raise InvalidJob(
                f'job {spec.results_of} has not finished; use {{"after": {spec.results_of}}} '
                "to start on its results as they complete",
                field="inputs",
            )
        spec.inputs = [row["result"] async for row in self.storage.iter_tasks(upstream_id) if row["state"] == "done"]
        if not spec.inputs:
            raise InvalidJob(f"job {spec.results_of} has no results", field="inputs")
        if len(spec.inputs) > self.config.max_tasks_per_job:
            raise InvalidJob(f"at most {self.config.max_tasks_per_job} tasks per job", field="inputs")

    # -------------------------------------------------------------------------- leasing
    async def lease(self, conn: Conn, n: int) -> list[TaskSpec]:
        attempts = [secrets.token_hex(8) for _ in range(n)]
        leases = await self.queue.lease(conn.volunteer, attempts, time.time())
        if not leases:
            return []
        for lease in leases:
            conn.held[lease.attempt] = lease.job
        infos = {job: await self.storage.job_info(job) for job in {le.job for le in leases}}
        stored = [le.task for le in leases if (info := infos[le.job]) is not None and info.inputs_kind in STORED_INPUTS]
        inputs = await self.storage.task_inputs(stored)  # range and none inputs are computed, not read
        specs = []
        for lease in leases:
            info = infos[lease.job]
            if info is None:
                continue
            value = inputs[lease.task] if lease.task in inputs else info.input_at(lease.index)
            specs.append(
                TaskSpec(
                    attempt=lease.attempt,
                    task=lease.task,
                    job=lease.job,
                    index=lease.index,
                    input=value,
                    code_hash=info.code_hash,
                    timeout=lease.timeout,
                    deadline=lease.deadline,
                    requirements=info.requirements,
                )
            )
        return specs

    async def resume(self, conn: Conn, attempts: list[str]) -> int:
        """A volunteer reconnected still holding these attempts (a refresh, a dropped network):
        give them back to it if nobody else has taken the tasks meanwhile, so no work is repeated."""
        attempts = [a for a in attempts[:P_MAX_RESUME] if isinstance(a, str) and len(a) <= 32]
        now = time.time()
        for attempt, lease in (await self.queue.live(attempts)).items():
            if lease.volunteer == conn.volunteer:  # the old socket's close was not handled yet
                conn.held[attempt] = lease.job
        for attempt, item in await self.storage.resumable(conn.volunteer, [a for a in attempts if a not in conn.held]):
            claimed = await self.queue.claim(conn.volunteer, attempt, item, now)
            if claimed is not None:
                conn.held[attempt] = claimed.job
        await self.queue.extend(list(conn.held), now)
        return len(conn.held)

    async def heartbeat(self, conn: Conn, attempts: list[str]) -> int:
        mine = [a for a in attempts if a in conn.held]
        return await self.queue.extend(mine, time.time())

    async def abandon(self, conn: Conn) -> None:
        """The socket closed: its leases go back to the ready queue at once."""
        self.conns.discard(conn)
        held, conn.held = list(conn.held), {}
        leases = await self.queue.requeue(held)
        if leases:
            await asyncio.shield(self.storage.record_lost(leases, AttemptOutcome.ABANDONED))

    # -------------------------------------------------------------------------- outcomes
    async def report(self, conn: Conn, outcomes: list[Outcome]) -> Recorded:
        """Queue outcomes for the batch writer; returns once they are committed."""
        for outcome in outcomes:
            validate_received_result(outcome, self.config.max_result_bytes)
        future = asyncio.get_running_loop().create_future()
        await self._outcomes.put((conn.volunteer, outcomes, future))
        rec = await future
        for attempt in rec.acked + rec.ignored:
            conn.held.pop(attempt, None)
        return rec

    async def _run_outcomes(self) -> None:
        """Commit outcomes in batches of up to ``intake_batch``, one transaction per batch."""
        while True:
            batch = [await self._outcomes.get()]
            while not self._outcomes.empty() and sum(len(b[1]) for b in batch) < self.config.intake_batch:
                batch.append(self._outcomes.get_nowait())
            try:
                await self._record_batch(batch)
            finally:  # cancelled half way (shutdown): nobody waits forever, the volunteers send again
                for _, _, future in batch:
                    _settle(future, exc=ConnectionError("the server stopped before committing these results"))
            self.loops["outcomes"].ok()

    async def _record_batch(self, batch: list[tuple[str, list[Outcome], asyncio.Future]]) -> None:
        items = [(volunteer, o) for volunteer, outcomes, _ in batch for o in outcomes]
        try:
            live = await self.queue.live([o.attempt for _, o in items])
            rec = await asyncio.shield(self.storage.record(items, live))
        except Exception as exc:  # nothing committed: the volunteers are told to send again
            logger.exception("recording outcomes")
            for _, _, future in batch:
                _settle(future, exc=exc)
            return
        try:
            await self._apply(rec)
        except Exception:  # committed: acknowledge anyway; the reaper tidies leases left behind
            logger.exception("after recording outcomes")
        for _, outcomes, future in batch:
            mine = {o.attempt for o in outcomes}
            _settle(
                future,
                result=Recorded(
                    acked=[a for a in rec.acked if a in mine],
                    ignored=[a for a in rec.ignored if a in mine and a not in rec.acked],
                ),
            )

    async def _apply(self, rec: Recorded) -> None:
        """After a commit: end or requeue leases, drop failed tasks, tell researchers."""
        await self.queue.release(rec.release)
        await self.queue.requeue(rec.requeue)
        await self.queue.drop(rec.drop)
        await self.queue.push(rec.push)
        for job_id in rec.jobs:
            info = await self.storage.job_info(job_id)
            if info is not None:
                await self.publish_job(job_id, info.researcher_id)

    async def publish_job(self, job_id: int, researcher_id: int) -> None:
        await self.bus.publish({"type": "job", "job": job_id, "researcher": researcher_id})

    # ---------------------------------------------------------------------------- cancel
    async def cancel(self, researcher_id: int, job_id: int) -> bool:
        changed = await self.storage.cancel_job(researcher_id, job_id)
        if changed:
            await self.queue.cancel_job(job_id)
            await self.bus.publish({"type": "cancel", "job": job_id})
            await self.publish_job(job_id, researcher_id)
            for downstream in await pipelines.downstream_of(self.storage, job_id):
                await self.cancel(researcher_id, downstream)  # a pipeline stage cannot outlive its source
        return changed

    async def _cancel_local(self, job_id: int) -> None:
        """Tell this instance's volunteers to stop the job's attempts, and end those leases."""
        for conn in list(self.conns):
            attempts = [a for a, j in conn.held.items() if j == job_id]
            if not attempts:
                continue
            for a in attempts:
                conn.held.pop(a, None)
            await self.queue.release(attempts)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn.send(Cancel(attempts=attempts, job=job_id))

    async def retry_failed(self, researcher_id: int, job_id: int) -> int:
        n = await self.storage.retry_failed(researcher_id, job_id)
        if n:
            await self._push_ready([job_id])
            await self.publish_job(job_id, researcher_id)
        return n

    async def job_status(self, researcher_id: int | None, job_id: int) -> dict:
        job = await self.storage.get_job(researcher_id, job_id)
        await self._add_running([job])
        return job

    async def _add_running(self, jobs: list[dict]) -> None:
        running = await self.queue.running([j["id"] for j in jobs if j["state"] == "running"])
        for job in jobs:
            n = min(running.get(job["id"], 0), job["counts"]["queued"])
            job["counts"]["running"] = n
            job["counts"]["queued"] -= n
            job["volunteers"] = n  # live leases: an upper bound on volunteers working on it

    async def list_jobs(self, researcher_id: int) -> list[dict]:
        jobs = await self.storage.list_jobs(researcher_id)
        await self._add_running(jobs)
        return jobs


def validate_received_result(outcome: Outcome, limit: int) -> None:
    """Check a result a volunteer sent: one that is not strict JSON, or too large, becomes the
    attempt's error. Not a runner (nothing runs here): the volunteer's runner (workers/runner.py)
    makes the same checks before sending, in the same words; this guards against one that did not."""
    if outcome.error is not None:
        outcome.result = None
        return
    try:
        size = len(json.dumps(outcome.result, allow_nan=False, separators=(",", ":")))
    except ValueError as exc:
        outcome.result, outcome.error = None, f"ValueError: the result of main() is not JSON-serialisable: {exc}"
        return
    if size > limit:
        outcome.result = None
        outcome.error = f"ValueError: the result of main() is {size} bytes of JSON; the limit is {limit}"


def _settle(future: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


__all__ = ["Conn", "Dispatcher", "Lease"]

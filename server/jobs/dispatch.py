"""The dispatcher: intake queues, leasing, outcome recording, lease reaping and rebuilds.

Handlers stay thin: they validate cheaply and call one method here. Submissions and outcomes go
through in-process intake queues: submissions are verified and saved one job at a time (a job's
tasks inserted in chunks), outcomes are committed in batches, one transaction per batch. A caller
awaits its future, so nothing is acknowledged before it is committed.

Chunked hand-out (protocol 5): a lease may take the job's next tasks with it as one chunk, sized by
``server.jobs.chunks``; each task keeps its own attempt and lease, and the chunk is one slot of the
connection's lease cap (``VolunteerSocket.slots``).

Every background loop (the two intake consumers, the lease reaper, the bus relay, the events
listener) runs under ``supervise.Supervisor``: a failing loop is logged and restarted with backoff,
and ``Dispatcher.loops`` holds each loop's state for ``/api/health`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import itertools
import json
import logging
import math
import secrets
import time
import weakref
from typing import Any

from server.config import Config
from server.jobs.chunks import ChunkSizer
from server.jobs.feeder import Feeder
from server.jobs.metrics import Metrics
from server.jobs.outage import DatabaseAway, DbHealth, is_outage
from server.jobs.supervise import Supervisor
from server.jobs.validator import Validator
from server.jobs.waiting import Waiters
from server.protocol import (
    CHUNKS_SINCE,
    IDLE_GROWS_SINCE,
    MAX_CHUNK_INPUT_BYTES,
    MAX_CHUNK_TASKS,
    MAX_MESSAGE_BYTES,
    MAX_READY_JOBS,
    MAX_WORKERS,
    PROTOCOL_VERSION,
    WAITING_SINCE,
    AttemptOutcome,
    Cancel,
    Capabilities,
    ChunkItem,
    Outcome,
    ProtocolError,
    Tasks,
    TaskSpec,
    ThrottleState,
    Update,
    Wait,
)
from server.queue import Bus, Lease, Queue, ReadyItem
from server.queue.base import DEFAULT_SHARE
from server.spec import InvalidJob, JobSpec, verify_code
from server.store import live, pipelines
from server.store.models import Limits, QuotaExceeded
from server.store.storage import Recorded, Storage

logger = logging.getLogger(__name__)
P_MAX_RESUME = 64  # attempts a reconnecting volunteer may ask to keep
STORED_INPUTS = frozenset({"list", "after"})  # range and none inputs are computed from the index
# Lease caps (Trust I). A connection holds at most its declared workers + prefetch, and a
# volunteer id at most HARD_CAP over all its connections on this instance.
HARD_CAP = MAX_WORKERS  # 64
DEFAULT_PREFETCH_PER_WORKER = 1  # when a volunteer declares no prefetch
MAX_PREFETCH_PER_WORKER = 8  # the browser's supervisor holds at most this many per worker
RECENT_ATTEMPTS = 256  # attempts a connection lost (expired, cancelled) whose late results are not strays
HANDED_JOBS = 2 * MAX_READY_JOBS  # jobs a connection was handed tasks of, remembered for job affinity
STRAY_LIMIT = 128  # results for attempts a connection never held, beyond its acknowledged ones: closed
STRIKES_KEPT = 100_000  # volunteers whose expired leases are remembered (oldest forgotten first)
STRIKE_HALF_LIFE = 600.0  # seconds: expiries are forgiven with time (slowly), and by delivered results
COMPUTING_TTL_BEATS = 3  # a connection's "computing now" report lasts this many heartbeat periods
# A connection's "computing now" is written at once when it last was longer ago than this, else
# within this long, with every other connection's due then, in one Redis pipeline: a busy volunteer's
# counts change with every lease and result, which cost one pipeline each (15 % of a server's CPU
# handing out single tiny tasks).
COMPUTING_EVERY = 0.25
# Chunked hand-out (protocol 5): a chunk is one slot of the lease cap, and a connection holds at most
# this many tasks in all, chunks included; one `tasks` message's chunks carry at most this much input.
MAX_HELD_TASKS = 4 * MAX_CHUNK_TASKS
MESSAGE_INPUT_BUDGET = MAX_MESSAGE_BYTES // 2


class Misbehaving(Exception):
    """A volunteer that must be disconnected; ``str(exc)`` says why."""


@dataclasses.dataclass(eq=False, slots=True)
class VolunteerSocket:
    """One connected volunteer socket on this instance and the attempts it holds.

    ``volunteer`` is the verified public id (``server.jobs.identity``), ``address`` the client's
    address (``server.web.addresses.client_address``). Slots, and a lock only: 10,000 of these
    per process should cost little beside the socket itself.
    """

    volunteer: str
    send: Any  # async callable(message dataclass)
    held: dict[str, int] = dataclasses.field(default_factory=dict)  # attempt -> job
    capabilities: Capabilities = dataclasses.field(default_factory=Capabilities)
    throttle: ThrottleState | None = None
    address: str = "?"  # the client's address (behind a trusted proxy: from X-Forwarded-For)
    network: str = dataclasses.field(init=False, default="")  # network_of(address), once
    connected_at: float = dataclasses.field(default_factory=time.time)
    recent: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)  # attempt -> job
    strays: int = 0  # results for attempts never held here, less those acknowledged
    updated: dict[str, float] = dataclasses.field(default_factory=dict)  # attempt -> last update (monotonic)
    # Honest counts: the held attempts a worker computes now (protocol 3's ``running``; None: not told),
    # and what was last published to the queue for the job view's running/volunteers.
    running: set[str] | None = None
    reported: dict[int, int] = dataclasses.field(default_factory=dict)
    reported_at: float = 0.0
    closed: bool = False  # its socket closed (``abandon``): it computes nothing any more
    key: str = dataclasses.field(default_factory=lambda: secrets.token_hex(8))
    protocol: int = PROTOCOL_VERSION  # the hello's version: below WAITING_SINCE, an idle ready is not held
    wants: int = 0  # the n of its held ready (protocol 4); 0: none held
    wants_jobs: list[int] = dataclasses.field(default_factory=list)  # the jobs that ready named as loaded
    beat: float = 0.0  # its last `wait`'s idle interval before jitter; 0: not idle (server.jobs.waiting)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)  # one lease at a time for it

    # Jobs this connection was handed tasks of, the latest last: the only ones its `ready` may name as
    # loaded (job affinity), so that no volunteer can pick which job's tasks it gets.
    handed: dict[int, None] = dataclasses.field(default_factory=dict)
    # Chunks (protocol 5): first attempt -> every attempt of the chunk; attempt -> its chunk's first;
    # first attempt -> how many of the chunk it still holds. ``extra``: held attempts beyond one per
    # chunk, so that a chunk counts as one slot of the lease cap (``slots``).
    chunks: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    chunk_of: dict[str, str] = dataclasses.field(default_factory=dict)
    chunk_left: dict[str, int] = dataclasses.field(default_factory=dict)
    extra: int = 0
    delivered: int = 0  # results of this connection committed (acknowledged): its chunks hold at most 1 + this

    def hold_chunk(self, attempts: list[str], job: int) -> None:
        """This connection holds these attempts of ``job`` as one chunk (the first names it)."""
        head = attempts[0]
        for attempt in attempts:
            self.hold(attempt, job)
            self.chunk_of[attempt] = head
        self.chunks[head] = list(attempts)
        self.chunk_left[head] = len(attempts)
        self.extra += len(attempts) - 1

    def unhold(self, attempt: str) -> int | None:
        """This connection no longer holds ``attempt``; returns its job (None if it did not hold it)."""
        job = self.held.pop(attempt, None)
        head = self.chunk_of.pop(attempt, None) if job is not None else None
        if head is not None:
            left = self.chunk_left[head]
            if left >= 2:
                self.extra -= 1
                self.chunk_left[head] = left - 1
            else:
                del self.chunk_left[head], self.chunks[head]
        return job

    def unhold_all(self) -> list[str]:
        """It holds nothing any more (its socket closed); returns what it held."""
        held = list(self.held)
        self.held, self.chunks, self.chunk_of, self.chunk_left, self.extra = {}, {}, {}, {}, 0
        return held

    def slots(self) -> int:
        """Slots of the lease cap in use: a task held alone is one, a chunk is one."""
        return len(self.held) - self.extra

    def expand(self, attempts: list[str]) -> list[str]:
        """Attempts it holds among ``attempts``, a chunk's first standing for every task of its chunk."""
        out = []
        for attempt in attempts:
            members = self.chunks.get(attempt)
            if members is not None:
                out += [a for a in members if a in self.held]
            elif attempt in self.held:
                out.append(attempt)
        return out

    def hold(self, attempt: str, job: int) -> None:
        """This connection holds ``attempt`` of ``job`` now (leased or resumed)."""
        self.held[attempt] = job
        self.handed.pop(job, None)
        self.handed[job] = None
        if len(self.handed) > HANDED_JOBS:
            del self.handed[next(iter(self.handed))]

    def loaded(self, jobs: list[int]) -> list[int]:
        """The jobs a `ready` names as loaded that this connection was handed (the others are ignored)."""
        return [job for job in jobs if job in self.handed]

    def declared_cap(self) -> int:
        """What the declared workers and prefetch justify: at most HARD_CAP, at least 1."""
        state = self.throttle
        workers = state.workers if state is not None and state.workers is not None else self.capabilities.workers
        prefetch = state.prefetch if state is not None and state.prefetch is not None else self.capabilities.prefetch
        workers = max(1, workers)
        if prefetch is None:
            prefetch = workers * DEFAULT_PREFETCH_PER_WORKER
        return max(1, min(HARD_CAP, workers + min(prefetch, workers * MAX_PREFETCH_PER_WORKER)))

    def computing(self) -> dict[int, int]:
        """Tasks per job this connection's workers compute now. A protocol-1 volunteer does not say
        which held attempts run: as many as its declared workers are taken as running, the rest as
        prefetched."""
        if self.running is None:
            workers = self.throttle.workers if self.throttle is not None and self.throttle.workers else None
            running = list(self.held)[: max(1, workers or self.capabilities.workers)]
        else:
            running = [a for a in self.running if a in self.held]
        return dict(collections.Counter(self.held[a] for a in running))

    def lose(self, attempts: list[str]) -> None:
        """These leases ended without a result (expired, cancelled): remember them a while, so
        that a late result for one is neither a stray nor credited beyond its job's timeout."""
        for attempt in attempts:
            job = self.unhold(attempt)
            if job is not None:
                self.recent[attempt] = job
        while len(self.recent) > RECENT_ATTEMPTS:
            self.recent.popitem(last=False)

    def job_of(self, attempt: str) -> int | None:
        """The job of an attempt this connection holds or recently lost; None if never held here."""
        job = self.held.get(attempt)
        return self.recent.get(attempt) if job is None else job

    def __post_init__(self) -> None:
        self.network = network_of(self.address)


class Dispatcher:
    def __init__(self, config: Config, storage: Storage, queue: Queue, bus: Bus) -> None:
        self.config = config
        self.storage = storage
        self.queue = queue
        self.bus = bus
        self.sockets: set[VolunteerSocket] = set()
        self._networks: collections.Counter[str] = collections.Counter()  # the sockets' networks ("": loopback)
        self._by_volunteer: dict[str, set[VolunteerSocket]] = {}
        # abandon() of closed sockets -> their volunteer; awaited at shutdown and by that volunteer's resume
        self._leaving: dict[asyncio.Task, str] = {}
        # volunteer -> (expiries owed, when): see lease_room
        self.strikes: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._submissions: asyncio.Queue = asyncio.Queue()
        self._submit_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._outcomes: asyncio.Queue = asyncio.Queue()
        self.db_health = DbHealth()
        self.metrics = Metrics()
        self.validator = Validator(storage, config)
        self.chunk_sizer = ChunkSizer(config.chunk_target)
        self.waiters = Waiters(self._fill, lambda: self.queue.ready_count())
        self._seen: dict[str, dict] = {}  # volunteers who said hello, not yet written (see seen())
        self._seen_wake = asyncio.Event()
        self._computing_due: dict[VolunteerSocket, None] = {}  # reports to write within COMPUTING_EVERY
        self._computing_wake = asyncio.Event()
        self._passes: set[asyncio.Task] = set()  # reaper passes under way (see _run_reaper)
        self.feeder = Feeder(
            storage,
            self.make_ready,
            lambda jobs: self.queue.running(jobs),
            config.reaper_interval,
            wanted=lambda: self.waiters.wanted,
        )
        self.supervisor = self._supervise()
        self.loops = self.supervisor.loops  # name -> LoopState: /api/health and /metrics read these
        self.metrics.attach(self)

    # ------------------------------------------------------------------------ background
    async def run(self) -> None:
        """All background loops, each under the supervisor (restarted with backoff if it fails);
        cancelled at shutdown, when callers still waiting on the intake queues are told so."""
        try:
            await self.supervisor.run()
        finally:
            passes = self._passes | self.feeder.passes
            if passes:  # let a reaper's or feeder's pass end before the engine is disposed
                await asyncio.wait(passes, timeout=5.0)
            for intake in (self._submissions, self._outcomes):
                while not intake.empty():
                    _settle(intake.get_nowait()[-1], exc=ConnectionError("the server is shutting down"))

    def _supervise(self) -> Supervisor:
        supervisor = Supervisor()
        supervisor.add("submissions", self._run_submissions)
        supervisor.add("outcomes", self._run_outcomes)
        supervisor.add("reaper", self._run_reaper)
        supervisor.add("feeder", self._run_feeder)
        supervisor.add("bus", self._run_bus)
        supervisor.add("events", self._run_events)
        supervisor.add("wake", self._run_wake)
        supervisor.add("seen", self._run_seen)
        supervisor.add("computing", self._run_computing)
        return supervisor

    async def rebuild_if_needed(self) -> int:
        """Refill the ready queue from the database after a start on an empty (or flushed) Redis."""
        if not await self.queue.needs_rebuild():
            return 0
        await self.queue.set_shares(await self.storage.shares())
        n = await self._push_ready()
        await self.queue.rebuilt()
        logger.info("ready queue rebuilt from the database: %d tasks", n)
        return n

    async def _push_ready(self, job_ids: list[int] | None = None, pushed: list[ReadyItem] | None = None) -> int:
        """Make the waiting tasks of these jobs (all jobs: None) ready; returns how many were added.
        ``pushed``, when given, collects the items offered (a push skips those ready or leased)."""
        n = 0
        # aclosing: a cancelled caller (shutdown) hands the generator's connection back at once,
        # not when the garbage collector finds it after the engine is gone.
        async with contextlib.aclosing(self.storage.ready_items(job_ids)) as chunks:
            async for chunk in chunks:
                # first who already reported on these tasks, so no replica goes back to them
                await self.queue.exclude(await self.storage.reporters([item.task for item in chunk]))
                n += await self.make_ready(chunk)  # waiting volunteers start on the first chunk
                if pushed is not None:
                    pushed.extend(chunk)
        return n

    async def make_ready(self, items: list[ReadyItem]) -> int:
        """Tasks are ready to hand out (a submission, a retry, the feeder's next window, a rebuild):
        the one place new work reaches the ready queue; it wakes waiting volunteers. Returns how many
        were added."""
        added = await self.queue.push(items)
        await self.work_arrived(added)
        return added

    async def _run_feeder(self) -> None:
        """Make jobs' tasks ready window by window as hand-out reaches them (``server.jobs.feeder``)."""
        await self.feeder.run(alive=self.loops["feeder"].ok)

    async def restore_strays(self) -> int:
        """The safety net under every queue write: when nothing is ready, each open task of a running
        job should be leased. One that is neither (a queue write lost to a crash, a flush of part of
        Redis, a bug) would keep its job from ever ending, so it is pushed again; a push skips tasks
        already ready or leased. A task that became final between the read and the push (its lease
        released meanwhile) is taken out again. Returns how many strays went back.

        Only jobs with more open tasks than live leases are read: one whose every open task is leased
        has no stray (10,000 volunteers on a 20,000-task job: reading and pushing them all again every
        sweep was a tenth of the server's time). Replicas of one task can hide a stray of another
        from this count, for as long as they are out, no longer."""
        if await self.queue.ready_count():
            return 0
        open_counts = await self.storage.open_counts()
        leased = await self.queue.running(list(open_counts))
        suspects = [job for job, n in open_counts.items() if n > leased.get(job, 0)]
        if not suspects:
            return 0
        offered: list[ReadyItem] = []
        added = await self._push_ready(suspects, pushed=offered)
        if not added:
            return 0
        still = await self.storage.still_open([item.task for item in offered])
        await self.queue.drop([item for item in offered if item.task not in still])
        # each added one was missing, but for the rare lease released between the read and the push
        strays = added
        if strays:
            logger.warning("%d open task(s) were neither ready nor leased: back in the ready queue", strays)
            self.metrics.strays.inc(strays)
        return strays

    async def _run_reaper(self) -> None:
        """Rebuild the ready queue when Redis lost it, feed pipeline stages, requeue expired leases.
        During a database outage it only probes: no expiries while they cannot be recorded
        (volunteers hold their results meanwhile)."""
        ticks = 0
        while True:
            if self.db_health.down_since is None or await self.db_health.probe(self.storage.engine):
                ticks += 1
                # Shielded: a shutdown lets the pass finish (run() waits for it) rather than cut a query
                # in half, which leaves the SQLite driver a connection it never manages to close.
                one_pass = asyncio.ensure_future(self._reap(sweep=ticks % 2 == 0))
                self._passes.add(one_pass)
                one_pass.add_done_callback(self._pass_ended)
                try:
                    await asyncio.shield(one_pass)
                except Exception as exc:
                    if not is_outage(exc):
                        raise  # the supervisor logs it and restarts the loop
                    self.db_health.failed(exc)
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
        if sweep:  # pipeline stages, and open tasks the queue lost: whatever a race left behind
            await self._apply(await pipelines.sweep(self.storage))
            await self.restore_strays()
        expired = await self.queue.expire(time.time())
        if not expired:
            return
        attempts = [lease.attempt for lease in expired]
        for sock in self.sockets:
            sock.lose(attempts)
        for lease in expired:
            self._strike(lease.volunteer)
            fields = {"job": lease.job, "task": lease.task, "attempt": lease.attempt, "volunteer": lease.volunteer}
            logger.info("lease expired: task %d goes back to the queue", lease.task, extra=fields)
        # a lease that expired unanswered goes to another volunteer, never back to this one
        await self.queue.exclude([(lease.task, lease.volunteer) for lease in expired])
        rec = await self.storage.record_lost(expired, AttemptOutcome.EXPIRED)
        self.metrics.attempts.labels("expired").inc(len(expired))
        await self._apply(rec)
        # Only now: a waiter woken at once could otherwise finish the task before its expiry is recorded
        await self.work_arrived(len(expired))

    async def _run_bus(self) -> None:
        """Relay events from other instances (a Redis pub/sub subscription)."""
        await self.bus.run(alive=self.loops["bus"].ok)

    async def _run_events(self) -> None:
        async for event in self.bus.listen():
            if event.get("type") == "cancel":
                await self._cancel_local(int(event["job"]))
            elif event.get("type") == "work" and event.get("instance") != self.config.instance:
                self.waiters.work.set()  # another instance made tasks ready: wake ours too
            self.loops["events"].ok()

    def seen(self, volunteer: str, capabilities: dict) -> None:
        """A volunteer said hello: its row (first/last seen, device) is written in the background, many
        in one statement, so that a burst of 10,000 connections never waits on the database."""
        self._seen[volunteer] = capabilities
        self._seen_wake.set()

    async def _run_seen(self) -> None:
        while True:
            await self._seen_wake.wait()
            self._seen_wake.clear()
            while self._seen:
                batch = dict(itertools.islice(self._seen.items(), 500))
                for volunteer in batch:
                    del self._seen[volunteer]
                # shielded like a reaper pass: a shutdown lets the write end (run() waits for it) rather
                # than cut an SQLite query in half, which leaves a connection that never closes
                write = asyncio.ensure_future(self.storage.volunteers_seen(batch))
                self._passes.add(write)
                write.add_done_callback(self._pass_ended)
                try:
                    await asyncio.shield(write)
                except Exception as exc:  # bookkeeping: the next hello writes it again
                    if not is_outage(exc):
                        raise
                    self.db_health.failed(exc)
            self.loops["seen"].ok()

    async def _run_wake(self) -> None:
        await self.waiters.run(alive=self.loops["wake"].ok)

    async def work_arrived(self, n: int) -> None:
        """``n`` tasks became ready (submitted, requeued, fed): wake the waiting volunteers of this
        instance, and tell the others. Publishing is best effort: their sweep finds what it misses."""
        if n <= 0:
            return
        self.waiters.work.set()
        try:
            await self.bus.publish({"type": "work", "instance": self.config.instance, "n": n})
        except Exception:  # noqa: BLE001 - the bus is down: the other instances' sweep catches up
            logger.warning("could not tell the other instances that %d tasks are ready", n, exc_info=True)

    # ----------------------------------------------------------------------- submissions
    async def submit(self, researcher_id: int, spec: JobSpec) -> int:
        future = asyncio.get_running_loop().create_future()
        await self._submissions.put((researcher_id, spec, future))
        return await future

    async def _run_submissions(self) -> None:
        """Each submission in a task of its own: one researcher's huge job does not hold up another's.
        A researcher's own submissions go one at a time (their quota is checked against what is saved)."""
        running: set[asyncio.Task] = set()
        try:
            while True:
                researcher_id, spec, future = await self._submissions.get()
                task = asyncio.create_task(self._submit_one(researcher_id, spec, future))
                running.add(task)
                task.add_done_callback(running.discard)
                self.loops["submissions"].ok()
        finally:
            for task in running:
                task.cancel()

    async def _submit_one(self, researcher_id: int, spec: JobSpec, future: asyncio.Future) -> None:
        lock = self._submit_locks.get(researcher_id)
        if lock is None:
            lock = self._submit_locks[researcher_id] = asyncio.Lock()  # forgotten when no one holds it
        async with lock:
            try:
                job_id = await self._save_submission(researcher_id, spec)
            except (InvalidJob, QuotaExceeded) as exc:
                _settle(future, exc=exc)
            except Exception as exc:
                logger.exception("job submission")
                _settle(future, exc=exc)
            else:
                logger.info("job %d submitted", job_id, extra={"job": job_id})
                _settle(future, result=job_id)
            finally:  # cancelled half way (shutdown): the caller must not wait forever
                _settle(future, exc=ConnectionError("the server stopped while saving this job; list your jobs"))

    async def _check_quotas(self, researcher_id: int, spec: JobSpec) -> None:
        """Refuse a job that would take the researcher past their queued-tasks or stored-bytes quota.
        A researcher's submissions are saved one at a time on this instance, so two cannot both slip under."""
        limits = await self.storage.limits(researcher_id)
        queued, stored = await self.storage.usage(researcher_id)
        max_queued = _default(limits.max_queued_tasks, self.config.researcher_max_queued_tasks)
        if queued + spec.n_tasks > max_queued:
            raise QuotaExceeded(
                f"queued-tasks quota: you have {queued} tasks not yet finished and this job adds {spec.n_tasks}; "
                f"the limit is {max_queued}. Wait for jobs to finish, cancel some, or ask an operator."
            )
        max_stored = _default(limits.max_stored_bytes, self.config.researcher_max_stored_bytes)
        if stored >= max_stored:
            raise QuotaExceeded(
                f"stored-results quota: your jobs keep {stored} bytes of results; the limit is {max_stored}. "
                "Ask an operator to raise it."
            )

    async def set_limits(self, researcher_id: int, values: dict[str, Any]) -> Limits:
        """An operator changed a researcher's share or quotas: stored, and the share given to the queue."""
        limits = await self.storage.set_limits(researcher_id, values)
        if "share" in values:
            await self.queue.set_shares({researcher_id: _default(limits.share, DEFAULT_SHARE)})
        return limits

    async def _save_submission(self, researcher_id: int, spec: JobSpec) -> int:
        await asyncio.get_running_loop().run_in_executor(None, verify_code, spec.code)
        if spec.results_of is not None:
            await self._resolve_results_of(researcher_id, spec, spec.results_of)
        await self._check_quotas(researcher_id, spec)
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

    # ----------------------------------------------------------------- connections, caps
    def connect(self, sock: VolunteerSocket) -> None:
        """A volunteer said hello on this instance."""
        if sock not in self.sockets:
            self._networks[sock.network] += 1
        self.sockets.add(sock)
        self._by_volunteer.setdefault(sock.volunteer, set()).add(sock)

    def _strikes(self, volunteer: str, now: float | None = None) -> float:
        """Expiries this volunteer owes, halving every STRIKE_HALF_LIFE seconds."""
        count, at = self.strikes.get(volunteer, (0.0, 0.0))
        now = time.monotonic() if now is None else now
        return count * 0.5 ** ((now - at) / STRIKE_HALF_LIFE) if count else 0.0

    def _strike(self, volunteer: str, n: float = 1.0) -> None:
        """A lease of this volunteer expired unanswered (n > 0), or it delivered results (n < 0)."""
        now = time.monotonic()
        count = max(0.0, self._strikes(volunteer, now) + n)
        self.strikes.pop(volunteer, None)
        if count >= 0.5:
            self.strikes[volunteer] = (count, now)
        while len(self.strikes) > STRIKES_KEPT:
            self.strikes.popitem(last=False)

    def lease_room(self, sock: VolunteerSocket) -> int:
        """How many more tasks this connection may lease now.

        Its declared cap, divided by one plus the expiries it owes (a volunteer whose leases keep
        expiring gets fewer; none once it owes as many as its cap, until it is forgiven with
        time), less what it holds; and its volunteer id's connections together never above HARD_CAP.
        """
        cap = int(sock.declared_cap() // (1.0 + self._strikes(sock.volunteer)))
        by_id = sum(c.slots() for c in self._by_volunteer.get(sock.volunteer, ()))
        return max(0, min(cap - sock.slots(), HARD_CAP - by_id))

    # ----------------------------------------------------------------- idle volunteers wait
    async def ready(self, sock: VolunteerSocket, n: int, jobs: list[int] | None = None) -> None:
        """Answer a ``ready {n}``: ``tasks`` leased now, or (protocol 4) ``wait``: the ready is held
        and ``tasks`` are pushed when work arrives (``server.jobs.waiting``). A new ready replaces a
        held one; ``n == 0`` withdraws it. Protocol 3 sockets are never held: an empty ``tasks``.
        Answered under the socket's lock, so a push never overtakes the ``wait`` it ends."""
        async with sock.lock:
            self._unwait(sock)
            specs = await self.lease(sock, n, jobs or []) if n > 0 else []
            if specs or n <= 0 or sock.protocol < WAITING_SINCE:
                sock.beat = 0.0 if specs else sock.beat
                await sock.send(Tasks(specs))
                return
            sock.wants, sock.wants_jobs = n, list(jobs or [])
            self.waiters.hold(sock)
            await sock.send(self._wait(sock))

    def _wait(self, sock: VolunteerSocket) -> Wait:
        """The ``wait`` for this socket: its next idle interval, and (protocol 6) the longest, up to
        which it grows the interval itself."""
        longest = self.config.idle_heartbeat
        interval = self.waiters.interval(sock, self.config.heartbeat, longest)
        return Wait(interval, longest if sock.protocol >= IDLE_GROWS_SINCE else 0.0)

    async def idle_heartbeat(self, sock: VolunteerSocket) -> None:
        """A heartbeat with no attempts. A volunteer of protocol 6 grows its interval itself: not
        answered, so a waiting volunteer costs one message a beat, not two (the socket's write is
        most of a message's cost). An older one is told to wait, a little longer each time, until
        its interval is the longest; from there it is not answered either and keeps its interval
        (the pages and volunteer-sims of protocols 4 and 5 do)."""
        async with sock.lock:
            if sock.wants and sock.protocol < IDLE_GROWS_SINCE and sock.beat < self.config.idle_heartbeat:
                await sock.send(self._wait(sock))

    def _unwait(self, sock: VolunteerSocket) -> None:
        sock.wants = 0
        self.waiters.drop(sock)

    async def _fill(self, sock: VolunteerSocket) -> list[TaskSpec] | None:
        """Lease for a waiting socket and push what it got (``Waiters.wake``): None when it no longer
        waits or may not lease now, [] when the queue had nothing for it, else the tasks sent."""
        async with sock.lock:
            if not sock.wants or sock not in self.sockets or self.db_health.down_since is not None:
                return None
            if self.lease_room(sock) <= 0:
                return None
            specs = await self.lease(sock, sock.wants, sock.wants_jobs)
            if not specs:
                return []
            self._unwait(sock)
            sock.beat = 0.0
            with contextlib.suppress(ConnectionError, RuntimeError):  # closed meanwhile: abandon() requeues
                await sock.send(Tasks(specs))
            return specs

    async def refill(self, sock: VolunteerSocket) -> None:
        """Results of a waiting socket were acknowledged: room under its cap may now let it lease."""
        if sock.wants:
            await self._fill(sock)

    # -------------------------------------------------------------------------- leasing
    async def lease(self, sock: VolunteerSocket, n: int, jobs: list[int] | None = None) -> list[TaskSpec]:
        """Lease up to ``n`` tasks for this connection, preferring the tasks of the ``jobs`` its
        workers have loaded (job affinity; only jobs it was handed count)."""
        if self.db_health.down_since is not None:
            return []  # results could not be committed; an empty answer means "ask again later"
        n = min(n, self.lease_room(sock))
        if n <= 0:
            return []
        attempts = attempt_ids(n)
        loaded = sock.loaded(jobs or [])
        network = self._network_rule(sock)  # once per lease call: it looks at every connected socket
        try:
            leases = await self.queue.lease(sock.volunteer, attempts, time.time(), network, loaded)
        except BaseException:
            # The answer was lost (a Redis connection cut mid-call, or this call cancelled), not
            # necessarily the leases: give back whatever these attempt ids took, or those tasks would
            # wait for their deadline with no holder. In a task of its own: it runs even when this
            # one was cancelled, and shutdown waits for it (``drain``).
            self._requeue_lost(sock, attempts)
            raise
        if not leases:
            return []
        for lease in leases:
            sock.hold(lease.attempt, lease.job)
        groups = [[lease] for lease in leases]
        try:
            if sock.protocol >= CHUNKS_SINCE and self.config.chunk_target > 0:
                await self._chunk(sock, groups, network)
            everything = [lease for group in groups for lease in group]
            self.feeder.leased(everything)  # near the end of a job's ready window: the next one is made ready
            specs = await self._specs(sock, groups)
        except Exception as exc:
            everything = [lease for group in groups for lease in group]
            for lease in everything:
                sock.unhold(lease.attempt)
            if not is_outage(exc):
                with contextlib.suppress(Exception):
                    await self.work_arrived(len(await self.queue.requeue([le.attempt for le in everything])))
                raise
            # An outage began after the leases were taken (reading the tasks' jobs, inputs or checkpoints):
            # give every one back and answer "none now". Kept, they would wait for their deadline while
            # the volunteer, never told of them, asked for more: the job could not end before that.
            self.db_health.failed(exc)
            await self.queue.requeue([le.attempt for le in everything])
            logger.info("database away while handing out %d tasks: back in the queue", len(everything))
            return []
        handed = sum(1 + len(spec.more) for spec in specs)
        self.metrics.handed_out.inc(handed)
        if loaded:
            self.metrics.affine.inc(sum(1 + len(spec.more) for spec in specs if spec.job in loaded))
        return specs

    async def _chunk(self, sock: VolunteerSocket, groups: list[list[Lease]], network: str) -> None:
        """Chunked hand-out (protocol 5): each lease becomes the first of a chunk of its job's next
        ready tasks, as many as the job's measured run times ask for (``ChunkSizer``), within
        MAX_CHUNK_TASKS and the connection's MAX_HELD_TASKS, and at most one more than the results the
        connection delivered: a newcomer (or a volunteer that keeps no promises) starts with single tasks,
        so neither a hoarder nor the results adaptive replication must check before trusting a volunteer
        grow by a chunk at once. A chunk takes one slot of the lease cap.
        ``groups`` (one lease each) grow in place, so that a failure half way leaves what was taken."""
        now = time.time()
        for g, (lease,) in enumerate(groups):
            size = min(
                self.chunk_sizer.size(lease.job),
                MAX_CHUNK_TASKS,
                MAX_HELD_TASKS - len(sock.held) + 1,
                1 + sock.delivered,
            )
            more = []
            if size > 1:
                attempts = attempt_ids(size - 1)
                try:
                    more = await self.queue.lease_more(sock.volunteer, lease.job, attempts, now, network, lease.attempt)
                except Exception:  # the answer was lost, maybe not the leases: give back what these ids took
                    with contextlib.suppress(Exception):
                        await self.work_arrived(len(await self.queue.requeue(attempts)))
                    raise
            if more:
                groups[g] = [lease, *more]
                sock.unhold(lease.attempt)
                sock.hold_chunk([le.attempt for le in groups[g]], lease.job)

    async def _specs(self, sock: VolunteerSocket, groups: list[list[Lease]]) -> list[TaskSpec]:
        """What the volunteer is sent for these leases, each group one spec (a chunk when it holds more
        than one): each task's input, code hash and last checkpoint. A chunk whose stored inputs pass
        MAX_CHUNK_INPUT_BYTES (or the message's budget) is cut there, its other tasks requeued."""
        leases = [lease for group in groups for lease in group]
        infos = {job: await self.storage.job_info(job) for job in {le.job for le in leases}}
        stored = [le.task for le in leases if (info := infos[le.job]) is not None and info.inputs_kind in STORED_INPUTS]
        inputs = await self.storage.task_inputs(stored)  # range and none inputs are computed, not read
        owners = {le.task: self._owner(infos[le.job], sock) for le in leases if infos[le.job] is not None}
        restores = await live.restore(self.storage, owners)
        specs, cut = [], []
        budget = MESSAGE_INPUT_BUDGET
        for first, *more in groups:
            info = infos[first.job]
            if info is None:
                continue
            value = inputs[first.task] if first.task in inputs else info.input_at(first.index)
            spec = TaskSpec(
                attempt=first.attempt,
                task=first.task,
                job=first.job,
                index=first.index,
                input=value,
                code_hash=info.code_hash,
                timeout=first.timeout,
                deadline=first.deadline,
                requirements=info.requirements,
                restore=restores.get(first.task),
            )
            specs.append(spec)
            if not more:
                continue
            size = 0
            for i, lease in enumerate(more):
                if lease.task in inputs:
                    value = inputs[lease.task]
                    size += len(json.dumps(value, separators=(",", ":")))
                    if size > min(MAX_CHUNK_INPUT_BYTES, budget):
                        cut += more[i:]
                        break
                else:
                    value = info.input_at(lease.index)
                spec.more.append(ChunkItem(lease.attempt, lease.task, lease.index, value, restores.get(lease.task)))
            budget -= size
        if cut:  # inputs too large to go along: back to the queue, for the next chunks
            for lease in cut:
                sock.unhold(lease.attempt)
            await self.work_arrived(len(await self.queue.requeue([le.attempt for le in cut])))
        return specs

    @staticmethod
    def _owner(info: Any, sock: VolunteerSocket) -> str:
        """The checkpoint lineage this connection's attempt of the job writes and resumes (store/live.py)."""
        return live.owner_of(info.verification.replication != 1, sock.volunteer)

    async def update(self, sock: VolunteerSocket, msg: Update) -> int:
        """A running attempt's checkpoint, progress and partials: stored, and its lease extended.

        Only for an attempt this socket holds, and at most one with a state or progress per attempt
        every half ``checkpoint_every`` (the volunteer sends the latest once every ``checkpoint_every``;
        partials alone may follow at once: a task's end sends those left). Partials are capped per task.
        Returns the partial results kept."""
        job = sock.held.get(msg.attempt)
        if job is None:
            raise ProtocolError(f"update: you hold no attempt {msg.attempt[:32]}")
        if msg.state is not None or msg.progress is not None:  # partials alone: the end of a task
            now = time.monotonic()
            last = sock.updated.get(msg.attempt)
            if last is not None and now - last < self.config.checkpoint_every / 2:
                raise ProtocolError(
                    f"update: at most one every {self.config.checkpoint_every:g} s per task; send the latest then"
                )
            sock.updated[msg.attempt] = now
        if len(sock.updated) > 2 * HARD_CAP:  # forget attempts that ended
            sock.updated = {a: t for a, t in sock.updated.items() if a in sock.held}
        lease = (await self.queue.live([msg.attempt])).get(msg.attempt)
        info = await self.storage.job_info(job)
        if lease is None or info is None:
            return 0  # the lease ended meanwhile (expired, cancelled): nothing to keep
        await self.queue.extend([msg.attempt], time.time())
        owner = self._owner(info, sock)
        kept = await live.save(self.storage, lease.task, job, owner, msg.attempt, msg.state, msg.progress, msg.partials)
        event = {"type": "job", "job": job, "researcher": info.researcher_id}
        await self.bus.publish({**event, "partials": [lease.index]} if kept else event)
        return kept

    def _network_rule(self, sock: VolunteerSocket) -> str:
        """The network tag replicas must avoid for this volunteer, when volunteers of other networks
        are connected (replicas go to distinct networks when they can); "" when they cannot."""
        tag = sock.network
        if not tag or not any(net not in ("", tag) for net in self._networks):  # stops at the first other one
            return ""
        return tag

    async def resume(self, sock: VolunteerSocket, attempts: list[str]) -> int:
        """A volunteer reconnected still holding these attempts (a refresh, a dropped network):
        give them back to it if nobody else has taken the tasks meanwhile, so no work is repeated."""
        attempts = [a for a in attempts[:P_MAX_RESUME] if isinstance(a, str) and len(a) <= 32]
        leaving = [t for t, who in self._leaving.items() if who == sock.volunteer]
        if leaving:  # the old socket's leases are being requeued: let that end, then claim them back
            await asyncio.wait(leaving, timeout=5.0)
        now = time.time()
        for attempt, lease in (await self.queue.live(attempts)).items():
            if lease.volunteer == sock.volunteer:  # the old socket's close was not seen yet
                sock.hold(attempt, lease.job)
                for old in self._by_volunteer.get(sock.volunteer, ()):
                    if old is not sock:  # its close must not requeue what this socket now holds
                        old.unhold(attempt)
        leaving = [t for t, who in self._leaving.items() if who == sock.volunteer]
        if leaving:  # the old socket's close was seen meanwhile: its requeue may take back what was held above
            await asyncio.wait(leaving, timeout=5.0)
            live = await self.queue.live(list(sock.held))
            for attempt in [a for a in sock.held if a not in live]:
                sock.unhold(attempt)  # requeued and recorded abandoned: claimed back below
        for attempt, item in await self.storage.resumable(sock.volunteer, [a for a in attempts if a not in sock.held]):
            claimed = await self.queue.claim(sock.volunteer, attempt, item, now)
            if claimed is not None:
                sock.hold(attempt, claimed.job)
        await self.queue.extend(list(sock.held), now)
        return len(sock.held)

    async def heartbeat(self, sock: VolunteerSocket, attempts: list[str], running: list[str] | None = None) -> int:
        mine = sock.expand(attempts)  # a chunk's first attempt stands for the whole chunk
        extended = await self.queue.extend(mine, time.time())
        await self.report_computing(sock, running)
        return extended

    async def report_computing(self, sock: VolunteerSocket, running: list[str] | None = None) -> None:
        """Publish what this connection computes now (``running`` from its ready or heartbeat, when
        it says), so that every instance's job status counts volunteers and running tasks, not leases.
        Written when it changed (at once after a quiet spell, else within ``COMPUTING_EVERY`` by
        ``_run_computing``), and again each heartbeat period so the report does not expire."""
        if running is not None:
            sock.running = {a for a in running if a in sock.held}
        if not sock.held and not sock.reported:
            return  # nothing to tell, nothing told: an idle volunteer's heartbeats cost no Redis call
        now = time.time()
        if sock.computing() == sock.reported and now - sock.reported_at < self.config.heartbeat:
            self._computing_due.pop(sock, None)  # back to what was written: nothing to write
            return
        if now - sock.reported_at >= COMPUTING_EVERY and sock not in self._computing_due:
            await self._write_computing([sock])  # the first change in a while: at once
            return
        self._computing_due[sock] = None  # written with the others due, within COMPUTING_EVERY
        self._computing_wake.set()

    async def _write_computing(self, socks: list[VolunteerSocket]) -> None:
        """Write these connections' "computing now" in one call (a closed one's: nothing)."""
        now = time.time()
        entries = []
        for sock in socks:
            per_job = {} if sock.closed else sock.computing()
            entries.append((sock.key, sock.volunteer, per_job, [job for job in sock.reported if job not in per_job]))
        await self.queue.computing_many(entries, COMPUTING_TTL_BEATS * self.config.heartbeat)
        for sock, (_, _, per_job, _) in zip(socks, entries, strict=True):
            sock.reported, sock.reported_at = per_job, now
        late = [sock for sock, entry in zip(socks, entries, strict=True) if sock.closed and entry[2]]
        if late:  # closed while this was written: take back what it says they compute
            await self._write_computing(late)

    async def _run_computing(self) -> None:
        failing = False
        while True:
            await self._computing_wake.wait()
            self._computing_wake.clear()
            await asyncio.sleep(COMPUTING_EVERY)
            due = [sock for sock in self._computing_due if not sock.closed]
            self._computing_due.clear()
            try:
                await self._write_computing(due)
            except Exception as exc:  # Redis away: tried again in a while (the reports expire meanwhile)
                if not failing:  # once an outage, not four times a second
                    logger.warning("could not write what %d connections compute: %s", len(due), exc)
                failing = True
                self._computing_due.update(dict.fromkeys(sock for sock in due if not sock.closed))
                self._computing_wake.set()
                continue
            failing = False
            self.loops["computing"].ok()

    def leave(self, sock: VolunteerSocket) -> asyncio.Task:
        """A socket closed: abandon its leases in a task that outlives the socket's handler (even
        one cancelled at shutdown) and that ``drain`` awaits before the queue and database close."""
        return self._outliving(self.abandon(sock), sock.volunteer)

    def _outliving(self, work: Any, volunteer: str) -> asyncio.Task:
        """Run ``work`` (a socket's leases going back) in a task of its own, that ``drain`` awaits."""
        task = asyncio.ensure_future(work)
        self._leaving[task] = volunteer
        task.add_done_callback(lambda t: self._leaving.pop(t, None))
        return task

    def _requeue_lost(self, sock: VolunteerSocket, attempts: list[str]) -> None:
        """Requeue whatever leases these attempt ids took, in a task that outlives the caller."""

        async def requeue() -> None:
            with contextlib.suppress(Exception):
                await self.work_arrived(len(await self.queue.requeue(attempts)))

        self._outliving(requeue(), sock.volunteer)

    async def drain(self) -> None:
        """Shutdown: let the closed sockets' leases be requeued and recorded."""
        if self._leaving:
            await asyncio.wait(set(self._leaving), timeout=5.0)

    async def abandon(self, sock: VolunteerSocket) -> None:
        """The socket closed: its leases go back to the ready queue at once."""
        if sock in self.sockets:
            self.sockets.discard(sock)
            self._networks[sock.network] -= 1
            if self._networks[sock.network] <= 0:
                del self._networks[sock.network]
        self._unwait(sock)
        same = self._by_volunteer.get(sock.volunteer)
        if same is not None:
            same.discard(sock)
            if not same:
                del self._by_volunteer[sock.volunteer]
        async with sock.lock:  # a lease for it under way (its ready being filled) ends first
            held = sock.unhold_all()
        sock.closed = True
        self._computing_due.pop(sock, None)
        # The leases first: what it computed is only a count on the job view, and expires on its own.
        await self._put_back(sock, held, "volunteer %s left holding %d attempts: back in the queue")
        try:
            await self._write_computing([sock])
        except Exception as exc:  # Redis away: the report expires within COMPUTING_TTL_BEATS heartbeats
            logger.warning("could not take back what volunteer %s computed: %s", sock.volunteer, exc)

    async def _put_back(self, sock: VolunteerSocket, attempts: list[str], message: str) -> None:
        """These attempts of ``sock`` end without a result and without charging their tasks: back in
        the ready queue at once, recorded as abandoned, the waiting volunteers woken."""
        leases = await self.queue.requeue(attempts)
        if not leases:
            return
        logger.info(
            message,
            sock.volunteer,
            len(leases),
            extra={"volunteer": sock.volunteer, "attempts": [le.attempt for le in leases]},
        )
        self.metrics.attempts.labels("abandoned").inc(len(leases))
        try:
            await asyncio.shield(self.storage.record_lost(leases, AttemptOutcome.ABANDONED))
        except Exception as exc:  # requeued already; only the attempts' record is missing
            if not is_outage(exc):
                raise
            self.db_health.failed(exc)
        await self.work_arrived(len(leases))  # after the record: see _reap

    # -------------------------------------------------------------------------- outcomes
    async def report(self, sock: VolunteerSocket, outcomes: list[Outcome]) -> Recorded:
        """Queue outcomes for the batch writer; returns once they are committed.

        Raises ``DatabaseAway`` at once during a database outage (the volunteer holds them and
        sends again), and ``Misbehaving`` once the connection has sent too many results for
        attempts it never held (guessing or replaying attempt ids).
        """
        self.db_health.check()
        never_held = set()
        timeouts: dict[int, float] = {}  # job -> its timeout, read once per message
        for outcome in outcomes:
            validate_received_result(outcome, self.config.max_result_bytes)
            job = sock.job_of(outcome.attempt)
            if job is None:
                never_held.add(outcome.attempt)
            elif job not in timeouts:
                info = await self.storage.job_info(job)
                timeouts[job] = 0.0 if info is None else float(info.timeout)
            _clamp_elapsed(outcome, 0.0 if job is None else timeouts[job])
            if job is not None:  # its run time, a claim clamped, sizes the job's chunks (none after a stop)
                self.chunk_sizer.measured(job, outcome.elapsed, outcome.timeout or outcome.lost)
        stopped = _stopped_chunks(sock, outcomes)
        if stopped:
            outcomes = [o for o in outcomes if o.attempt not in stopped]
            await self._give_back(sock, stopped)
        rec = Recorded()
        if outcomes:
            future = asyncio.get_running_loop().create_future()
            await self._outcomes.put((sock, outcomes, future))
            rec = await future
        rec.ignored += stopped  # the volunteer forgets them: they are in the queue again
        for attempt in rec.acked + rec.ignored:
            sock.unhold(attempt)
        sock.delivered += len(rec.acked)
        await self.report_computing(sock)
        if rec.acked and sock.volunteer in self.strikes:
            self._strike(sock.volunteer, -len(rec.acked))
        sock.strays = max(0, sock.strays + len(never_held.intersection(rec.ignored)) - len(rec.acked))
        if sock.strays > STRAY_LIMIT:
            raise Misbehaving("too many results for attempts this connection does not hold")
        return rec

    async def _give_back(self, sock: VolunteerSocket, attempts: list[str]) -> None:
        """A chunk's worker was stopped as a whole (the page's timeout for the chunk) or failed (it
        crashed: ``lost``): which of its tasks did it is unknown, and most ran fine, so none is charged
        an attempt. They go back to the queue at once, recorded as abandoned; the report already sent
        the job back to single tasks (``ChunkSizer.measured``), where the task that hangs or crashes
        its worker is found and charged alone."""
        sock.lose(attempts)  # a late result for one is then neither a stray nor credited
        await self._put_back(sock, attempts, "volunteer %s: a chunk stopped as a whole, %d tasks back in the queue")

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

    async def _record_batch(self, batch: list[tuple[VolunteerSocket, list[Outcome], asyncio.Future]]) -> None:
        items = [(sock.volunteer, o) for sock, outcomes, _ in batch for o in outcomes]
        networks = {sock.volunteer: network_of(sock.address) for sock, _, _ in batch}
        try:
            live = await self.queue.live([o.attempt for _, o in items])
            started = time.perf_counter()
            rec = await asyncio.shield(self.validator.record(items, live))
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            rec.exclude += [(task, networks[who]) for task, who in rec.exclude if networks.get(who)]
        except Exception as exc:  # nothing committed: the volunteers are told to send again
            if is_outage(exc):
                self.db_health.failed(exc)
                exc = DatabaseAway(self.db_health.error)
            else:
                logger.exception("recording outcomes")
            for _, _, future in batch:
                _settle(future, exc=exc)
            return
        self.db_health.ok()
        self._count(items, rec)
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

    def _count(self, items: list[tuple[str, Outcome]], rec: Recorded) -> None:
        ignored = set(rec.ignored) - set(rec.acked)
        for _, o in items:
            kind = "late" if o.attempt in ignored else ("done" if o.error is None else "error")
            self.metrics.attempts.labels("timeout" if o.timeout and kind == "error" else kind).inc()

    async def _apply(self, rec: Recorded) -> None:
        """After a commit: end or requeue leases, drop failed tasks, tell researchers."""
        # Forget the settled tasks' exclusions first: a task decided and then re-opened in one batch
        # keeps the exclusion the re-opening added. Exclude before requeueing: it must not come back.
        await self.queue.forget(rec.settled)
        await self.queue.exclude(rec.exclude)
        await self.queue.release(rec.release)
        requeued = await self.queue.requeue(rec.requeue)
        await self.queue.drop(rec.drop)
        await self.work_arrived(len(requeued))
        await self.make_ready(rec.push)
        for job_id in rec.jobs:
            info = await self.storage.job_info(job_id)
            if info is not None:
                await self.publish_job(job_id, info.researcher_id)

    async def publish_job(self, job_id: int, researcher_id: int) -> None:
        await self.bus.publish({"type": "job", "job": job_id, "researcher": researcher_id})

    # ---------------------------------------------------------------------------- cancel
    async def cancel(self, researcher_id: int, job_id: int) -> bool:
        ready = await self.storage.cancel_job(researcher_id, job_id)
        changed = ready is not None
        if ready is not None:
            logger.info("job %d cancelled", job_id, extra={"job": job_id})
            await self.queue.cancel_job(job_id)
            await self.queue.drop(ready)  # what was made ready is freed; no more windows come
            await self.bus.publish({"type": "cancel", "job": job_id})
            await self.publish_job(job_id, researcher_id)
            for downstream in await pipelines.downstream_of(self.storage, job_id):
                await self.cancel(researcher_id, downstream)  # a pipeline stage cannot outlive its source
        return changed

    async def revoke(self, researcher_id: int) -> int:
        """A researcher was revoked: cancel their unfinished jobs (volunteers are told to drop
        them) and close their events sockets on every instance. Returns the jobs cancelled."""
        cancelled = 0
        for job_id in await self.storage.unfinished_jobs(researcher_id):
            cancelled += await self.cancel(researcher_id, job_id)
        await self.bus.publish({"type": "revoked", "researcher": researcher_id})
        return cancelled

    async def _cancel_local(self, job_id: int) -> None:
        """Tell this instance's volunteers to stop the job's attempts, and end those leases."""
        for sock in list(self.sockets):
            attempts = [a for a, j in sock.held.items() if j == job_id]
            if not attempts:
                continue
            sock.lose(attempts)
            await self.queue.release(attempts)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await sock.send(Cancel(attempts=attempts, job=job_id))

    async def retry_failed(self, researcher_id: int, job_id: int) -> int:
        n = await self.storage.retry_failed(researcher_id, job_id)
        if n:
            await self._push_ready([job_id])
            await self.publish_job(job_id, researcher_id)
        return n

    async def job_status(self, researcher_id: int | None, job_id: int) -> dict:
        """A job's status; ``progress`` lists its running tasks' reported progress (uvm.progress)."""
        job = await self.storage.get_job(researcher_id, job_id)
        await self._add_running([job])
        job["progress"] = await live.progress(self.storage, job_id) if job["state"] == "running" else []
        return job

    async def _add_running(self, jobs: list[dict]) -> None:
        """Honest counts: ``running`` = tasks a worker computes now, ``leased`` = the other live
        leases (prefetched by a volunteer), ``volunteers`` = distinct volunteers computing the job."""
        live = [j["id"] for j in jobs if j["state"] == "running"]
        leases = await self.queue.running(live)
        computing = await self.queue.computing_counts(live)
        for job in jobs:
            held = min(leases.get(job["id"], 0), job["counts"]["queued"])
            volunteers, running = computing.get(job["id"], (0, 0))
            running = min(running, held)
            job["counts"]["running"] = running
            job["counts"]["leased"] = held - running
            job["counts"]["queued"] -= held
            job["handed_out"] += held
            job["volunteers"] = volunteers if running else 0

    async def list_jobs(self, researcher_id: int) -> list[dict]:
        jobs = await self.storage.list_jobs(researcher_id)
        await self._add_running(jobs)
        return jobs


def attempt_ids(n: int) -> list[str]:
    """``n`` new attempt ids (16 hex digits each) from one read of the system's randomness: a wake
    leases for 10,000 volunteers, and a system call per id was a tenth of its time."""
    raw = secrets.token_hex(8 * n)
    return [raw[i : i + 16] for i in range(0, 16 * n, 16)]


def network_of(address: str) -> str:
    """The network replicas of a task should not share: "net:a.b.c.0/24" (IPv4) or the /64 (IPv6).
    Loopback and unknown addresses give "": volunteers there count by their id alone."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return ""
    if ip.is_loopback:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return "net:" + str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _stopped_chunks(sock: VolunteerSocket, outcomes: list[Outcome]) -> list[str]:
    """Attempts of chunks this message reports as stopped as a whole: two or more tasks of one chunk
    held here, every one of them an error that is a timeout or ``lost``. The runner gives a task
    that overran its own timeout alone; when the page stops the chunk's worker, every task gets the
    same timeout, and when the worker crashes, every task is lost. (A task's own exception is
    neither: a chunk whose every task raised is charged, task by task.)"""
    by_chunk: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        head = sock.chunk_of.get(outcome.attempt)
        if head is not None and outcome.attempt in sock.held:
            by_chunk.setdefault(head, []).append(outcome)
    stopped = [
        o.attempt
        for mine in by_chunk.values()
        if len(mine) >= 2 and all((o.timeout or o.lost) and o.error is not None for o in mine)
        for o in mine
    ]
    return list(dict.fromkeys(stopped))


def validate_received_result(outcome: Outcome, limit: int) -> None:
    """Check a result a volunteer sent: one that is not strict JSON, or too large, becomes the
    attempt's error. Not a runner (nothing runs here): the volunteer's runner (workers/runner.py)
    makes the same checks before sending, in the same words; this guards against one that did not."""
    if outcome.error is not None:
        outcome.result = None
        return
    value = outcome.result
    kind = type(value)
    # The common small results pass without being written out: their JSON is bounded by their size.
    if value is None or kind is bool or (kind is int and -(10**300) < value < 10**300 and limit >= 310):
        return
    if kind is float and math.isfinite(value) and limit >= 32:
        return
    if kind is str and 12 * len(value) + 2 <= limit:  # at most 12 a character (an escaped surrogate pair)
        return
    try:
        size = len(json.dumps(value, allow_nan=False, separators=(",", ":")))
    except ValueError as exc:
        outcome.result, outcome.error = None, f"ValueError: the result of main() is not JSON-serialisable: {exc}"
        return
    if size > limit:
        outcome.result = None
        outcome.error = f"ValueError: the result of main() is {size} bytes of JSON; the limit is {limit}"


def _clamp_elapsed(outcome: Outcome, top: float) -> None:
    """The reported run time is a claim: within [0, the job's timeout] (``top``), and 0 for an attempt
    this connection never held (it earns no credit)."""
    elapsed = outcome.elapsed if outcome.elapsed == outcome.elapsed else 0.0  # NaN
    outcome.elapsed = min(max(0.0, float(elapsed)), top)


def _default(value: Any, default: Any) -> Any:
    """An operator's setting, or the server's default when they set none."""
    return default if value is None else value


def _settle(future: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


__all__ = ["VolunteerSocket", "Dispatcher", "Lease", "Misbehaving"]

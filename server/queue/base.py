"""The ready queue's contract: the values it holds, the ``Queue`` and ``Bus`` base classes.

``tests/test_queue_contract.py`` runs one suite against every implementation (``memory``, ``redis``).
Every state change is atomic: a Lua script in Redis, a method with no ``await`` in-process.
Nothing here is the system of record; after a Redis flush ``rebuild`` refills it from the database.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

PRIORITY_SHIFT = 2**40
DEFAULT_SHARE = 1.0  # a researcher's weight in fair share unless an operator set another
MAX_SKIPPED = 256  # excluded tasks one lease call looks past before it gives up (bounds its cost)
# Heartbeats move a lease's deadline to now + timeout + grace, but never past
# lease start + LEASE_SPAN * timeout + grace: one timeout for the task to wait behind the one
# running before it on the volunteer's worker (prefetch), one to run. A socket that heartbeats
# forever without answering loses its leases all the same.
LEASE_SPAN = 2
# Job affinity may lease a task of a job the volunteer has loaded from a researcher whose pass is up
# to this much above the lowest (in tasks at share 1): no researcher gets ahead of its fair share by
# more than this (plus one task), however long the run, and volunteers seldom have to switch jobs.
# 0 = affinity only among the tasks of the researcher whose turn it is. UVM_AFFINITY_SLACK sets it;
# the README's "Job affinity" weighs switches against the deviation from fair share.
AFFINITY_SLACK = 8.0
MAX_AFFINITY_JOBS = 16  # loaded jobs one lease call considers (the protocol's MAX_READY_JOBS)


def lease_limit(now: float, timeout: float, grace: float) -> float:
    """The latest deadline a lease started at ``now`` may reach (the Lua scripts compute the same)."""
    return now + LEASE_SPAN * timeout + grace


def checked_shares(shares: dict[int, float]) -> dict[int, float]:
    """Shares as floats; a share that is not a number > 0 (NaN, 0, negative) is refused."""
    for researcher, share in shares.items():
        if not (isinstance(share, int | float) and share > 0 and share != float("inf")):
            raise ValueError(f"researcher {researcher}: a share must be a number > 0, not {share!r}")
    return {int(r): float(v) for r, v in shares.items()}


def priority_band(score: int | float) -> int:
    """The priority part of a ready task's score (lower: handed out first; see ``ReadyItem.score``)."""
    return int(score // PRIORITY_SHIFT)


@dataclasses.dataclass(frozen=True)
class ReadyItem:
    job: int
    task: int
    index: int
    timeout: float
    priority: int = 0
    # The job's researcher: hand-out is fair between researchers first (``Queue.set_share``). 0 when
    # the caller does not know: the queue then files the task under the owner it recorded for the job.
    researcher: int = 0

    @property
    def member(self) -> str:
        return f"{self.job}:{self.task}:{self.index}:{self.timeout:g}"

    @property
    def score(self) -> int:
        return -self.priority * PRIORITY_SHIFT + self.task


@dataclasses.dataclass(frozen=True)
class Lease:
    attempt: str
    job: int
    task: int
    index: int
    timeout: float
    volunteer: str
    deadline: float = 0.0

    @classmethod
    def parse(cls, attempt: str, value: str, deadline: float = 0.0) -> Lease:
        """From a lease entry, ``score|member|volunteer|instance``."""
        _score, member, volunteer, _instance = value.split("|", 3)
        return cls.of(attempt, member, volunteer, deadline)

    @classmethod
    def of(cls, attempt: str, member: str, volunteer: str, deadline: float = 0.0) -> Lease:
        """From a ready member (``job:task:index:timeout``) and its volunteer."""
        job, task, index, timeout = member.split(":")
        return cls(attempt, int(job), int(task), int(index), float(timeout), volunteer, deadline)


class Queue(abc.ABC):
    """What dispatch needs: push ready tasks, lease them atomically, extend, release, requeue.

    Every method but ``close`` is abstract: a backend that misses one cannot be instantiated.

    Fair share (stride scheduling): each researcher with ready tasks has a "pass"; a lease takes the
    next task of the researcher with the lowest pass and adds ``1 / share`` to it. A researcher who
    becomes active starts at the lowest pass of those active, so a new small job is handed out at
    once, between the tasks of a huge one. Within a researcher: priority first, then age (task id).

    Job affinity: a lease may name the jobs the volunteer has loaded. It then takes a task of one of
    them if its researcher's pass is within ``affinity_slack`` of the lowest and the task is of that
    researcher's highest waiting priority -- the loaded job that got the fewest tasks in this call
    first (a volunteer's workers of different jobs each get their own), then the lowest pass, then
    the order given. Otherwise it leases as above.
    """

    grace: float = 30.0
    affinity_slack: float = AFFINITY_SLACK

    @abc.abstractmethod
    async def push(self, items: Iterable[ReadyItem]) -> int:
        """Make tasks ready unless already ready or leased; returns how many were added."""

    @abc.abstractmethod
    async def lease(
        self, volunteer: str, attempts: list[str], now: float, network: str = "", jobs: Sequence[int] = ()
    ) -> list[Lease]:
        """Lease up to ``len(attempts)`` tasks, naming the attempts with the given ids. Tasks that
        exclude ``volunteer`` (or ``network``, when given) are skipped and stay ready for others.
        ``jobs``: the jobs the volunteer has loaded, preferred within fair share (job affinity);
        the first ``MAX_AFFINITY_JOBS`` count."""

    @abc.abstractmethod
    async def lease_more(
        self, volunteer: str, job: int, attempts: list[str], now: float, network: str = "", head: str = ""
    ) -> list[Lease]:
        """Chunked hand-out: lease up to ``len(attempts)`` further tasks of ``job``, its next ready ones
        in order, to go with the lease ``head`` as one chunk. Exclusions hold as in ``lease``; the
        job's researcher's pass grows by 1/share per task (fair share counts tasks, not chunks).
        The chunk's leases, ``head`` included, may last ``len(attempts) + LEASE_SPAN`` timeouts
        (plus grace): its tasks run one after another. Nothing for a cancelled job."""

    @abc.abstractmethod
    async def set_shares(self, shares: dict[int, float]) -> None:
        """Set researchers' weights in fair share (> 0); the others weigh ``DEFAULT_SHARE``."""

    @abc.abstractmethod
    async def exclude(self, pairs: list[tuple[int, str]]) -> None:
        """Never lease task ``t`` to ``who`` again, for each (t, who): a volunteer id or a network tag.
        Only tasks that have exclusions carry a set, so leasing other tasks costs nothing more."""

    @abc.abstractmethod
    async def forget(self, tasks: list[int]) -> None:
        """Drop the exclusions of tasks that were decided."""

    @abc.abstractmethod
    async def extend(self, attempts: list[str], now: float) -> int:
        """Move the deadlines of live leases to now + timeout + grace, capped at their
        ``lease_limit``; returns how many were live."""

    @abc.abstractmethod
    async def claim(self, volunteer: str, attempt: str, item: ReadyItem, now: float) -> Lease | None:
        """Lease one given task under a given attempt id if it is waiting in the ready queue
        (a volunteer resuming, after a reconnect, a task it still holds); None if it is not."""

    @abc.abstractmethod
    async def live(self, attempts: list[str]) -> dict[str, Lease]:
        """The live leases among ``attempts``."""

    @abc.abstractmethod
    async def release(self, attempts: list[str]) -> list[Lease]:
        """End leases (a result was committed, or the task finished); returns those that were live."""

    @abc.abstractmethod
    async def requeue(self, attempts: list[str]) -> list[Lease]:
        """End leases and make their tasks ready again; returns those that were live."""

    @abc.abstractmethod
    async def expire(self, now: float, limit: int = 1000) -> list[Lease]:
        """Requeue the leases whose deadline passed; returns them (each to exactly one caller)."""

    @abc.abstractmethod
    async def drop(self, items: Iterable[ReadyItem]) -> None:
        """Remove tasks from the ready queue (they failed or finished)."""

    @abc.abstractmethod
    async def cancel_job(self, job: int) -> None:
        """Stop handing out a job's tasks (ready entries are skipped from now on)."""

    @abc.abstractmethod
    async def running(self, jobs: list[int]) -> dict[int, int]:
        """Live leases per job."""

    @abc.abstractmethod
    async def computing(
        self, key: str, volunteer: str, per_job: dict[int, int], gone: Iterable[int], ttl: float
    ) -> None:
        """Connection ``key`` (unique over all instances) of ``volunteer`` computes ``per_job[job]``
        tasks of each job now (workers busy, prefetch not counted), until ``ttl`` seconds from now
        unless told again; for the jobs in ``gone`` it computes nothing any more."""

    async def computing_many(self, entries: list[tuple[str, str, dict[int, int], list[int]]], ttl: float) -> None:
        """``computing`` for many connections: (key, volunteer, per_job, gone) each, in one call."""
        for key, volunteer, per_job, gone in entries:
            await self.computing(key, volunteer, per_job, gone, ttl)

    @abc.abstractmethod
    async def computing_counts(self, jobs: list[int]) -> dict[int, tuple[int, int]]:
        """Per job: (distinct volunteers computing it, tasks being computed), from live reports."""

    @abc.abstractmethod
    async def ready_count(self) -> int:
        """Tasks waiting in the ready queue."""

    @abc.abstractmethod
    async def needs_rebuild(self) -> bool:
        """True when the queue state is missing (a new or flushed Redis) and nobody rebuilds it."""

    @abc.abstractmethod
    async def rebuilt(self) -> None:
        """Mark the queue state as rebuilt from the database."""

    async def close(self) -> None:  # noqa: B027 - optional: only backends with a connection close one
        """Release the backend's connections."""
        return None


def computing_entry(volunteer: str, n: int, expires: float) -> str:
    """One connection's report of what it computes for a job, as stored (both queues)."""
    return f"{expires:.3f}|{n}|{volunteer}"


def summarize_computing(entries: Iterable[str], now: float) -> tuple[int, int]:
    """(distinct volunteers, tasks) over the unexpired reports of one job."""
    volunteers: set[str] = set()
    total = 0
    for entry in entries:
        expires, n, volunteer = entry.split("|", 2)
        if float(expires) >= now and int(n) > 0:
            volunteers.add(volunteer)
            total += int(n)
    return len(volunteers), total


# -------------------------------------------------------------------------------- events bus
class Bus:
    """Events between server instances (job progress, cancellations). Fan-out to local listeners."""

    def __init__(self) -> None:
        self._listeners: set[asyncio.Queue] = set()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run`` to return (redis-py's pub/sub read may swallow a cancellation)."""
        self._stop.set()

    async def publish(self, event: dict) -> None:
        self._deliver(event)

    def _deliver(self, event: dict) -> None:
        for q in list(self._listeners):
            if q.qsize() < 1000:  # a slow listener loses events rather than memory
                q.put_nowait(event)

    async def listen(self) -> AsyncIterator[dict]:
        q: asyncio.Queue = asyncio.Queue()
        self._listeners.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._listeners.discard(q)

    async def run(self, alive: Callable[[], None] | None = None) -> None:
        """Background task: relay events from other instances until ``stop`` (nothing to relay
        in-process). ``alive`` is called whenever the relay is known to work (the supervisor's ``ok``)."""
        await self._stop.wait()

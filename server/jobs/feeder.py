"""The feeder: a job's tasks are made ready in windows as hand-out reaches them.

A range job of a million tasks is saved with its first ``WINDOW`` task rows; a list job with all its
rows (the inputs are the researcher's data) but only its first window in the ready queue. The rest
is made ready window by window (``Storage.materialise``: task rows, then ready-queue entries), so a
submission costs one window whatever the size of the job, and the ready queue (in Redis or in the
server's memory) holds about two windows of a job, or what the waiting volunteers ask for (below).

How much is kept ready ahead of hand-out (``Feeder.ahead``): ``LOW`` tasks, or, when more volunteers
wait than a window would serve, as many as they ask for together (at most ``AHEAD_MOST``). Windows
are then made one after the other without waiting for leases to reach their ends, each pushed as
soon as it is committed: the wake hands out the first while the next is being made, and 10,000
waiters are reached in one pass rather than in ten steps of a window each.

Two ways a job is topped up:
- on lease: a lease of an index within ``ahead()`` of the end of what is ready;
- a periodic look at every job not made ready to its end: one whose ready tasks (open, less those
  leased) fell under ``ahead()``. It catches what leases did not (a restart, a window that failed,
  another server's hand-out) and needs no state of its own.

Several servers: ``jobs.materialised`` advances by compare-and-swap from the value a server saw, so
of several servers that decide on the same value one makes the window and the others find it made.
A window committed whose push failed (Redis away) is pushed again by the loop's next pass; a server
that dies between the commit and the push leaves that window to the reaper's safety net (open tasks
neither ready nor leased are pushed again once nothing is ready: ``Dispatcher.restore_strays``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from server.queue import Lease, ReadyItem
from server.store.storage import AHEAD_MOST, WINDOW, Storage

logger = logging.getLogger(__name__)
LOW = WINDOW  # ready tasks of a job under which its next window is made ready: 1-2 windows stay ready
KNOWN = 10_000  # jobs whose window this server remembers (forgotten all at once past it)


class Feeder:
    """``leased`` is called by dispatch after each lease; ``run`` is a supervised loop."""

    def __init__(
        self,
        storage: Storage,
        make_ready: Callable[[list[ReadyItem]], Awaitable[int]],
        running: Callable[[list[int]], Awaitable[dict[int, int]]],
        interval: float,
        wanted: Callable[[], int] = lambda: 0,
    ) -> None:
        self.storage = storage
        self.make_ready = make_ready  # dispatch's one way of adding ready tasks (wakes waiting volunteers)
        self.running = running  # live leases per job (the queue's)
        self.wanted = wanted  # the tasks this instance's waiting volunteers ask for
        self.windows = 0  # windows made (for the tests)
        self.interval = interval
        self._known: dict[int, tuple[int, int]] = {}  # job -> (materialised, n_tasks), as last seen
        self._due: dict[int, int] = {}  # job -> the highest index leased since the last look
        self._unpushed: dict[int, list[ReadyItem]] = {}  # windows committed, not in the ready queue yet
        self._wake = asyncio.Event()
        self.passes: set[asyncio.Task] = set()  # passes under way: the dispatcher awaits them at shutdown

    def ahead(self) -> int:
        """Ready tasks to keep ahead of hand-out in a job: ``LOW``, or as many as the volunteers
        waiting ask for (at most ``AHEAD_MOST``), so that one wake reaches all of them."""
        return max(LOW, min(AHEAD_MOST, self.wanted()))

    def leased(self, leases: list[Lease]) -> None:
        """Ask for the next window of each job whose lease came near the end of what is ready."""
        low = self.ahead()
        for lease in leases:
            known = self._known.get(lease.job)
            if known is None or (known[0] < known[1] and lease.index >= known[0] - low):
                self._due[lease.job] = max(lease.index, self._due.get(lease.job, -1))
                self._wake.set()

    async def run(self, alive: Callable[[], None]) -> None:
        """Make windows ready: for leases near the end of one at once, for every job once an interval.
        Each pass is shielded: a shutdown lets it end (the dispatcher waits for ``passes``) rather
        than cut a query in half, which leaves the SQLite driver a connection it never closes."""
        loop = asyncio.get_running_loop()
        look_at = loop.time()
        while True:
            looking = loop.time() >= look_at
            one_pass = asyncio.ensure_future(self._pass(looking))
            self.passes.add(one_pass)
            one_pass.add_done_callback(self._pass_ended)
            await asyncio.shield(one_pass)
            if looking:
                look_at = loop.time() + self.interval
            alive()
            self._wake.clear()
            if not self._due:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, look_at - loop.time()))

    async def _pass(self, looking: bool) -> None:
        for job, items in list(self._unpushed.items()):  # the push failed last time (Redis away)
            await self.make_ready(items)
            del self._unpushed[job]
        due, self._due = self._due, {}
        for job, index in due.items():
            await self._after_lease(job, index)
        if looking:
            await self.look()

    def _pass_ended(self, one_pass: asyncio.Task) -> None:
        """Its error is raised in the loop that awaited it; retrieved here too for a pass that
        outlived its loop (shutdown), so asyncio does not warn."""
        self.passes.discard(one_pass)
        if not one_pass.cancelled():
            one_pass.exception()

    async def look(self) -> int:
        """Every job not made ready to its end: the next window for those running low. Returns the
        tasks made ready."""
        jobs = await self.storage.windows_due()
        running = await self.running([job for job, _m, _n, _open in jobs]) if jobs else {}
        made = 0
        for job, materialised, n_tasks, n_open in jobs:
            self._remember(job, materialised, n_tasks)
            made += await self._top_up(job, materialised, n_tasks, n_open - running.get(job, 0))
        return made

    async def _after_lease(self, job: int, index: int) -> None:
        window = await self.storage.window_of(job)
        if window is None:
            return
        state, materialised, n_tasks = window
        self._remember(job, materialised, n_tasks)
        if state == "running":
            await self._top_up(job, materialised, n_tasks, materialised - 1 - index)

    async def _top_up(self, job: int, seen: int, n_tasks: int, ready: int) -> int:
        """Windows after ``seen``, one after the other, until ``ahead()`` tasks of the job are ready
        (``ready`` are now) or it is made ready to its end. Each window is pushed as soon as it is
        made, so the waiters are woken on the first while the next is being made. Returns the tasks
        added."""
        made = 0
        while seen < n_tasks and ready < self.ahead():
            window = await self.feed(job, seen)
            if window is None:
                break
            seen, added = window
            ready += added
            made += added
        return made

    async def feed(self, job: int, seen: int) -> tuple[int, int] | None:
        """Make the window after ``seen`` ready (unless another server did, or the job ended):
        (the new ``materialised``, the tasks added to the ready queue), or None."""
        window = await self.storage.materialise(job, seen)
        if window is None:
            return None
        upto, n_tasks, items = window
        self.windows += 1
        self._remember(job, upto, n_tasks)
        logger.debug("job %d: tasks up to %d made ready", job, upto, extra={"job": job})
        self._unpushed[job] = items  # kept until pushed: the window is committed, no other server makes it
        made = await self.make_ready(items)
        del self._unpushed[job]
        return upto, made

    def _remember(self, job: int, materialised: int, n_tasks: int) -> None:
        if len(self._known) > KNOWN:
            self._known.clear()
        self._known[job] = (materialised, n_tasks)

"""Idle volunteers wait (protocol 4): their ``ready`` is held until work arrives, on any instance.

A ``ready`` that finds nothing to hand out is answered by ``wait`` and kept here, in arrival order.
Work arriving (a submission, a requeue: lease expiry, abandon, retry, a pipeline stage fed) sets
``work``: locally, and on every other instance through the bus (``Dispatcher.work_arrived``). One
loop per instance then wakes its waiters oldest first, in rounds of as many as the ready tasks would
fill (their leases and reads sent together), and stops as soon as the ready queue is empty: as many
volunteers are woken as there is work, never all 10,000 of them for one task (no thundering herd).
Instances race for the work through the same atomic lease. A sweep every ``SWEEP`` seconds catches
what no signal announced (a lost pub/sub message, the database back after an outage, a volunteer's
strikes forgiven with time).

While waiting, a volunteer sends a ``heartbeat`` with no attempts every so often, further apart
each time (``Waiters.interval``). The first interval, in the ``wait`` answering its ready, is
drawn at random over ``[UVM_IDLE_HEARTBEAT / 4, UVM_IDLE_HEARTBEAT]`` (not below ``UVM_HEARTBEAT``):
10,000 volunteers that connected within seconds of each other (a page shared, a server restarted)
then spread their beats over a whole period instead of beating in step, 10 s after connecting, then
20 s, then 40. Each later one doubles the last up to ``UVM_IDLE_HEARTBEAT``: a volunteer of
protocol 6 doubles it itself (its ``wait`` says the longest) and no idle heartbeat of its is
answered; an older one gets a ``wait`` with the doubled interval, less up to a fifth at random,
until it is the longest, then no answer: it keeps that interval (``Dispatcher.idle_heartbeat``).
A volunteer gone silent is still found by the socket's own ping, after ``UVM_IDLE_HEARTBEAT +
UVM_HEARTBEAT`` seconds of silence, as before: no interval given is longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.jobs.dispatch import VolunteerSocket

logger = logging.getLogger(__name__)
SWEEP = 5.0  # seconds between two looks for ready work that no signal announced
BATCH = 1024  # waiters leased for at once in a round of a pass (their calls share round trips)
MISSES = 16  # waiters that got nothing while the queue held work (all excluded), none woken since: stop
JITTER = 0.2  # an idle interval after the first is shortened by up to this fraction at random
FIRST = 0.25  # the first idle interval is drawn from [this fraction of the longest, the longest]


class Waiters:
    """The held readies of this instance, oldest first, and the loop that wakes them.

    ``fill(sock)`` leases for one waiter and pushes what it got: it returns None when the socket
    no longer waits or may not lease now (its cap), [] when the queue had nothing for it, else the
    tasks sent. ``ready_count()`` is the queue's count of ready tasks over all instances.
    """

    def __init__(
        self, fill: Callable[[VolunteerSocket], Awaitable[list | None]], ready_count: Callable[[], Awaitable[int]]
    ) -> None:
        self.held: dict[VolunteerSocket, int] = {}  # oldest first -> the tasks each asked for
        self.wanted = 0  # the tasks the waiters ask for together (the feeder makes that many ready ahead)
        self.work = asyncio.Event()
        self._fill = fill
        self._ready_count = ready_count
        self.woken = 0  # waiters given tasks by a pass (for /metrics and the tests)
        self.tried = 0  # waiters leased for by a pass (woken or not): as many as the work would fill
        self.passes = 0

    def __len__(self) -> int:
        return len(self.held)

    def hold(self, sock: VolunteerSocket) -> None:
        self.drop(sock)
        self.held[sock] = sock.wants
        self.wanted += sock.wants

    def drop(self, sock: VolunteerSocket) -> None:
        self.wanted -= self.held.pop(sock, 0)

    def _to_back(self, sock: VolunteerSocket) -> None:
        """Tried and got nothing while the queue held work: the next pass tries others first."""
        wants = self.held.pop(sock, None)
        if wants is not None:
            self.held[sock] = wants

    @staticmethod
    def interval(sock: VolunteerSocket, base: float, most: float) -> float:
        """The next idle heartbeat interval for this socket: the first at random in
        ``[max(base, most * FIRST), most]``, then doubling up to ``most``, less up to ``JITTER``."""
        if sock.beat <= 0:
            sock.beat = random.uniform(min(most, max(base, most * FIRST)), most)
            return round(sock.beat, 2)
        sock.beat = min(most, sock.beat * 2)
        return round(sock.beat * (1.0 - JITTER * random.random()), 2)

    async def run(self, alive: Callable[[], None]) -> None:
        """Wake waiters whenever work is signalled, and every ``SWEEP`` seconds if the queue holds some."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.work.wait(), SWEEP)
            signalled = self.work.is_set()
            self.work.clear()
            if self.held and (signalled or await self._ready_count() > 0):
                await self.wake()
            alive()

    async def wake(self) -> int:
        """One pass over the waiters, oldest first, until the work runs out; returns how many got tasks.

        In rounds: each takes as many waiters as the ready tasks would fill (by what each asks for, at
        most ``BATCH``) and leases for all of them at once, so that their lease calls, input reads and
        checkpoint reads each go to Redis and the database together (``server.batching``). A waiter
        that got nothing while the queue still held work (every task there excludes it) goes to the
        back; ``MISSES`` of those in a row end the pass."""
        self.passes += 1
        order = list(self.held)
        at, woken, misses = 0, 0, 0
        empty: list[VolunteerSocket] = []  # got nothing in the last round
        while at < len(order) and misses < MISSES:
            ready = await self._ready_count()
            if ready <= 0:
                break  # the work ran out: the others keep waiting
            for sock in empty:  # work is left, yet they got none: excluded from all of it
                misses += 1
                self._to_back(sock)
            batch: list[VolunteerSocket] = []
            while at < len(order) and ready > 0 and len(batch) < BATCH:
                sock = order[at]
                at += 1
                if sock.wants and sock in self.held:
                    batch.append(sock)
                    ready -= sock.wants
            self.tried += len(batch)
            got = await asyncio.gather(*(self._fill(sock) for sock in batch), return_exceptions=True)
            empty = []
            failed = next((specs for specs in got if isinstance(specs, BaseException)), None)
            for sock, specs in zip(batch, got, strict=True):
                if isinstance(specs, BaseException):
                    continue
                if specs:
                    woken += 1
                    misses = 0
                elif specs is not None:
                    empty.append(sock)
            if failed is not None:
                self.woken += woken
                raise failed  # the supervisor logs it and restarts the loop (the others were served)
        self.woken += woken
        return woken

"""Calls that many coroutines make at once, sent together: one round trip for many instead of one each.

Waking 2,000 waiting volunteers leases for each of them (a Lua script in Redis), and each lease then
reads its tasks' inputs and checkpoints. Made one by one, that is 2,000 script calls and 2,000
queries (each a pool checkout, a ping, the query and a rollback): most of a wake's time. A
``Batcher`` lets at most ``flights`` batches be under way at a time; calls made meanwhile wait and
go together in the next. An idle server pays nothing (a lone call goes on the event loop's next
turn); a busy one pays one round trip per batch. Each call gets its own answer or its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
MAX_KEYS = 1000  # keys one keyed fetch asks for at most (the length of an IN list)


class Batcher(Generic[T, R]):
    """``await call(item)`` is ``run([..., item, ...])``'s answer for it.

    ``run`` answers a batch with one result per item, in order; a result that is an exception is
    raised in that item's caller; if ``run`` raises, every caller of the batch gets the error.
    ``take`` picks a batch from the items waiting (the rest wait for the next); all by default.
    A batch starts on the event loop's next turn and takes the calls waiting then, so calls made in
    one turn go together even while nothing is under way.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        flights: int = 2,
        take: Callable[[list[T]], int] | None = None,
    ) -> None:
        self._run = run
        self._flights = flights
        self._take = take or len  # how many of the waiting items (from the first) the next batch takes
        self._running: set[asyncio.Task] = set()  # batches under way (or about to start)
        self._starting: asyncio.Task | None = None  # a batch about to start: it takes the calls waiting then
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self.batches = 0  # batches run (for the tests)

    async def call(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._start()
        return await future

    def _start(self) -> None:
        if self._waiting and self._starting is None and len(self._running) < self._flights:
            task = self._starting = asyncio.ensure_future(self._flight())
            self._running.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        """A batch ended (its errors went to its callers; cancelled, it cancelled them)."""
        self._running.discard(task)
        if self._starting is task:  # cancelled before it began (the loop closing)
            self._starting = None
        if not task.cancelled():
            task.exception()
        self._start()

    async def _flight(self) -> None:
        self._starting = None
        self._waiting = [(item, future) for item, future in self._waiting if not future.done()]  # callers gone
        n = self._take([item for item, _ in self._waiting])
        calls, self._waiting = self._waiting[:n], self._waiting[n:]
        self._start()  # calls left for another batch need not wait for this one
        if not calls:
            return
        self.batches += 1
        try:
            results = await self._run([item for item, _ in calls])
        except asyncio.CancelledError:
            for _, future in calls:
                future.cancel()
            raise
        except Exception as exc:
            results = [exc] * len(calls)
        for (_, future), result in zip(calls, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class Coalescer(Generic[K, V]):
    """Look-ups by key: ``await load({key: arg})`` is ``{key: value}`` for the keys ``fetch`` found.

    ``fetch`` gets the merged ``{key: arg}`` of the calls of a batch. A key that two waiting calls ask
    for with different args goes to separate batches, so every call is answered with what it asked.
    """

    def __init__(self, fetch: Callable[[dict[K, Any]], Awaitable[dict[K, V]]], flights: int = 2) -> None:
        self._fetch = fetch
        self._batcher: Batcher[dict[K, Any], dict[K, V]] = Batcher(self._run, flights, _compatible)

    @property
    def batches(self) -> int:
        return self._batcher.batches

    async def load(self, wanted: dict[K, Any]) -> dict[K, V]:
        return await self._batcher.call(wanted) if wanted else {}

    async def _run(self, calls: list[dict[K, Any]]) -> list[dict[K, V] | BaseException]:
        merged: dict[K, Any] = {}
        for wanted in calls:
            merged.update(wanted)
        found = await self._fetch(merged)
        return [{key: found[key] for key in wanted if key in found} for wanted in calls]


def _compatible(calls: list[dict[Any, Any]]) -> int:
    """How many of the first waiting calls go in one fetch: up to a clash of args, or MAX_KEYS keys."""
    keys: dict[Any, Any] = {}
    for n, wanted in enumerate(calls):
        if n and (len(keys) + len(wanted) > MAX_KEYS or any(k in keys and keys[k] != a for k, a in wanted.items())):
            return n
        keys.update(wanted)
    return len(calls)

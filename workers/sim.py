"""Headless volunteers: the browser's protocol, with tasks run in native CPython.

Tasks run through ``workers/runner.py``, the same code the browser's Pyodide workers run, so tests
with simulated volunteers exercise it. For tests, load tests and benchmarks with TRUSTED jobs only:
the code runs in this process with no sandbox and no timeout enforcement.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import aiohttp

from server import protocol as P
from workers.runner import Runner


class SimVolunteer:
    """One simulated volunteer. ``crash_after``: vanish (no results) after leasing that many."""

    def __init__(self, server: str, prefetch: int = 2, volunteer: str | None = None, crash_after: int | None = None):
        self.url = server.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + "/ws/volunteer"
        self.prefetch = prefetch
        self.volunteer = volunteer or "sim-" + uuid.uuid4().hex[:12]
        self.crash_after = crash_after
        self.done = 0
        self.errors = 0
        self.leased = 0
        self.latencies: list[float] = []  # seconds from `ready` to `tasks` (non-empty)
        self.task_ids: list[int] = []
        self.runner = Runner()  # compiled job code by hash, as in a browser's worker
        self._inbox: dict[str, asyncio.Queue] = {}
        self._closed = asyncio.Event()

    def _q(self, kind: str) -> asyncio.Queue:
        return self._inbox.setdefault(kind, asyncio.Queue())

    async def _reader(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for raw in ws:
                if raw.type == aiohttp.WSMsgType.TEXT:
                    msg = P.decode(raw.data)
                    await self._q(msg.TYPE).put(msg)
        finally:
            self._closed.set()

    async def _recv(self, kind: str) -> Any:
        queue = self._q(kind)
        if not queue.empty():
            return queue.get_nowait()
        get = asyncio.ensure_future(queue.get())
        closed = asyncio.ensure_future(self._closed.wait())
        done, _ = await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if get in done:
            return get.result()
        get.cancel()
        raise ConnectionError("server closed the connection")

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        self._inbox, self._closed = {}, asyncio.Event()
        async with session.ws_connect(self.url, max_msg_size=P.MAX_MESSAGE_BYTES) as ws:
            reader = asyncio.create_task(self._reader(ws))
            try:
                await ws.send_str(P.encode(P.Hello(self.volunteer, {"cores": 1, "workers": 1, "sim": True})))
                await self._recv("welcome")
                await self._loop(ws, stop)
            finally:
                reader.cancel()

    async def _loop(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
        idle = 0.05
        while not stop.is_set():
            sent = time.perf_counter()
            await ws.send_str(P.encode(P.Ready(self.prefetch)))
            batch: P.Tasks = await self._recv("tasks")
            if not batch.tasks:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), idle)
                idle = min(idle * 2, 0.5)
                continue
            idle = 0.05
            self.latencies.append(time.perf_counter() - sent)
            self.leased += len(batch.tasks)
            if self.crash_after is not None and self.leased >= self.crash_after:
                return  # vanish holding the leases: the socket closes with no results
            outcomes = []
            for spec in batch.tasks:
                await self._load(ws, spec)
                ran = self.runner.run(spec.code_hash, spec.input)  # {result, output, error, cpu}
                outcomes.append(P.Outcome(spec.attempt, spec.task, **ran))
            ack = await self._send_results(ws, outcomes)
            self.done += len(ack.attempts)
            self.errors += sum(1 for o in outcomes if o.error is not None)
            self.task_ids += [o.task for o in outcomes if o.attempt in set(ack.attempts) and o.error is None]

    async def _send_results(self, ws: aiohttp.ClientWebSocketResponse, outcomes: list[P.Outcome]) -> P.Ack:
        """Send results until they are acknowledged: the server answers ``error`` when it could
        not commit them (its database was away), and then they must be sent again."""
        for attempt in range(20):
            await ws.send_str(P.encode(P.Results(outcomes)))
            ack_q, err_q = self._q("ack"), self._q("error")
            get_ack, get_err = asyncio.ensure_future(ack_q.get()), asyncio.ensure_future(err_q.get())
            closed = asyncio.ensure_future(self._closed.wait())
            done, pending = await asyncio.wait({get_ack, get_err, closed}, return_when=asyncio.FIRST_COMPLETED)
            for future in pending:
                future.cancel()
            if get_ack in done:
                if get_err in done:
                    err_q.put_nowait(get_err.result())
                return get_ack.result()
            if closed in done and get_err not in done:
                raise ConnectionError("server closed the connection")
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        raise ConnectionError("results not acknowledged")

    async def _load(self, ws: aiohttp.ClientWebSocketResponse, spec: P.TaskSpec) -> None:
        """Ask for a job's code the first time one of its tasks comes (``need_code``), as the page does."""
        if not self.runner.has(spec.code_hash):
            await ws.send_str(P.encode(P.NeedCode(spec.job, spec.code_hash)))
            code: P.Code = await self._recv("code")
            self.runner.load(code.code_hash, code.source, code.job)


async def run_volunteers(
    server: str,
    count: int,
    prefetch: int = 2,
    duration: float | None = None,
    quiet: bool = False,
    stop: asyncio.Event | None = None,
) -> dict:
    """Run ``count`` simulated volunteers until ``stop`` is set or ``duration`` passes."""
    stop = stop or asyncio.Event()
    sims = [SimVolunteer(server, prefetch) for _ in range(count)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        runs = [asyncio.create_task(_forever(sim, session, stop)) for sim in sims]
        if duration is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
            stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
    if not quiet:
        for sim in sims:
            print(f"{sim.volunteer}: {sim.done} done, {sim.errors} errors")
    return {
        "done": sum(s.done for s in sims),
        "errors": sum(s.errors for s in sims),
        "latencies": [x for s in sims for x in s.latencies],
    }


async def _forever(sim: SimVolunteer, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
    """Reconnect with backoff until stopped (server restarts are normal)."""
    delay = 0.2
    while not stop.is_set():
        try:
            await sim.run(session, stop)
            delay = 0.2
        except (aiohttp.ClientError, ConnectionError, OSError):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 3.0)

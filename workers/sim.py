"""Headless volunteers: the browser's protocol, with tasks run in native CPython.

Tasks run through ``workers/runner.py``, the same code the browser's Pyodide workers run, so tests
with simulated volunteers exercise it. For tests, load tests and benchmarks with TRUSTED jobs only:
the code runs in this process with no sandbox and no timeout enforcement. A task runs in a thread:
research code's ``uvm`` calls (progress, checkpoints, partials) go out on the socket as ``update``
messages while it runs, as the browser's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from typing import Any

import aiohttp

from server import protocol as P
from workers.runner import Runner, Stopped, TaskContext

_RUNNER_LOCK = threading.Lock()  # the runner swaps sys.stdout and sys.modules["uvm"]: one task at a time


class SimVolunteer:
    """One simulated volunteer. ``crash_after``: vanish (no results) after leasing that many.
    ``lie_rate``: forge that fraction of its results with random values (a hostile volunteer).

    It declares one worker and ``prefetch - 1`` tasks of prefetch (so the server's lease cap
    allows the ``ready {prefetch}`` it sends), and keeps the signed id from ``welcome`` to
    present in its next ``hello``, as the browser does. ``volunteer`` is the public part of
    that id (what the server stores); ``token`` the signed whole.
    """

    def __init__(
        self,
        server: str,
        prefetch: int = 2,
        volunteer: str | None = None,
        crash_after: int | None = None,
        lie_rate: float = 0.0,
        seed: int | None = None,
        crash_after_checkpoints: int | None = None,
    ):
        self.url = server.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + "/ws/volunteer"
        self.prefetch = prefetch
        self.token = volunteer or ""  # anything unsigned is replaced by a fresh id in `welcome`
        self.volunteer = self.token
        self.crash_after = crash_after
        # vanish (socket closed, task stopped) once this many checkpoints were sent: a closed tab mid-task
        self.crash_after_checkpoints = crash_after_checkpoints
        self.checkpoints = 0  # `update`s sent with a checkpoint
        self.last_state: str | None = None  # the JSON text of the last checkpoint sent
        self.crashed = False
        self.every = P.Welcome.every
        self.lie_rate = lie_rate
        self.lies: set[int] = set()  # tasks it forged a result for
        self._rng = random.Random(seed)
        self.done = 0
        self.errors = 0
        self.leased = 0
        self.unrun = 0  # tasks of the batch in hand not yet run: a test sees when each volunteer holds work
        self.connects = 0  # websocket connections opened (more than one: it was dropped and came back)
        self.holds = 0  # `hold` answers: results kept and sent again later (the server's database was away)
        self.sends: list[float] = []  # when each `results` message was sent (time.monotonic())
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

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        self._inbox, self._closed = {}, asyncio.Event()
        async with session.ws_connect(self.url, max_msg_size=P.MAX_MESSAGE_BYTES) as ws:
            self.connects += 1
            reader = asyncio.create_task(self._reader(ws))
            try:
                capabilities = {"cores": 1, "workers": 1, "prefetch": max(0, self.prefetch - 1), "sim": True}
                await ws.send_str(P.encode(P.Hello(self.token, capabilities)))
                welcome: P.Welcome = await self._first_of("welcome")
                self.token = welcome.volunteer
                self.volunteer = welcome.volunteer.split("-", 1)[0]
                self.every = welcome.every
                await self._loop(ws, stop)
            finally:
                reader.cancel()

    async def _loop(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
        idle = 0.05
        while not stop.is_set():
            sent = time.perf_counter()
            await ws.send_str(P.encode(P.Ready(self.prefetch)))
            tasks = await self._answer_to_ready()
            if not tasks:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), idle)
                idle = min(idle * 2, 0.5)
                continue
            idle = 0.05
            self.latencies.append(time.perf_counter() - sent)
            self.leased += len(tasks)
            if self.crash_after is not None and self.leased >= self.crash_after:
                return  # vanish holding the leases: the socket closes with no results
            outcomes = []
            # One worker: one task of the batch runs at a time, the rest wait (the server counts 1 running).
            held = [spec.attempt for spec in tasks]
            await ws.send_str(P.encode(P.Heartbeat(held, held[:1])))
            self.unrun = len(tasks)
            for spec in tasks:
                if not await self._load(ws, spec):  # refused (the job was cancelled meanwhile): drop the task
                    self.unrun -= 1
                    continue
                outcome = await self._run_task(ws, spec)
                self.unrun -= 1
                if outcome is None:
                    return  # vanished mid-task (crash_after_checkpoints)
                if self.lie_rate and outcome.error is None and self._rng.random() < self.lie_rate:
                    outcome.result = self._rng.random()  # a forged result
                    self.lies.add(spec.task)
                outcomes.append(outcome)
            ack = await self._send_results(ws, outcomes)
            self.done += len(ack.attempts)
            self.errors += sum(1 for o in outcomes if o.error is not None)
            self.task_ids += [o.task for o in outcomes if o.attempt in set(ack.attempts) and o.error is None]

    async def _answer_to_ready(self) -> list[P.TaskSpec]:
        """The tasks that answer a ``ready``; none when the server refused it (``error`` with ref
        "ready"): the page then asks again later, and so does this. Errors about other messages
        (an update, a throttle) are not the answer."""
        while True:
            answer = await self._first_of("tasks", "error")
            if isinstance(answer, P.Tasks):
                return answer.tasks
            if answer.ref == "ready":
                return []

    def _run_locked(self, spec: P.TaskSpec, context: TaskContext) -> P.Outcome:
        with _RUNNER_LOCK:
            ran = self.runner.run(spec.code_hash, spec.input, spec.job, context)  # {result, output, error, elapsed}
        return P.Outcome(spec.attempt, spec.task, **ran)

    async def _run_task(self, ws: aiohttp.ClientWebSocketResponse, spec: P.TaskSpec) -> P.Outcome | None:
        """Run one task in a thread, sending its updates as they come; None if it vanished meanwhile."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        stopped = threading.Event()

        def emit(text: str) -> None:  # in the task's thread
            if stopped.is_set():
                raise Stopped()
            loop.call_soon_threadsafe(updates.put_nowait, text)

        work = loop.run_in_executor(None, self._run_locked, spec, TaskContext(spec.restore, emit, self.every))
        while True:
            get = asyncio.ensure_future(updates.get())
            done, _ = await asyncio.wait({work, get}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                while not updates.empty():  # the partials the task's end flushed
                    await self._send_update(ws, spec, updates.get_nowait())
                break
            await self._send_update(ws, spec, get.result())
            if self.crash_after_checkpoints is not None and self.checkpoints >= self.crash_after_checkpoints:
                self.crashed = True
                stopped.set()  # its next uvm call ends the task's thread
                with contextlib.suppress(Stopped):
                    await work
                return None
        return await work

    async def _send_update(self, ws: aiohttp.ClientWebSocketResponse, spec: P.TaskSpec, text: str) -> None:
        data = json.loads(text)
        if data["state"] is not None:
            self.checkpoints += 1
            self.last_state = data["state"]
        await ws.send_str(P.encode(P.Update(spec.attempt, data["state"], data["progress"], data["partials"])))

    async def _send_results(self, ws: aiohttp.ClientWebSocketResponse, outcomes: list[P.Outcome]) -> P.Ack:
        """Send results until they are acknowledged. ``hold`` (the server's database is away): keep
        them and send them again after the delay it gives; ``error`` (a commit failed): again soon."""
        errors = 0
        while errors < 20:
            self.sends.append(time.monotonic())
            await ws.send_str(P.encode(P.Results(outcomes)))
            answer = await self._first_of("ack", "hold", "error")
            if isinstance(answer, P.Ack):
                return answer
            if isinstance(answer, P.Hold):
                self.holds += 1
                await asyncio.sleep(answer.retry_after)
                continue
            await asyncio.sleep(min(0.1 * 2**errors, 2.0))
            errors += 1
        raise ConnectionError("results not acknowledged")

    async def _first_of(self, *kinds: str) -> Any:
        """The first message of any of these types; ConnectionError if the socket closes first."""
        gets = {asyncio.ensure_future(self._q(kind).get()): kind for kind in kinds}
        closed = asyncio.ensure_future(self._closed.wait())
        done, pending = await asyncio.wait({*gets, closed}, return_when=asyncio.FIRST_COMPLETED)
        for future in pending:
            future.cancel()
        got = [f for f in gets if f in done]
        for extra in got[1:]:  # keep any other that arrived in the same instant for the next wait
            self._q(gets[extra]).put_nowait(extra.result())
        if not got:
            raise ConnectionError("server closed the connection")
        return got[0].result()

    async def _load(self, ws: aiohttp.ClientWebSocketResponse, spec: P.TaskSpec) -> bool:
        """Ask for a job's code the first time one of its tasks comes (``need_code``), as the page
        does; False if the server refused to send it."""
        if not self.runner.has(spec.code_hash):
            await ws.send_str(P.encode(P.NeedCode(spec.job, spec.code_hash)))
            reply = await self._first_of("code", "error")
            if isinstance(reply, P.Error):
                return False
            self.runner.load(reply.code_hash, reply.source, reply.job)
        return True


async def run_volunteers(
    server: str,
    count: int,
    prefetch: int = 2,
    duration: float | None = None,
    quiet: bool = False,
    stop: asyncio.Event | None = None,
    lie_rate: float = 0.0,
) -> dict:
    """Run ``count`` simulated volunteers until ``stop`` is set or ``duration`` passes."""
    stop = stop or asyncio.Event()
    sims = [SimVolunteer(server, prefetch, lie_rate=lie_rate) for _ in range(count)]
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

"""Headless volunteers: the browser's protocol, with tasks run in native CPython.

Tasks run through ``workers/runner.py``, the same code the browser's Pyodide workers run, so tests
with simulated volunteers exercise it; a chunk (protocol 5) in one call, as the page's worker does.
For tests, load tests and benchmarks with TRUSTED jobs only: the code runs in this process with no
sandbox and no timeout enforcement (a chunk's tasks are only marked timed out afterwards). A task
runs in a thread:
research code's ``uvm`` calls (progress, checkpoints, partials) go out on the socket as ``update``
messages while it runs, as the browser's do.

Idle, it waits as the browser does (protocol 4): its ``ready`` answered by ``wait``, it sends only
``heartbeat``s, the first when the ``wait`` says, then (protocol 6) at intervals it doubles up to the
``longest`` that gave, unanswered, until the server pushes ``tasks``. Many of
them share one process and one event loop (``run_volunteers``), connecting at random moments spread
over ``ramp`` seconds, and reconnecting with jittered backoff.
"""

from __future__ import annotations

import asyncio
import collections
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
    ``leave_after``: close the socket once that many batches of tasks were done and acknowledged.
    ``trace``: keep every message type sent (``>ready``) and received (``<tasks``, ``<tasks:0`` for an
    empty one) in ``trace``, for tests of the message sequence; ``received`` always counts types.

    It declares one worker and ``prefetch - 1`` tasks of prefetch (so the server's lease cap
    allows the ``ready {prefetch}`` it sends), and keeps the signed id from ``welcome`` to
    present in its next ``hello``, as the browser does. ``volunteer`` is the public part of
    that id (what the server stores); ``token`` the signed whole.

    Its one worker has the job of the last task it ran loaded, as a browser's worker does: a task
    of another job counts as a job switch (``switches``; the browser would start a fresh worker).
    With ``affinity`` its ``ready`` names the loaded job, so the server prefers that job's tasks.
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
        affinity: bool = True,
        leave_after: int | None = None,
        trace: bool = False,
        protocol: int = P.PROTOCOL_VERSION,
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
        self.affinity = affinity
        self.loaded: int | None = None  # the job its worker ran last
        self.switches = 0  # tasks whose job was not the loaded one (a fresh worker in the browser)
        self.chunks = 0  # chunks run (protocol 5: several tasks of a job in one call of the runner)
        self.sizes: list[int] = []  # tasks in each task or chunk handed to it, in order
        self.lies: set[int] = set()  # tasks it forged a result for
        self._rng = random.Random(seed)
        self.done = 0
        self.errors = 0
        self.leased = 0
        self.unrun = 0  # tasks of the batch in hand not yet run: a test sees when each volunteer holds work
        self.connects = 0  # websocket connections opened (more than one: it was dropped and came back)
        self.holds = 0  # `hold` answers: results kept and sent again later (the server's database was away)
        self.sends: list[float] = []  # when each `results` message was sent (time.monotonic())
        self.latencies: list[float] = []  # seconds from `ready` to `tasks` answered at once (not pushed)
        self.pushed: list[float] = []  # when (time.time()) tasks were pushed to it after a `wait`
        self.waits: list[float] = []  # the intervals the server's `wait`s gave, in order
        self.beats: list[float] = []  # the idle intervals it waited before each idle heartbeat, in order
        self.batches = 0  # `tasks` messages with work, done and acknowledged
        self.leave_after = leave_after
        self.received: collections.Counter = collections.Counter()  # message types from the server
        self.refusals: list[str] = []  # errors about a message other than the one awaited ("ref: message")
        self.sent: collections.Counter = collections.Counter()  # message types it sent
        self.trace: list[str] | None = [] if trace else None
        self.protocol = protocol  # the hello's version: below CHUNKS_SINCE it is never handed chunks
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
                    self.received[msg.TYPE] += 1
                    if self.trace is not None:
                        empty = isinstance(msg, P.Tasks) and not msg.tasks
                        self.trace.append(f"<{msg.TYPE}{':0' if empty else ''}")
                    await self._q(msg.TYPE).put(msg)
        finally:
            self._closed.set()

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, msg: Any) -> None:
        self.sent[msg.TYPE] += 1
        if self.trace is not None:
            self.trace.append(f">{msg.TYPE}")
        await ws.send_str(P.encode(msg))

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        self._inbox, self._closed = {}, asyncio.Event()
        async with session.ws_connect(self.url, max_msg_size=P.MAX_MESSAGE_BYTES) as ws:
            self.connects += 1
            reader = asyncio.create_task(self._reader(ws))
            try:
                capabilities = {"cores": 1, "workers": 1, "prefetch": max(0, self.prefetch - 1), "sim": True}
                await self._send(ws, P.Hello(self.token, capabilities, protocol=self.protocol))
                welcome = await self._first_of("welcome", "error")
                if not isinstance(welcome, P.Welcome):  # the server failed to handle the hello: come back
                    raise ConnectionError(f"hello not answered: {welcome.message}")
                self.token = welcome.volunteer
                self.volunteer = welcome.volunteer.split("-", 1)[0]
                self.every = welcome.every
                await self._loop(ws, stop)
            finally:
                reader.cancel()

    async def _loop(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
        refused = 0
        while not stop.is_set():
            if self.leave_after is not None and self.batches >= self.leave_after:
                return
            sent = time.perf_counter()
            await self._send(ws, self._ready())
            answer = await self._tasks(ws, stop)
            if answer is None:
                return  # stopped while waiting
            batch, pushed = answer
            if not isinstance(batch, P.Tasks) or not batch.tasks:
                # refused (`error`), or a server of protocol 3 (nothing now): ask again a little later
                refused += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(0.05 * 2**refused, 2.0))
                continue
            refused = 0
            if pushed:
                self.pushed.append(time.time())
            else:
                self.latencies.append(time.perf_counter() - sent)
            self.sizes += [1 + len(spec.more) for spec in batch.tasks]
            self.leased += sum(1 + len(spec.more) for spec in batch.tasks)
            if self.crash_after is not None and self.leased >= self.crash_after:
                return  # vanish holding the leases: the socket closes with no results
            outcomes = await self._run_batch(ws, batch.tasks)
            if outcomes is None:
                return  # vanished mid-task (crash_after_checkpoints)
            acked: set[str] = set()
            for group in P.split_results(outcomes):  # a chunk's results in one message when they fit
                acked.update((await self._send_results(ws, group)).attempts)
            self.batches += 1
            self.done += len(acked)
            self.errors += sum(1 for o in outcomes if o.error is not None)
            self.task_ids += [o.task for o in outcomes if o.attempt in acked and o.error is None]

    async def _run_batch(self, ws: aiohttp.ClientWebSocketResponse, tasks: list[P.TaskSpec]) -> list[P.Outcome] | None:
        """Run a batch of tasks (and chunks) one after another; None if it vanished mid-task."""
        outcomes = []
        # One worker: one task of the batch runs at a time, the rest wait (the server counts 1 running).
        held = [spec.attempt for spec in tasks]  # a chunk's first attempt stands for all of its tasks
        await self._send(ws, P.Heartbeat(held, held[:1]))
        self.unrun = len(tasks)
        for spec in tasks:
            if not await self._load(ws, spec):  # refused (the job was cancelled meanwhile): drop the task
                self.unrun -= 1
                continue
            if self.loaded is not None and spec.job != self.loaded:
                self.switches += 1
            self.loaded = spec.job
            ran = await self._run_task(ws, spec)  # a chunk: all its tasks, in one call of the runner
            self.unrun -= 1
            if ran is None:
                return None
            self.chunks += bool(spec.more)
            for outcome in ran:
                if self.lie_rate and outcome.error is None and self._rng.random() < self.lie_rate:
                    outcome.result = self._rng.random()  # a forged result
                    self.lies.add(outcome.task)
                outcomes.append(outcome)
        return outcomes

    def _ready(self) -> P.Ready:
        if self.affinity and self.loaded is not None:
            return P.Ready(self.prefetch, jobs=[self.loaded])
        return P.Ready(self.prefetch)

    async def _tasks(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> tuple[Any, bool] | None:
        """The answer to a ``ready``: (``tasks`` or ``error``, whether the tasks were pushed after a
        ``wait``); None if stopped first. While waiting it sends a ``heartbeat`` (no attempts) each
        time its idle interval passes, and nothing else: the last ``wait``'s, then (protocol 6) doubled
        after each heartbeat up to the ``longest`` it gave (``protocol.next_idle_beat``)."""
        beat: float | None = None
        longest = 0.0
        waited = False
        while True:
            msg = await self._first_of("tasks", "wait", "error", patience=beat, stop=stop)
            if msg is None:
                if stop.is_set() or beat is None:
                    return None
                await self._send(ws, P.Heartbeat([]))  # still here (an older server answers with a `wait`)
                self.beats.append(beat)
                beat = P.next_idle_beat(beat, longest)
            elif isinstance(msg, P.Wait):
                waited, beat, longest = True, msg.heartbeat, msg.longest
                self.waits.append(msg.heartbeat)
            elif isinstance(msg, P.Tasks) or msg.ref == "ready":
                return msg, waited
            # an error about another message (an update, a throttle) is not the answer

    def _run_locked(self, spec: P.TaskSpec, emit: Any) -> list[P.Outcome]:
        """One task, or (protocol 5) a chunk's tasks in one call of the runner, as the browser's worker."""
        with _RUNNER_LOCK:
            if spec.more:
                items = [{"input": item.input, "restore": item.restore} for item in spec.items()]
                ran = self.runner.run_many(spec.code_hash, items, spec.job, spec.timeout, emit, self.every)
                return [P.Outcome(item.attempt, item.task, **r) for item, r in zip(spec.items(), ran, strict=True)]
            context = TaskContext(spec.restore, emit, self.every)
            one = self.runner.run(spec.code_hash, spec.input, spec.job, context)  # {result, output, error, elapsed}
        return [P.Outcome(spec.attempt, spec.task, **one)]

    async def _run_task(self, ws: aiohttp.ClientWebSocketResponse, spec: P.TaskSpec) -> list[P.Outcome] | None:
        """Run one task (or a chunk) in a thread, sending updates as they come; None if it vanished meanwhile."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        stopped = threading.Event()

        def emit(text: str) -> None:  # in the task's thread
            if stopped.is_set():
                raise Stopped()
            loop.call_soon_threadsafe(updates.put_nowait, text)

        work = loop.run_in_executor(None, self._run_locked, spec, emit)
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
        attempt = spec.attempts()[data["item"]] if "item" in data else spec.attempt  # a chunk's task
        await self._send(ws, P.Update(attempt, data["state"], data["progress"], data["partials"]))

    async def _send_results(self, ws: aiohttp.ClientWebSocketResponse, outcomes: list[P.Outcome]) -> P.Ack:
        """Send results until they are acknowledged. ``hold`` (the server's database is away): keep
        them and send them again after the delay it gives; ``error`` (a commit failed): again soon."""
        errors = 0
        while errors < 20:
            self.sends.append(time.monotonic())
            await self._send(ws, P.Results(outcomes))
            answer = await self._answer("ack", "results", "hold")
            if isinstance(answer, P.Ack):
                return answer
            if isinstance(answer, P.Hold):
                self.holds += 1
                await asyncio.sleep(answer.retry_after)
                continue
            await asyncio.sleep(min(0.1 * 2**errors, 2.0))
            errors += 1
        raise ConnectionError("results not acknowledged")

    async def _first_of(self, *kinds: str, patience: float | None = None, stop: asyncio.Event | None = None) -> Any:
        """The first message of any of these types; None once ``patience`` seconds passed or ``stop``
        was set; ConnectionError if the socket closes first."""
        for kind in kinds:  # one already there: no futures to make (the common case when busy)
            if not self._q(kind).empty():
                return self._q(kind).get_nowait()
        gets = {asyncio.ensure_future(self._q(kind).get()): kind for kind in kinds}
        closed = asyncio.ensure_future(self._closed.wait())
        others = {closed} if stop is None else {closed, asyncio.ensure_future(stop.wait())}
        done, pending = await asyncio.wait({*gets, *others}, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
        for future in pending:
            future.cancel()
        got = [f for f in gets if f in done]
        for extra in got[1:]:  # keep any other that arrived in the same instant for the next wait
            self._q(gets[extra]).put_nowait(extra.result())
        if got:
            return got[0].result()
        if closed in done:
            raise ConnectionError("server closed the connection")
        return None

    async def _load(self, ws: aiohttp.ClientWebSocketResponse, spec: P.TaskSpec) -> bool:
        """Ask for a job's code the first time one of its tasks comes (``need_code``), as the page
        does; False if the server refused to send it."""
        tries = 0
        while not self.runner.has(spec.code_hash):
            await self._send(ws, P.NeedCode(spec.job, spec.code_hash))
            reply = await self._answer("code", "need_code")
            if isinstance(reply, P.Code):
                self.runner.load(reply.code_hash, reply.source, reply.job)
            elif reply.ref == "need_code" or tries >= 20:
                return False  # refused: the job is gone, or was never this volunteer's
            else:  # no ref: the server's database was away; ask again shortly, as the page does
                tries += 1
                await asyncio.sleep(min(0.1 * 2**tries, 2.0))
        return True

    async def _answer(self, kind: str, ref: str, *more: str) -> Any:
        """The answer to a message of type ``ref``: the first ``kind`` (or ``more``) message, or an
        ``error`` about it (its ``ref``, or none: the server's database was away). An error about
        another message (an ``update`` or ``heartbeat`` sent earlier) is not the answer: it is kept
        in ``refusals`` and the wait goes on, as the page does (it reads every error's ``ref``)."""
        while True:
            msg = await self._first_of(kind, *more, "error")
            if not isinstance(msg, P.Error) or msg.ref in (ref, None):
                return msg
            self.refusals.append(f"{msg.ref}: {msg.message}")


async def run_volunteers(
    server: str,
    count: int,
    prefetch: int = 2,
    duration: float | None = None,
    quiet: bool = False,
    stop: asyncio.Event | None = None,
    lie_rate: float = 0.0,
    affinity: bool = True,
    ramp: float | None = None,
    sims: list[SimVolunteer] | None = None,
) -> dict:
    """Run ``count`` simulated volunteers (or the given ``sims``) until ``stop`` is set or ``duration``
    passes. Each connects first at a random moment within ``ramp`` seconds (default: 1 s per 500
    volunteers, at most 30 s), so that thousands do not all knock at once."""
    stop = stop or asyncio.Event()
    sims = (
        sims
        if sims is not None
        else [SimVolunteer(server, prefetch, lie_rate=lie_rate, affinity=affinity) for _ in range(count)]
    )
    ramp = min(30.0, len(sims) / 500) if ramp is None else ramp
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        runs = [asyncio.create_task(_forever(sim, session, stop, random.uniform(0, ramp))) for sim in sims]
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
        "switches": sum(s.switches for s in sims),
    }


async def _forever(sim: SimVolunteer, session: aiohttp.ClientSession, stop: asyncio.Event, first: float = 0.0) -> None:
    """Connect after ``first`` seconds, then reconnect with jittered backoff until stopped (server
    restarts are normal: its volunteers come back spread over a few seconds, not all at once)."""
    delay = first
    failures = 0
    while not stop.is_set():
        if delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
        try:
            await sim.run(session, stop)
            failures = 0
        except (aiohttp.ClientError, ConnectionError, OSError):
            failures += 1
        if sim.leave_after is not None and sim.batches >= sim.leave_after:
            return
        delay = random.uniform(0.1, min(0.2 * 2**failures, 5.0))  # full jitter

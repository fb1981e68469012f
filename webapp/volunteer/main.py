"""The volunteer page's main-thread Python (PyScript on Pyodide).

Wires the pieces: the websocket (``link``), the worker pool (``pool``), the encrypted store
(``public/vault.js``), the supervisor's decisions (``supervisor``) and the page (``ui``).
Nothing runs before the volunteer presses Start; the choice is remembered. ``start()`` is called
by the page (``public/index.html``); ``protocol`` and ``supervisor`` are top-level modules there.

Flow: ``hello`` -> ``welcome``; results not yet acknowledged are re-sent; cached tasks resume
without being downloaded again; then ``ready {n, jobs}`` asks for what the plan allows, naming the
jobs its workers have loaded (the server prefers their tasks: fewer job switches). Each task runs
on an idle worker; its outcome is stored, then sent; it is forgotten only on ``ack``. With nothing
to hand out the server answers ``wait`` and holds the ready (protocol 4): the page does not ask
again, it sends a ``heartbeat`` when the last ``wait`` says, then (protocol 6) at intervals it doubles
up to the ``longest`` that gave, unanswered, and the server pushes ``tasks`` when work comes.
A ready is sent again only when what the plan wants changes (``ready {0}`` when paused).
A chunk (protocol 5: a task with ``more``) runs on one worker in one call; its results are kept in
memory only (no vault writes), sent together, and dropped if the socket closes first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import js
import protocol
import supervisor
from pyodide.ffi import create_proxy
from pyscript import document, window

from . import ui
from .credit import Credit
from .link import Link
from .pool import Pool
from .updates import Updates

SETTINGS_KEY = "uvm.settings"
TOTALS_KEY = "uvm.totals"
VOLUNTEER_KEY = "uvm.volunteer"
TICK_SECONDS = 1.0  # device state is re-read this often (events also trigger it)
RENDER_SECONDS = 0.25  # the page is redrawn at most this often between ticks
STALE_TASK_SECONDS = 3600  # a cached task this far past its deadline is dropped


def _load(key: str, default):
    try:
        text = window.localStorage.getItem(key)
        return json.loads(text) if text else default
    except Exception:  # noqa: BLE001 -- corrupt or blocked storage: start afresh
        return default


def _number(value) -> float:
    return float(value) if type(value) in (int, float) and value == value and value >= 0 else 0.0


def _save(key: str, value) -> None:
    window.localStorage.setItem(key, json.dumps(value))


def _volunteer_id() -> str:
    known = window.localStorage.getItem(VOLUNTEER_KEY)
    if known:
        return str(known)
    # getRandomValues, not randomUUID: the page may be served over plain http on a LAN.
    new = "".join(f"{b:02x}" for b in js.crypto.getRandomValues(js.Uint8Array.new(16)).to_py())
    window.localStorage.setItem(VOLUNTEER_KEY, new)
    return new


class App:
    """The volunteer runtime of one page."""

    def __init__(self, vault, worker_url: str, socket_url: str, spare: bool = True) -> None:
        self.vault = vault
        saved = _load(SETTINGS_KEY, {})
        self.settings = supervisor.Settings(
            cpu_cap=supervisor.clamp_cap(saved.get("cpu_cap", supervisor.DEFAULT_CPU_CAP)),
            when_hidden=saved.get("when_hidden", "continue")
            if saved.get("when_hidden") in supervisor.HIDDEN_POLICIES
            else "continue",
            paused=not saved.get("running", False),
        )
        self.volunteer = _volunteer_id()
        totals = _load(TOTALS_KEY, {})
        totals = totals if isinstance(totals, dict) else {}
        self.totals = {  # "cpu" is the name older pages saved the seconds under
            "tasks": int(_number(totals.get("tasks"))),
            "elapsed": _number(totals.get("elapsed", totals.get("cpu"))),
        }
        self.session = {"tasks": 0, "elapsed": 0.0, "errors": 0, "timeouts": 0}
        self.credit = Credit()
        self.pool = Pool(worker_url, self.pump, spare)
        self.pool.on_update = self.on_update
        self.updates = Updates(protocol)
        self.link = Link(socket_url, self.on_message, self.on_open, self.on_close)
        self.welcomed = False
        self.heartbeat = 30.0
        self.queue: list = []  # TaskSpecs waiting for a worker, in arrival order
        self.codes: dict[str, protocol.Code] = {}
        self.asked_code: set[str] = set()
        self.cancelled: set[str] = set()
        # Tasks held across a closed socket (a reload, Stop, a dropped connection). The server put
        # them back in its ready queue when the socket closed; finishing them before asking for
        # more keeps it from handing the same tasks to this page again.
        self.resumed: set[str] = set()
        self.running_specs: dict[str, protocol.TaskSpec] = {}
        self.arrived: dict[str, float] = {}  # attempt -> when its task arrived (job switch timings)
        self.restored_tasks: list[int] = []  # tasks this page found in its vault when it opened
        # single tasks held (running or waiting) when Stop was last pressed: kept to run after Start
        # (a chunk is not kept: the server requeues it when the socket closes)
        self.held_at_stop: list[int] = []
        self.task_seconds: float | None = None  # moving average of one task's (or chunk's) time here
        self.results: dict[str, dict] = {}  # attempt -> Outcome dict, not yet acknowledged
        # Chunks (protocol 5) live in memory only: about a second of work, neither put in the vault nor
        # kept across a closed socket (the server requeued them). Their attempts whose results wait:
        self.chunked: set[str] = set()
        self.link_epoch = 0  # closed sockets so far: a chunk that ends after one drops its results
        self.chunks_seen = False  # the server hands out chunks: results may go up to its larger cap
        self.in_flight: set[str] = set()  # attempts sent, waiting for their ack
        self.oldest_result: float | None = None
        self.awaiting_tasks = False
        self.sent_running: set[str] | None = None  # the running attempts the server was last told of
        self.asked = 0  # n of the last ready sent
        self.held_ready = 0  # n of the ready the server holds (after its `wait`); 0: none
        self.idle_beat = 0.0  # seconds to the next idle heartbeat, from the last `wait` (then grown)
        self.idle_longest = 0.0  # the longest idle interval the last `wait` gave (protocol 6; 0: none)
        self.idle_beat_at = 0.0  # when the next idle heartbeat is due
        self.empty_replies = 0  # empty `tasks` in a row from a server of protocol 3 (it is polled)
        self.next_ask = 0.0
        self.battery_api = None
        self.device = supervisor.Device(cores=None)
        self.plan = supervisor.plan(self.device, self.settings)
        self.sent_throttle: dict | None = None
        self.counts = {
            "tasks_messages": 0,
            "empty_tasks": 0,
            "wait_messages": 0,
            "idle_heartbeats": 0,  # sent while waiting and holding nothing
            "ready_messages": 0,
            "code_messages": 0,
            "results_messages": 0,
            "holds": 0,
            "chunks": 0,  # chunks run (protocol 5): several tasks in one call of a worker
            "chunked_tasks": 0,
            "chunk_seconds": 0.0,
            "lost_chunks": 0,  # chunks whose worker crashed: every task given back, none charged
            "results_seconds": 0.0,  # this page's own handling of results: collecting and sending them
        }
        self.first_result_at: float | None = None
        self.opened_at = time.monotonic()
        self.last_error = ""
        self.rendered_at = 0.0
        self.heartbeat_at = 0.0
        self.flush_after = 0.0  # results are held until then after the server refused some

    # ------------------------------------------------------------------ lifecycle
    async def restore(self) -> None:
        """Load what the vault holds: job code, cached tasks, unacknowledged results."""
        for _key, text in json.loads(await self.vault.all("code")):
            code = protocol.from_dict(json.loads(text))
            self.codes[code.code_hash] = code
        now = time.time()
        stale = []
        for key, text in json.loads(await self.vault.all("tasks")):
            spec = protocol.TaskSpec(**json.loads(text))
            if spec.more or spec.deadline + STALE_TASK_SECONDS < now:  # a chunk is never kept: see chunked
                stale.append(key)
            else:
                self.queue.append(spec)
                self.resumed.add(spec.attempt)
        self.queue.sort(key=lambda s: (s.job, s.index))
        self.restored_tasks = [s.task for s in self.queue]
        if stale:
            await self.vault.remove("tasks", json.dumps(stale))
        for key, text in json.loads(await self.vault.all("results")):
            self.results[key] = json.loads(text)
        if self.results:
            self.oldest_result = time.monotonic()

    @property
    def running(self) -> bool:
        return not self.settings.paused

    def toggle(self, *_args) -> None:
        self.set_running(not self.running)

    def set_running(self, running: bool) -> None:
        self.settings = supervisor.Settings(
            cpu_cap=self.settings.cpu_cap,
            when_hidden=self.settings.when_hidden,
            paused=not running,
        )
        self.save_settings()
        self.rendered_at = 0.0
        if running:
            self.link.start()
        self.pump()
        if not running:
            self.held_at_stop = self.kept_tasks()
            self.resumed.update(self.held_attempts(chunks=False))
            self.pool.discard_prewarmed()
            self.pool.stop_all()
            self.link.stop()
            self.welcomed = False
            ui.render(self)

    def save_settings(self) -> None:
        _save(
            SETTINGS_KEY,
            {
                "cpu_cap": self.settings.cpu_cap,
                "when_hidden": self.settings.when_hidden,
                "running": self.running,
            },
        )

    def set_cap(self, value) -> None:
        self.settings = supervisor.Settings(
            cpu_cap=supervisor.clamp_cap(value),
            when_hidden=self.settings.when_hidden,
            paused=self.settings.paused,
        )
        self.save_settings()
        self.rendered_at = 0.0  # the volunteer's own action: show it at once
        self.pump()

    def set_when_hidden(self, value: str) -> None:
        if value in supervisor.HIDDEN_POLICIES:
            self.settings = supervisor.Settings(
                cpu_cap=self.settings.cpu_cap, when_hidden=value, paused=self.settings.paused
            )
            self.save_settings()
            self.rendered_at = 0.0
            self.pump()

    # ------------------------------------------------------------------ device
    async def read_device(self) -> None:
        nav = window.navigator
        cores = getattr(nav, "hardwareConcurrency", None)
        battery = None
        if self.battery_api is None and hasattr(nav, "getBattery"):
            try:
                self.battery_api = await nav.getBattery()
                for name in ("chargingchange", "levelchange"):
                    if hasattr(self.battery_api, "addEventListener"):
                        self.battery_api.addEventListener(name, create_proxy(lambda e: self.tick()))
            except Exception:  # noqa: BLE001 -- refused or missing: treated as unknown
                self.battery_api = False
        if self.battery_api:
            battery = supervisor.Battery(charging=bool(self.battery_api.charging), level=float(self.battery_api.level))
        network = None
        connection = getattr(nav, "connection", None)
        if connection is not None:
            downlink = getattr(connection, "downlink", None)
            network = supervisor.Network(
                effective_type=str(getattr(connection, "effectiveType", "") or ""),
                save_data=bool(getattr(connection, "saveData", False)),
                downlink=float(downlink) if isinstance(downlink, int | float) else None,
            )
        self.device = supervisor.Device(
            cores=int(cores) if isinstance(cores, int | float) and cores else None,
            battery=battery,
            network=network,
            hidden=str(document.visibilityState) == "hidden",
        )

    def tick(self) -> None:
        asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        await self.read_device()
        self.rendered_at = 0.0  # always draw on a tick
        self.pump()

    def on_clock(self) -> None:
        """Once a second, from ``public/clock.js``: re-read the device, heartbeat, redraw."""
        now = time.monotonic()
        if now - self.heartbeat_at >= max(1.0, self.heartbeat / 3):
            self.heartbeat_at = now
            held = self.held_attempts()
            beat = protocol.Heartbeat(attempts=held, running=list(self.running_specs))
            if self.welcomed and held and self.link.send(beat):
                self.sent_running = set(self.running_specs)
        if self.welcomed and self.credit.due():
            asyncio.ensure_future(self.credit.refresh(self.volunteer))
        if self.welcomed and self.held_ready and not self.held_attempts() and now >= self.idle_beat_at:
            self.idle_beat = protocol.next_idle_beat(self.idle_beat, self.idle_longest)  # not answered
            self.idle_beat_at = now + self.idle_beat
            self.link.send(protocol.Heartbeat(attempts=[]))  # idle: still here
            self.counts["idle_heartbeats"] += 1
        self.tick()

    # ------------------------------------------------------------------ the loop
    def held_attempts(self, chunks: bool = True) -> list[str]:
        """Attempts held (running or queued), a chunk by its first; ``chunks=False``: not chunks, which
        are not kept across a closed socket."""
        specs = [*self.running_specs.values(), *self.queue]
        return [s.attempt for s in specs if chunks or not s.more]

    def kept_tasks(self) -> list[int]:
        """Held single tasks (running or queued): the vault keeps them across a reload or a Stop; a
        chunk is not kept (the server requeues it when the socket closes)."""
        return [s.task for s in [*self.running_specs.values(), *self.queue] if not s.more]

    def pump(self) -> None:
        """Bring everything in line with the plan; called after every event."""
        self.plan = supervisor.plan(self.device, self.settings, self.task_seconds)
        if self.running:
            self.pool.resize(self.plan.workers)
            self.report_throttle()
            self.start_tasks()
            self.report_running()  # before the results: the server never sees this tab compute nothing
            self.send_updates()
            self.flush_results()  # before asking: the server drops finished tasks from its queue
            self.ask_for_tasks()
        now = time.monotonic()
        if now - self.rendered_at >= RENDER_SECONDS:  # the ticker draws what this skips
            self.rendered_at = now
            ui.render(self)

    def report_throttle(self) -> None:
        state = self.throttle_state()
        if self.welcomed and state != self.sent_throttle and self.link.send(protocol.Throttle(state)):
            self.sent_throttle = state

    def report_running(self) -> None:
        """Tell the server which held attempts run now whenever that changes (a task ended, the next
        started): the job view counts this tab's running tasks and volunteers from it, not leases."""
        running = set(self.running_specs)
        if self.welcomed and running != self.sent_running:
            held = self.held_attempts()
            if self.link.send(protocol.Heartbeat(attempts=held, running=list(running))):
                self.sent_running = running

    def throttle_state(self) -> dict:
        state = self.plan.state()
        device = self.device
        state["cores"] = device.cores
        state["battery"] = (
            None
            if device.battery is None
            else {"charging": device.battery.charging, "level": round(device.battery.level, 2)}
        )
        state["network"] = (
            None
            if device.network is None
            else {"effective_type": device.network.effective_type, "save_data": device.network.save_data}
        )
        state["hidden"] = device.hidden
        state["cpu_cap"] = self.settings.cpu_cap
        return state

    def start_tasks(self) -> None:
        if self.plan.paused:
            return
        for slot, spec in supervisor.assign(
            [(slot, slot.owner) for slot in self.pool.idle()],
            [(spec, spec.job) for spec in self.queue if spec.code_hash in self.codes],
        ):
            self.queue.remove(spec)
            self.running_specs[spec.attempt] = spec  # held from now on, not only once it runs
            # what the page shows of the slot, from now on (not only once the worker was handed the task)
            slot.attempt, slot.job, slot.index, slot.started = spec.attempt, spec.job, spec.index, time.monotonic()
            asyncio.ensure_future(self.run_task(slot, spec))
        for spec in self.queue:
            missing = spec.code_hash not in self.codes and spec.code_hash not in self.asked_code
            if missing and self.welcomed and self.link.send(protocol.NeedCode(spec.job, spec.code_hash)):
                self.asked_code.add(spec.code_hash)

    def ask_for_tasks(self) -> None:
        if not self.welcomed or self.awaiting_tasks or time.monotonic() < self.next_ask:
            return
        if self.credit.at_start is None and time.monotonic() < self.credit.wait_until:
            return  # this session's starting credit first, or its first tasks' credit counts as "before"
        if self.pool.target and not self.pool.slots:
            return
        unsent = [a for a in self.results if a not in self.in_flight]
        if self.resumed.intersection(self.held_attempts() + unsent):
            return
        want = min(self.plan.want(len(self.held_attempts())), protocol.MAX_TASKS_PER_MESSAGE)
        if want == self.held_ready:
            return  # the server holds this very ask: it pushes tasks when there are some
        # a new ask, or a changed one (0: withdrawn)
        if self.link.send(protocol.Ready(n=want, running=list(self.running_specs), jobs=self.pool.loaded_jobs())):
            self.counts["ready_messages"] += 1
            self.awaiting_tasks = True
            self.asked = want
            self.sent_running = set(self.running_specs)

    def flush_results(self) -> None:
        if self.in_flight or time.monotonic() < self.flush_after:
            return  # one results message at a time: what finishes meanwhile goes in the next
        waiting = [a for a in self.results if a not in self.in_flight]
        age = time.monotonic() - self.oldest_result if self.oldest_result else 0.0
        if not self.welcomed or not supervisor.should_flush(len(waiting), age, self.plan.batch_results):
            return
        begun = time.monotonic()
        most = protocol.MAX_RESULTS_PER_MESSAGE if self.chunks_seen else protocol.MAX_TASKS_PER_MESSAGE
        try:
            for outcomes in protocol.split_results([protocol.Outcome(**self.results[a]) for a in waiting], most):
                if not self.link.send(protocol.Results(results=outcomes)):
                    return
                self.counts["results_messages"] += 1
                self.in_flight.update(o.attempt for o in outcomes)
            self.oldest_result = None
        finally:
            self.counts["results_seconds"] += time.monotonic() - begun

    def on_update(self, spec, text: str) -> None:
        """A running task's uvm update: throttled to the server; its checkpoint into the vault, so
        that a reload of this tab resumes from it with no server round trip."""
        if spec.attempt not in self.running_specs:
            return
        if spec.more:  # a task of a chunk: the runner said which one; kept in memory only
            data = json.loads(text)
            attempts = spec.attempts()
            item = data.pop("item", None)
            if type(item) is int and 0 <= item < len(attempts):
                self.updates.add(attempts[item], json.dumps(data))
            self.pump()
            return
        state = self.updates.add(spec.attempt, text)
        if state is not None:
            spec.restore = state
            asyncio.ensure_future(self.vault.put("tasks", spec.attempt, json.dumps(dataclasses.asdict(spec))))
        self.pump()

    def send_updates(self) -> None:
        if not self.welcomed:
            return  # kept (latest wins) until the socket is back
        for update in self.updates.due(time.monotonic()):
            self.link.send(update)

    async def run_task(self, slot, spec) -> None:
        epoch = self.link_epoch
        begun = time.monotonic()
        try:
            arrived = self.arrived.pop(spec.attempt, None)
            answer = await self.pool.execute(slot, spec, self.codes[spec.code_hash], arrived)
        finally:
            self.running_specs.pop(spec.attempt, None)
            for attempt in spec.attempts():
                last = self.updates.finish(attempt)  # the partials its end flushed go before its result
                if last is not None and self.welcomed:
                    self.link.send(last)
        if spec.more:
            self.counts["chunk_seconds"] += time.monotonic() - begun  # in the worker, for bench/browser.py
            self.chunk_ended(spec, answer, epoch)
            return
        if answer.get("stopped"):  # cancelled, or the volunteer pressed Stop: no outcome
            if spec.attempt not in self.cancelled:
                self.queue.insert(0, spec)  # runs again after Start, from the vault after a reload
                self.resumed.add(spec.attempt)
            self.pump()
            return
        outcome = {
            "attempt": spec.attempt,
            "task": spec.task,
            "result": answer.get("result"),
            "output": answer.get("output", ""),
            "error": answer.get("error"),
            "timeout": bool(answer.get("timeout", False)),
            "elapsed": float(answer.get("elapsed", 0.0)),
        }
        self.results[spec.attempt] = outcome
        self.count(outcome)
        if self.oldest_result is None:
            self.oldest_result = time.monotonic()
        self.pump()  # the next task starts and this result goes out before the vault writes
        # Until these land the vault still holds the task, so a reload would run it again:
        # at worst twice, never lost (the server records one result per task).
        await self.vault.put("results", spec.attempt, json.dumps(outcome))
        await self.vault.remove("tasks", json.dumps([spec.attempt]))

    def chunk_ended(self, spec, answer: dict, epoch: int) -> None:  # noqa: ANN001
        """A chunk ran: one result per task, kept in memory (no vault write per task).

        Dropped when the socket closed meanwhile (the server put the chunk back in its queue) or when
        it was cancelled or stopped. A worker that failed (timed out, crashed) gives each task its error:
        the server then hands that job's tasks out one at a time, and errors need corroboration."""
        if answer.get("stopped") or epoch != self.link_epoch or spec.attempt in self.cancelled:
            self.pump()
            return
        begun = time.monotonic()
        items = spec.items()
        many = answer.get("outcomes")
        if not isinstance(many, list) or len(many) != len(items):
            failed = {k: answer.get(k) for k in ("error", "output", "elapsed", "timeout")}
            failed["error"] = failed["error"] or "worker error: no outcome for this chunk"
            if answer.get("crashed"):  # the worker failed: no task's own outcome is known
                failed["lost"] = True
                self.counts["lost_chunks"] += 1
            many = [failed] * len(items)
        outcomes = []
        for item, ran in zip(items, many, strict=True):
            outcome = {
                "attempt": item.attempt,
                "task": item.task,
                "result": ran.get("result"),
                "output": ran.get("output") or "",
                "error": ran.get("error"),
                "timeout": bool(ran.get("timeout", False)),
                "elapsed": float(ran.get("elapsed") or 0.0),
            }
            if ran.get("lost"):
                outcome["lost"] = True
            self.results[item.attempt] = outcome
            self.chunked.add(item.attempt)
            outcomes.append(outcome)
        self.count_many(outcomes)
        self.counts["chunks"] += 1
        self.counts["chunked_tasks"] += len(outcomes)
        if self.oldest_result is None:
            self.oldest_result = time.monotonic()
        self.counts["results_seconds"] += time.monotonic() - begun
        self.pump()

    def count_many(self, outcomes: list[dict]) -> None:
        """``count`` for a chunk's outcomes, with one write of the totals. The plan's prefetch is in
        slots, and a chunk is one: its average time is the chunk's, not its tasks'."""
        for outcome in outcomes:
            self.count(outcome, save=False)
        self._average(sum(o["elapsed"] for o in outcomes))
        _save(TOTALS_KEY, self.totals)

    def _average(self, seconds: float) -> None:
        """The moving average of one hand-out's time here (a task's, or a chunk's): it sizes prefetch."""
        self.task_seconds = seconds if self.task_seconds is None else 0.8 * self.task_seconds + 0.2 * seconds

    def count(self, outcome: dict, save: bool = True) -> None:
        if save:  # a task alone (a chunk's tasks are averaged together by count_many)
            self._average(outcome["elapsed"])
        if self.first_result_at is None:
            self.first_result_at = time.monotonic() - self.opened_at
        self.session["tasks"] += 1
        self.session["elapsed"] += outcome["elapsed"]
        self.session["errors"] += outcome["error"] is not None and not outcome["timeout"] and not outcome.get("lost")
        self.session["timeouts"] += outcome["timeout"]
        self.totals["tasks"] += 1
        self.totals["elapsed"] += outcome["elapsed"]
        if save:
            _save(TOTALS_KEY, self.totals)

    # ------------------------------------------------------------------ the socket
    def on_open(self) -> None:
        capabilities = {
            "cores": self.device.cores,
            "workers": self.plan.workers,
            "battery_api": self.device.battery is not None,
            "network_api": self.device.network is not None,
            "user_agent": str(window.navigator.userAgent)[:200],
            "resume": self.held_attempts(chunks=False)[: protocol.MAX_TASKS_PER_MESSAGE],
        }
        self.link.send(protocol.Hello(volunteer=self.volunteer, capabilities=capabilities))

    def on_close(self) -> None:
        # Chunks are not kept across a closed socket: the server requeued them (see ``chunked``).
        self.link_epoch += 1
        self.queue = [s for s in self.queue if not s.more]
        for attempt in self.chunked:
            self.results.pop(attempt, None)
        self.chunked.clear()
        self.resumed.update(self.held_attempts(chunks=False))
        self.welcomed = False
        self.awaiting_tasks = False
        self.held_ready = 0
        self.in_flight.clear()  # re-sent after the next welcome
        self.asked_code.clear()
        self.sent_throttle = None
        self.sent_running = None
        ui.render(self)

    def on_message(self, msg) -> None:
        handler = getattr(self, "on_" + msg.TYPE, None)
        if handler is not None:
            result = handler(msg)
            if asyncio.iscoroutine(result):
                asyncio.ensure_future(self._then_pump(result))
                return
        self.pump()

    async def _then_pump(self, coroutine) -> None:
        await coroutine
        self.pump()

    def on_welcome(self, msg: protocol.Welcome) -> None:
        self.welcomed = True
        if isinstance(msg.volunteer, str) and msg.volunteer and msg.volunteer != self.volunteer:
            # The server issues (and signs) volunteer ids: keep the one it gave, present it next time.
            self.volunteer = msg.volunteer
            window.localStorage.setItem(VOLUNTEER_KEY, msg.volunteer)
        self.heartbeat = float(msg.heartbeat)
        self.pool.every = self.updates.every = float(msg.every)
        if self.credit.at_start is None:  # before any task of this session: "this session" counts from here
            asyncio.ensure_future(self.credit.refresh(self.volunteer))
            # ...so no task is asked for until that answer is in (or 5 s passed: credit must not stop work)
            self.credit.wait_until = time.monotonic() + 5.0
        self.empty_replies = 0
        self.held_ready = 0
        self.next_ask = 0.0

    def on_wait(self, msg: protocol.Wait) -> None:
        """Nothing now: the server holds our ready and pushes tasks when there are some."""
        self.counts["wait_messages"] += 1
        if self.awaiting_tasks:  # the answer to our ready (else: to an idle heartbeat)
            self.awaiting_tasks = False
            self.held_ready = self.asked
        self.idle_beat, self.idle_longest = float(msg.heartbeat), float(msg.longest)
        self.idle_beat_at = time.monotonic() + self.idle_beat

    async def on_tasks(self, msg: protocol.Tasks) -> None:
        self.counts["tasks_messages"] += 1
        self.awaiting_tasks = False
        self.held_ready = 0  # answered, or pushed: the ready is no longer held
        if not msg.tasks:
            self.counts["empty_tasks"] += 1
            if self.asked > 0:  # a server of protocol 3 (nothing now): ask again later, as it expects
                self.empty_replies += 1
                delay = supervisor.poll_delay(self.empty_replies)
                self.next_ask = time.monotonic() + delay
                asyncio.get_event_loop().call_later(delay + 0.01, self.pump)
            return
        self.empty_replies = 0
        held = set(self.held_attempts())
        for spec in msg.tasks:
            if spec.attempt not in held:
                self.queue.append(spec)
                self.arrived[spec.attempt] = time.monotonic()
                if spec.more:  # a chunk: in memory only
                    self.chunks_seen = True
                else:
                    await self.vault.put("tasks", spec.attempt, json.dumps(dataclasses.asdict(spec)))

    async def on_code(self, msg: protocol.Code) -> None:
        self.counts["code_messages"] += 1
        self.codes[msg.code_hash] = msg
        text = json.dumps(protocol.to_dict(msg))
        await self.vault.put("code", msg.code_hash, text)

    async def on_ack(self, msg: protocol.Ack) -> None:
        done = [a for a in list(msg.attempts) + list(msg.ignored) if a in self.results]
        for attempt in done:
            self.results.pop(attempt, None)
            self.in_flight.discard(attempt)
        kept = [a for a in done if a not in self.chunked]  # a chunk's results were never in the vault
        self.chunked.difference_update(done)
        if kept:
            await self.vault.remove("results", json.dumps(kept))

    async def on_cancel(self, msg: protocol.Cancel) -> None:
        attempts = set(msg.attempts)
        self.cancelled.update(attempts)
        dropped = [s.attempt for s in self.queue if s.attempt in attempts or s.job == msg.job]
        self.queue = [s for s in self.queue if s.attempt not in dropped]
        for slot in list(self.pool.slots):
            if slot.attempt in attempts or (msg.job is not None and slot.job == msg.job):
                dropped.append(slot.attempt)
                self.cancelled.add(slot.attempt)
                self.pool.replace(slot)
        await self.vault.remove("tasks", json.dumps(dropped))

    def on_hold(self, msg: protocol.Hold) -> None:
        """The server's database is away: keep these results (they stay in the vault) and send them
        again once, after the delay the server chose for this volunteer, not in a storm of retries."""
        self.counts["holds"] += 1
        self.in_flight.difference_update(msg.attempts)
        self.flush_after = time.monotonic() + float(msg.retry_after)
        self.last_error = f"results held by the server for {msg.retry_after:g} s: {msg.reason}"
        asyncio.get_event_loop().call_later(float(msg.retry_after) + 0.01, self.pump)

    async def on_error(self, msg: protocol.Error) -> None:
        self.last_error = f"{msg.ref or 'message'}: {msg.message}"
        js.console.warn(f"UVM: the server refused a {self.last_error}")
        if msg.ref == "ready":  # not applied: ask again in a while, not in a loop
            self.awaiting_tasks = False
            self.next_ask = time.monotonic() + 2.0
            asyncio.get_event_loop().call_later(2.01, self.pump)
        elif msg.ref == "results":  # not acknowledged: keep them, try again a little later
            self.in_flight.clear()
            self.flush_after = time.monotonic() + 5.0
        elif msg.ref == "need_code":  # the job is gone: drop its tasks rather than hold them
            known = set(self.codes)
            gone = [s.attempt for s in self.queue if s.code_hash not in known]
            self.queue = [s for s in self.queue if s.code_hash in known]
            self.resumed.difference_update(gone)
            await self.vault.remove("tasks", json.dumps(gone))

    def save_nickname(self, nickname: str) -> None:
        async def save() -> None:
            await self.credit.set_nickname(self.volunteer, nickname)
            await self.credit.refresh(self.volunteer)  # and show the credit as it is now
            self.rendered_at = 0.0
            self.pump()

        asyncio.ensure_future(save())

    def jobs_shown(self) -> dict:
        """Name and public description of the jobs this page holds code of, by job id."""
        return {
            str(code.job): {"name": getattr(code, "name", ""), "description": getattr(code, "description", "")}
            for code in self.codes.values()
        }

    def snapshot(self) -> dict:
        """Everything the page shows, as plain data (also read by the tests)."""
        now = time.monotonic()
        return {
            "running": self.running,
            "connected": self.link.open,
            "welcomed": self.welcomed,
            "waiting": self.held_ready > 0,
            "reconnect_in": self.link.retry_in(),
            "failures": self.link.failures,
            "plan": self.plan.state(),
            "device": self.throttle_state(),
            "workers": [
                {
                    "number": s.number,
                    "ready": s.ready,
                    "attempt": s.attempt,
                    "job": s.job,
                    "index": s.index,
                    "elapsed": round(now - s.started, 1) if s.attempt else None,
                    "boot": s.boot_seconds,
                    "owner": s.owner,
                }
                for s in self.pool.slots
            ],
            "spare": None if self.pool.supply.spare is None else {"ready": self.pool.supply.spare.ready},
            "switches": self.pool.switch_count,
            "recent_switches": list(self.pool.switches),
            "dropped_messages": self.pool.dropped,
            "volunteer": self.volunteer,
            "jobs": self.jobs_shown(),
            "credit": self.credit.snapshot(),
            "queued": [s.attempt for s in self.queue],
            "queued_tasks": [s.task for s in self.queue],
            "running_tasks": [s.task for s in self.running_specs.values()],
            "kept_tasks": self.kept_tasks(),
            "restored_tasks": list(self.restored_tasks),
            "held_at_stop": list(self.held_at_stop),
            "unacked": list(self.results),
            "session": dict(self.session),
            "totals": dict(self.totals),
            "replaced": self.pool.replaced,
            "counts": dict(self.counts),
            "idle_beat": self.idle_beat,  # seconds to the next idle heartbeat while waiting
            "first_result_at": self.first_result_at,
            "settings": {
                "cpu_cap": self.settings.cpu_cap,
                "when_hidden": self.settings.when_hidden,
            },
            "last_error": self.last_error,
            "vault_note": "" if self.vault.persistent else str(self.vault.reason),
        }


async def main() -> None:
    from pyscript.js_modules import vault as vault_module

    config = document.getElementById("uvm-config").dataset
    base = str(window.location.origin)
    worker_url = (
        f"{base}/static/worker.js?pyodide={js.encodeURIComponent(config.pyodide)}"
        f"&index={js.encodeURIComponent(config.packageIndex)}&lock={js.encodeURIComponent(config.packageLock)}"
    )
    socket_url = base.replace("http", "ws", 1) + "/ws/volunteer"
    # ?spare=0 turns the pre-booted spare worker off (bench/browser.py measures job switches both ways).
    spare = str(js.URLSearchParams.new(window.location.search).get("spare")) != "0"
    vault = await vault_module.openVault()
    app = App(vault, worker_url, socket_url, spare)
    await app.restore()
    await app.read_device()
    ui.bind(app)
    window.uvm_state = create_proxy(lambda: json.dumps(app.snapshot()))
    # Timers of a hidden tab are throttled; a worker's are not: it keeps the beat (heartbeats).
    clock = js.Worker.new(f"{base}/static/clock.js?ms={int(TICK_SECONDS * 1000)}")
    clock.onmessage = create_proxy(lambda event: app.on_clock())
    window.uvm_clock = clock  # kept alive with the page
    if app.running:
        app.link.start()
    app.pump()
    if not app.running or app.plan.paused:
        app.pool.discard_prewarmed()


def start() -> None:
    """Run the volunteer page (called once by ``public/index.html``)."""
    asyncio.ensure_future(main())

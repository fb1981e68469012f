"""The page's pool of Pyodide web workers: one job per worker, a spare, timeouts, replacement.

Each worker is a ``PyWorker`` (``webapp/pyworker.py``: ``public/worker.js`` with Pyodide and
``workers/runner.py``). A worker runs the tasks of one job only: when a slot's next task belongs
to another job, its worker is terminated and the pre-booted spare takes the task (a *switch*),
and a new spare boots once every slot's worker is up. A task past its timeout is stopped the only
sure way, ``Worker.terminate()`` -- that stops ``while True: pass`` and code that catches
``BaseException`` alike -- and a fresh worker takes the slot. A worker that dies (out of memory,
a wasm trap) is handled the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import js
import protocol
import supervisor

from ..pyworker import PyWorker, Supply

BOOT_TIMEOUT = 120.0  # seconds a fresh worker may take to load Pyodide before its task fails
SWITCHES_KEPT = 20  # recent job switches kept for the page state (and bench/browser.py)


class Slot:
    """One place in the pool: its current worker and the task it runs."""

    def __init__(self, pool: Pool, number: int, worker: PyWorker) -> None:
        self.pool = pool
        self.number = number
        self.worker = worker
        self.retiring = False  # finish the current task, then stop
        self.attempt: str | None = None  # the attempt running now
        self.job: int | None = None
        self.index: int | None = None
        self.started = 0.0

    @property
    def ready(self) -> bool:
        return self.worker.ready

    @property
    def busy(self) -> bool:
        return self.attempt is not None

    @property
    def owner(self) -> object:
        """The job this slot's worker belongs to (None: no research code ran in it yet)."""
        return self.worker.job

    @property
    def boot_seconds(self) -> float | None:
        return self.worker.boot_seconds


class Pool:
    """Up to ``target`` workers (the supervisor's plan sets it) and one idle spare."""

    def __init__(self, worker_url: str, on_change, spare: bool = True) -> None:  # noqa: ANN001
        self.worker_url = worker_url
        self.on_change = on_change
        self.slots: list[Slot] = []
        self.target = 0
        self.replaced = 0  # workers replaced after a timeout or crash
        self.switches: list[dict] = []  # recent job switches: {"job", "seconds"} (terminate -> task sent)
        self.switch_count = 0
        self.supply = Supply(self._make, spare)
        self._numbers = itertools.count(1)
        self.on_update = None  # (spec, JSON text): a running task's uvm update (the page's App sets it)
        self.every = 5.0  # seconds between two updates of one task (from the server's `welcome`)

    def _make(self, prewarmed=None) -> PyWorker:  # noqa: ANN001
        worker = PyWorker(self.worker_url, self.changed, prewarmed)
        if worker.failed is not None:  # an early worker that failed to boot: start afresh
            worker.stop()
            worker = PyWorker(self.worker_url, self.changed)
        worker.on_fail = self._failed
        return worker

    def changed(self) -> None:
        self.on_change()

    def _failed(self, worker: PyWorker, message: str) -> None:
        slot = next((s for s in self.slots if s.worker is worker), None)
        if slot is not None and not slot.busy:  # a busy slot's task gets the crash and replaces it
            self.replace(slot)
        else:
            self.changed()  # a failed spare is replaced on the next top-up

    @property
    def dropped(self) -> int:
        """Messages from workers that answered nothing the page asked (dropped, never acted on)."""
        return self.supply.dropped([s.worker for s in self.slots])

    def resize(self, target: int) -> None:
        """Start workers up to ``target`` (all at once, in parallel); retire the extra ones."""
        self.target = target
        live = [s for s in self.slots if not s.retiring]
        for slot in live[target:]:
            slot.retiring = True
            if not slot.busy:
                self._remove(slot)
        for slot in self.slots:
            if slot.retiring and len(live) < target and slot in self.slots:
                slot.retiring = False
                live.append(slot)
        while len([s for s in self.slots if not s.retiring]) < target:
            self.slots.append(Slot(self, next(self._numbers), self.supply.take(self._prewarmed())))
        # The spare boots once the working slots are up, so it never delays the first task;
        # then it idles (no CPU) until a job switch or a crash takes it.
        self.supply.top_up(target > 0 and all(s.ready for s in self.slots))

    def _prewarmed(self):  # noqa: ANN202
        """A worker the page's inline script already started, if any (see public/index.html)."""
        boot = getattr(js.window, "uvmBoot", None)
        record = boot.take() if boot is not None else None
        return record if record else None

    def discard_prewarmed(self) -> None:
        """Terminate workers started early that the plan does not want (paused, say)."""
        while (record := self._prewarmed()) is not None:
            record.worker.terminate()

    def _remove(self, slot: Slot) -> None:
        if slot in self.slots:
            self.slots.remove(slot)
        self.supply.retire(slot.worker)

    def replace(self, slot: Slot) -> None:
        """Terminate ``slot``'s worker and put a fresh one in its place (if still wanted)."""
        self.replaced += 1
        self._remove(slot)
        if len([s for s in self.slots if not s.retiring]) < self.target:
            self.slots.append(Slot(self, next(self._numbers), self.supply.take()))
        self.changed()

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.ready and not s.busy and not s.retiring]

    def loaded_jobs(self) -> list:
        """The jobs the working slots' workers have loaded, idle ones first (``ready.jobs``: job
        affinity). The spare has none: no research code ran in it."""
        idle = set(self.idle())
        working = [(s.owner, s in idle) for s in self.slots if not s.retiring]
        return supervisor.loaded_jobs(working, protocol.MAX_READY_JOBS)

    def stop_all(self) -> None:
        for slot in list(self.slots):
            self._remove(slot)
        self.supply.top_up(False)
        self.target = 0

    def _switch(self, slot: Slot) -> None:
        """Give ``slot`` a worker no research code has run in (the spare, when one is up)."""
        self.supply.retire(slot.worker)
        slot.worker = self.supply.take()
        self.switch_count += 1

    async def _worker_for(self, slot: Slot, job: int, arrived: float | None) -> bool:
        """Make ``slot``'s worker one that may run ``job`` and is booted; False if it cannot be.

        A switch is recorded with its cost (old worker terminated -> new one ready for the task)
        and, when known, the time since the task arrived at the page.
        """
        if not slot.worker.claim(job):
            begun = time.monotonic()
            self._switch(slot)
            slot.worker.claim(job)
            if not slot.worker.ready:
                try:
                    await asyncio.wait_for(asyncio.shield(slot.worker.booted), BOOT_TIMEOUT)
                except TimeoutError:
                    slot.worker.fail(f"worker did not start in {BOOT_TIMEOUT:g} s")
            now = time.monotonic()
            switch = {"job": job, "seconds": round(now - begun, 4), "spare": self.supply.keep_spare}
            switch["since_arrival"] = None if arrived is None else round(now - arrived, 4)
            self.switches = [*self.switches[-(SWITCHES_KEPT - 1) :], switch]
        return slot.worker.ready and not slot.worker.stopped

    async def execute(self, slot: Slot, spec, code, arrived: float | None = None) -> dict:  # noqa: ANN001
        """Run one task on ``slot``; returns ``{result, output, error, elapsed, timeout}``, or for a
        chunk (protocol 5) ``{"outcomes": [...]}``, one per task, unless its worker failed.

        The task runs on a worker of its own job (switching workers if needed); the source goes
        along only the first time that worker sees the job. Past the task's timeout the worker is
        terminated and replaced.
        """
        slot.attempt, slot.job, slot.index = spec.attempt, spec.job, spec.index
        slot.started = time.monotonic()
        worker = slot.worker
        try:
            if not await self._worker_for(slot, spec.job, arrived):
                worker = slot.worker
                answer = {"error": worker.failed or "worker stopped", "crashed": True, "stopped": worker.stopped}
            else:
                worker = slot.worker
                answer = await self._run(worker, spec, code)
        except TimeoutError:
            seconds = f"{spec.timeout * (1 + len(spec.more)):g}"
            what = f"its chunk of {1 + len(spec.more)} tasks" if spec.more else "it"
            answer = {
                "error": f"timed out after {seconds} s: the worker running {what} was stopped",
                "timeout": True,
                "elapsed": spec.timeout,
                "crashed": True,
            }
        finally:
            slot.attempt = slot.job = slot.index = None
        if answer.get("stopped"):
            return answer
        if slot.worker is worker and (answer.get("crashed") or slot.retiring):
            self.replace(slot) if answer.get("crashed") else self._remove(slot)
        return answer

    async def _run(self, worker: PyWorker, spec, code) -> dict:  # noqa: ANN001
        payload = {
            "code_hash": spec.code_hash,
            "input": spec.input,
            "job": spec.job,
            "requirements": list(code.requirements or spec.requirements or []),
            "restore": spec.restore,  # the last checkpoint: from the server, or this page's vault
            "every": self.every,
        }
        tasks = 1 + len(spec.more)
        if spec.more:  # a chunk: every task in this one call; each has its own timeout in the runner
            del payload["input"], payload["restore"]
            payload["items"] = [{"input": item.input, "restore": item.restore} for item in spec.items()]
            payload["timeout"] = spec.timeout
        if spec.code_hash not in worker.codes:
            payload["source"] = code.source
        on_update = self.on_update
        listener = None if on_update is None else (lambda text: on_update(spec, text))
        # A chunk's tasks run one after another: the worker is stopped once all of them could have timed out.
        run = worker.run(spec.job, payload, listener)
        answer = await asyncio.wait_for(run, timeout=max(0.1, spec.timeout * tasks))
        worker.codes.add(spec.code_hash)
        return answer

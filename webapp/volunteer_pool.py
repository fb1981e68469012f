"""The page's pool of Pyodide web workers: start, feed one task at a time, time out, replace.

Each worker is ``public/worker.js`` (which loads Pyodide once and ``workers/runner.py``). A task
past its timeout is stopped the only sure way, ``Worker.terminate()`` -- that stops
``while True: pass`` and code that catches ``BaseException`` alike -- and a fresh worker takes
the slot. A worker that dies (out of memory, wasm trap) is handled the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import js
from pyodide.ffi import create_proxy, to_js

_ids = itertools.count(1)


def _js_object(value: dict):
    return to_js(value, dict_converter=js.Object.fromEntries)


class Slot:
    """One worker and what it is doing."""

    def __init__(self, pool: Pool, number: int, prewarmed=None) -> None:
        self.pool = pool
        self.number = number
        self.ready = False
        self.retiring = False  # finish the current task, then stop
        self.attempt: str | None = None  # the attempt running now
        self.job: int | None = None
        self.index: int | None = None
        self.started = 0.0
        self.codes: set[str] = set()  # job code this worker has compiled
        self.pending: dict[int, asyncio.Future] = {}
        self.boot_started = time.monotonic()
        self.boot_seconds: float | None = None
        self._on_message = create_proxy(self._message)
        self._on_error = create_proxy(self._error)
        if prewarmed is None:
            self.worker = js.Worker.new(pool.worker_url, _js_object({"type": "module"}))
        else:  # started by the page's inline script before this thread's Python was up
            self.worker = prewarmed.worker
            if prewarmed.ready:
                self.ready, self.boot_seconds = True, float(prewarmed.boot)
        self.worker.onmessage = self._on_message
        self.worker.onerror = self._on_error
        if prewarmed is not None and prewarmed.fatal:
            self._fail(f"worker failed to start: {prewarmed.fatal}")

    @property
    def busy(self) -> bool:
        return self.attempt is not None

    def _message(self, event) -> None:
        data = event.data
        kind = getattr(data, "type", None)
        if kind == "ready":
            self.ready = True
            self.boot_seconds = float(data.boot)
            self.pool.changed()
        elif kind == "fatal":
            self._fail(f"worker failed to start: {data.error}")
        else:
            future = self.pending.pop(int(data.id), None)
            if future is not None and not future.done():
                error = getattr(data, "error", None)
                if error is not None and str(error) != "undefined":
                    # Pyodide itself failed (a fatal error, a trap): this worker cannot be trusted
                    # with another task, so it is replaced like a crashed one.
                    future.set_result({"error": f"worker error: {error}", "crashed": True})
                else:
                    future.set_result(json.loads(data.result))

    def _error(self, event) -> None:
        event.preventDefault()
        self._fail(f"worker crashed: {getattr(event, 'message', '') or 'unknown error'}")

    def _fail(self, message: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_result({"error": message, "crashed": True})
        self.pending.clear()
        if not self.busy:
            self.pool.replace(self)

    def run(self, payload: dict) -> asyncio.Future:
        request_id = next(_ids)
        future = asyncio.get_event_loop().create_future()
        self.pending[request_id] = future
        message = {"id": request_id, "type": "run", "payload": payload}
        self.worker.postMessage(_js_object(message))
        return future

    def stop(self) -> None:
        self.worker.terminate()
        self.worker.onmessage = None
        self.worker.onerror = None
        self._on_message.destroy()
        self._on_error.destroy()
        for future in self.pending.values():
            if not future.done():
                future.set_result({"error": "worker stopped", "stopped": True})
        self.pending.clear()


class Pool:
    """Up to ``target`` workers; the supervisor's plan sets the target."""

    def __init__(self, worker_url: str, on_change) -> None:
        self.worker_url = worker_url
        self.on_change = on_change
        self.slots: list[Slot] = []
        self.target = 0
        self.replaced = 0  # workers replaced after a timeout or crash
        self._numbers = itertools.count(1)

    def changed(self) -> None:
        self.on_change()

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
            self.slots.append(Slot(self, next(self._numbers), self._prewarmed()))

    def _prewarmed(self):
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
        slot.stop()

    def replace(self, slot: Slot) -> None:
        """Terminate ``slot``'s worker and start a fresh one in its place (if still wanted)."""
        self.replaced += 1
        self._remove(slot)
        if len([s for s in self.slots if not s.retiring]) < self.target:
            self.slots.append(Slot(self, next(self._numbers)))
        self.changed()

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.ready and not s.busy and not s.retiring]

    def by_attempt(self, attempt: str) -> Slot | None:
        return next((s for s in self.slots if s.attempt == attempt), None)

    def stop_all(self) -> None:
        for slot in list(self.slots):
            self._remove(slot)
        self.target = 0

    async def execute(self, slot: Slot, spec, code) -> dict:
        """Run one task on ``slot``; returns ``{result, output, error, cpu, timeout}``.

        The source goes along only the first time this worker sees the job. Past the task's
        timeout the worker is terminated and replaced.
        """
        slot.attempt, slot.job, slot.index = spec.attempt, spec.job, spec.index
        slot.started = time.monotonic()
        payload = {
            "code_hash": spec.code_hash,
            "input": spec.input,
            "job": spec.job,
            "requirements": list(code.requirements or spec.requirements or []),
        }
        if spec.code_hash not in slot.codes:
            payload["source"] = code.source
        try:
            answer = await asyncio.wait_for(slot.run(payload), timeout=max(0.1, spec.timeout))
            slot.codes.add(spec.code_hash)
        except TimeoutError:
            seconds = f"{spec.timeout:g}"
            answer = {
                "error": f"timed out after {seconds} s: the worker running it was stopped",
                "timeout": True,
                "cpu": spec.timeout,
                "crashed": True,
            }
        finally:
            slot.attempt = slot.job = slot.index = None
        if answer.get("stopped"):
            return answer
        if answer.get("crashed") or slot.retiring:
            self.replace(slot) if answer.get("crashed") else self._remove(slot)
        return answer

"""One Pyodide web worker as the page sees it, and the supply of fresh ones (with a spare).

Used by the volunteer page's pool (``webapp/volunteer/pool.py``) and the dashboard's Try
(``webapp/dashboard/io.py``): one implementation of starting ``public/worker.js``, waiting for
its ``ready``, sending requests and matching answers (``webapp/calls.py``), and stopping it.

**A worker belongs to one job.** Research code is hostile to other research code, and an
interpreter that ran one job's code can carry anything into the next (patched modules,
``builtins``, files). ``PyWorker.claim`` binds a worker to the first job it runs and refuses any
other; a task of another job gets a fresh worker from ``Supply.take``. The supply keeps one
pre-booted spare, which never runs anything before it is taken, so a job switch costs a
``Worker.terminate()`` and a hand-over rather than a Pyodide boot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import js
from pyodide.ffi import create_proxy, to_js

from .calls import ANSWER_FIELDS, Calls

MAX_UNASKED = 1000  # messages nobody asked for that a worker may send before it is stopped


def js_object(value: dict):
    """A plain JS object from a Python dict (nested dicts too)."""
    return to_js(value, dict_converter=js.Object.fromEntries)


def _fields(data) -> dict:
    """The fields of a message from a worker, as plain Python scalars (anything else: None).

    ``postMessage`` clones data, so no getter of the worker's runs here; a message that is not
    an object (a bare string, a number) has no fields and is dropped as unasked.
    """
    fields: dict = {}
    for name in ANSWER_FIELDS:
        try:
            value = getattr(data, name, None)
        except Exception:  # noqa: BLE001 -- whatever was posted, it answers nothing
            value = None
        fields[name] = value if type(value) in (str, int, float) else None
    return fields


class PyWorker:
    """One ``public/worker.js``: boots Pyodide, runs requests, belongs to the first job it runs."""

    def __init__(self, url: str, on_change: Callable[[], None], prewarmed=None) -> None:  # noqa: ANN001
        self.on_change = on_change
        self.on_fail: Callable[[PyWorker, str], None] | None = None
        self.calls = Calls()
        self.job: object = None  # the job whose code this worker may run; None: no research code yet
        self.codes: set[str] = set()  # code hashes sent to (and compiled by) this worker
        self.ready = False
        self.failed: str | None = None
        self.stopped = False
        self.boot_started = time.monotonic()
        self.boot_seconds: float | None = None
        self.booted: asyncio.Future = asyncio.get_event_loop().create_future()
        self._on_message = create_proxy(self._message)
        self._on_error = create_proxy(self._error)
        if prewarmed is None:
            self.worker = js.Worker.new(url, js_object({"type": "module"}))
        else:  # started by the page's inline script before this thread's Python was up
            self.worker = prewarmed.worker
            if prewarmed.ready:
                self._mark_ready(float(prewarmed.boot))
        self.worker.onmessage = self._on_message
        self.worker.onerror = self._on_error
        if prewarmed is not None and prewarmed.fatal:
            self.fail(f"worker failed to start: {prewarmed.fatal}")

    @property
    def dropped(self) -> int:
        return self.calls.dropped

    def _mark_ready(self, seconds: float) -> None:
        self.ready, self.boot_seconds = True, seconds
        if not self.booted.done():
            self.booted.set_result(True)

    def _message(self, event) -> None:  # noqa: ANN001
        fields = _fields(event.data)
        kind = fields["type"]
        if kind == "ready" and not self.ready and self.failed is None:
            self._mark_ready(float(fields["boot"] or 0.0))
            self.on_change()
        elif kind == "fatal" and not self.ready and self.failed is None:
            self.fail(f"worker failed to start: {fields['error']}")
        elif not self.calls.settle(fields) and self.calls.dropped > MAX_UNASKED:
            # Research code can post "ready" or "fatal" too: after boot they answer nothing. A worker
            # that floods the page with such messages is stopped; its task fails with this message.
            self.fail(f"worker stopped: it sent more than {MAX_UNASKED} messages the page did not ask for")

    def _error(self, event) -> None:  # noqa: ANN001
        event.preventDefault()
        self.fail(f"worker crashed: {getattr(event, 'message', '') or 'unknown error'}")

    def fail(self, message: str) -> None:
        """Give up on this worker: open requests end as crashes and the owner is told."""
        if self.failed is not None or self.stopped:
            return
        self.failed = message
        if not self.booted.done():
            self.booted.set_result(False)
        self.calls.fail_all({"error": message, "crashed": True})
        if self.on_fail is not None:
            self.on_fail(self, message)

    def claim(self, job: object) -> bool:
        """Bind this worker to ``job``; False if it already ran another job's code."""
        if self.job is None:
            self.job = job
        return self.job == job

    def run(self, job: object, payload: dict, on_update: Callable[[str], None] | None = None) -> asyncio.Future:
        """Send one request of ``job``; its future gets the outcome dict (or a crash); ``on_update``
        gets the task's uvm updates (JSON text) while it runs."""
        if not self.claim(job):
            raise RuntimeError(f"this worker belongs to job {self.job}, not {job}")
        request_id, future = self.calls.open(on_update)
        if self.failed is not None:
            future.set_result({"error": self.failed, "crashed": True})
            return future
        self.worker.postMessage(js_object({"id": request_id, "type": "run", "payload": payload}))
        return future

    def stop(self) -> None:
        """Terminate the worker: the only sure stop (``while True: pass`` included)."""
        if self.stopped:
            return
        self.stopped = True
        self.worker.terminate()
        self.worker.onmessage = None
        self.worker.onerror = None
        self._on_message.destroy()
        self._on_error.destroy()
        if not self.booted.done():
            self.booted.set_result(False)
        self.calls.fail_all({"error": "worker stopped", "stopped": True})


class Supply:
    """Fresh workers on demand, and one pre-booted spare that has never run research code."""

    def __init__(self, make: Callable[..., PyWorker], spare: bool = True) -> None:
        self.make = make
        self.keep_spare = spare
        self.spare: PyWorker | None = None
        self.retired_dropped = 0  # unasked messages counted by workers already stopped

    def take(self, prewarmed=None) -> PyWorker:  # noqa: ANN001
        """A worker no research code has run in: the spare if there is one, else a new one."""
        if prewarmed is not None:
            return self.make(prewarmed)
        spare, self.spare = self.spare, None
        if spare is not None and spare.failed is None and spare.job is None:
            return spare
        if spare is not None:
            self.retire(spare)
        return self.make()

    def top_up(self, wanted: bool) -> None:
        """Boot a spare when ``wanted`` (and spares are on); drop it when not."""
        if self.spare is not None and (self.spare.failed is not None or not wanted):
            self.retire(self.spare)
            self.spare = None
        if wanted and self.keep_spare and self.spare is None:
            self.spare = self.make()

    def retire(self, worker: PyWorker) -> None:
        """Stop ``worker``, keeping its count of dropped messages."""
        if not worker.stopped:
            self.retired_dropped += worker.dropped
            worker.stop()

    def dropped(self, live: list[PyWorker]) -> int:
        """Messages from workers that answered nothing asked, ever, on this page."""
        spare = [self.spare] if self.spare is not None else []
        return self.retired_dropped + sum(w.dropped for w in live + spare)

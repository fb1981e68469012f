"""Requests to a web worker and their answers, matched by id. Pure Python, tested in CPython.

A worker runs research code, and research code can post anything to the page
(``import js; js.postMessage(...)``). So the page accepts from a worker only the answer to a
request it sent and still waits for, in the shape it expects; anything else is dropped and
counted (``dropped``), and the count is shown in the page's state.

Messages follow Pyodide's worker guide: ``{id, type, payload}`` to the worker; ``{id, result}``
(a JSON string) or ``{id, error}`` back. While a request runs, ``{id, type: "update", result}``
carries its task's uvm updates (a JSON string) to the listener given when it was opened.
``fields`` are the message's fields already read out of
the JS object by the caller (``webapp/pyworker.py``): plain ``str``/``int``/``float`` or None.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

ANSWER_FIELDS = ("type", "id", "result", "error", "boot")
MAX_UPDATE_CHARS = 2 * 1024 * 1024  # one update: a 1 MiB checkpoint and partials, as JSON text


class Calls:
    """Open requests of one worker, by id; answers settle them, everything else is dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.pending: dict[int, asyncio.Future] = {}
        self.listeners: dict[int, Callable[[str], None]] = {}  # request id -> who takes its updates
        self.dropped = 0
        self._ids = itertools.count(1)

    def open(self, on_update: Callable[[str], None] | None = None) -> tuple[int, asyncio.Future]:
        """A new request id and the future its answer will settle; ``on_update`` takes its updates."""
        loop = self.loop or asyncio.get_event_loop()
        request_id = next(self._ids)
        future = loop.create_future()
        self.pending[request_id] = future
        if on_update is not None:
            self.listeners[request_id] = on_update
        return request_id, future

    def settle(self, fields: dict[str, Any]) -> bool:
        """Settle the request ``fields`` answers; False (and counted) when it answers nothing we asked.

        An answer to an open request that is not an outcome (an ``error``, or a ``result`` that
        is not a JSON object) settles it as a crash: the worker cannot be trusted with more.
        """
        request_id = fields.get("id")
        if fields.get("type") == "update":
            return self.update(fields)
        if type(request_id) is not int or fields.get("type") is not None:
            return self.drop()
        self.listeners.pop(request_id, None)
        future = self.pending.pop(request_id, None)
        if future is None or future.done():
            return self.drop()
        future.set_result(_outcome(fields))
        return True

    def update(self, fields: dict[str, Any]) -> bool:
        """An update of a running request's task: to its listener, if it has one and is still open."""
        request_id, text = fields.get("id"), fields.get("result")
        listener = self.listeners.get(request_id) if type(request_id) is int else None
        if listener is None or not isinstance(text, str) or len(text) > MAX_UPDATE_CHARS:
            return self.drop()
        listener(text)
        return True

    def drop(self) -> bool:
        """Count one message that answers nothing we asked."""
        self.dropped += 1
        return False

    def fail_all(self, answer: dict) -> None:
        """Settle every open request with ``answer`` (the worker stopped or crashed)."""
        for future in self.pending.values():
            if not future.done():
                future.set_result(dict(answer))
        self.pending.clear()
        self.listeners.clear()


def _outcome(fields: dict[str, Any]) -> dict:
    error = fields.get("error")
    if isinstance(error, str):
        # Pyodide itself failed (a fatal error, a trap): the worker is replaced like a crashed one.
        return {"error": f"worker error: {error}", "crashed": True}
    result = fields.get("result")
    try:
        outcome = json.loads(result) if isinstance(result, str) else None
    except ValueError:
        outcome = None
    if not isinstance(outcome, dict):
        return {"error": "worker error: the answer is not an outcome", "crashed": True}
    if "outcomes" in outcome:  # a chunk's: one outcome per task, in order
        many = outcome["outcomes"]
        if not isinstance(many, list) or not all(isinstance(o, dict) for o in many):
            return {"error": "worker error: the answer is not a chunk's outcomes", "crashed": True}
        return {"outcomes": [_fields_of(o) for o in many]}
    return _fields_of(outcome)


def _fields_of(outcome: dict) -> dict:
    # Only what a task's outcome holds: ``stopped`` and ``crashed`` are the page's to say; ``timeout``
    # only as the runner says it of a task of a chunk that ran past its timeout.
    error, output, elapsed = outcome.get("error"), outcome.get("output"), outcome.get("elapsed")
    fields = {
        "result": outcome.get("result"),
        "output": output if isinstance(output, str) else "",
        "error": error if isinstance(error, str) else None,
        "elapsed": float(elapsed) if type(elapsed) in (int, float) else 0.0,
    }
    if outcome.get("timeout") is True and fields["error"] is not None:
        fields["timeout"] = True
    return fields

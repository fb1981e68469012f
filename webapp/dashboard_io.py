"""The dashboard's browser I/O: the JSON API over ``fetch``, NDJSON read as it streams, and the
Try worker (the volunteers' own ``public/worker.js`` and ``workers/runner.py``, one per page).

Used by ``webapp/dashboard.py``; runs only in the browser (PyScript on Pyodide).
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import js
from pyodide.ffi import create_proxy


class ApiError(Exception):
    """The API refused a request (``status`` 0: the server could not be reached)."""

    def __init__(self, status: int, message: str, body: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body if isinstance(body, dict) else {}


def _js(value: object):
    """A plain JS object/array from JSON-able Python (None -> null, not undefined)."""
    return js.JSON.parse(json.dumps(value))


async def api(method: str, path: str, body: object = None) -> object:
    """Call the JSON API with the session cookie; non-2xx raises ``ApiError`` with the server's message."""
    options: dict = {"method": method, "credentials": "same-origin", "headers": {"Accept": "application/json"}}
    if body is not None or method != "GET":  # the server refuses a cookie's POST that is not JSON (CSRF)
        options["body"] = json.dumps(body if body is not None else {})
        options["headers"]["Content-Type"] = "application/json"
    try:
        response = await js.fetch(path, _js(options))
        text = await response.text()
    except Exception:  # noqa: BLE001 -- a network error in fetch is a JS TypeError
        raise ApiError(0, "the server cannot be reached; check your connection and try again") from None
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    if not response.ok:
        message = data.get("error") if isinstance(data, dict) else None
        raise ApiError(int(response.status), message or f"the server answered {response.status}", data)
    return data


async def ndjson_rows(path: str, want=None, limit: int = 50) -> list[dict]:
    """Rows of an NDJSON download, read as it streams; stops after ``limit`` rows that ``want``.

    The preview of a million-task job reads the first kilobytes and cancels the rest.
    """
    response = await js.fetch(path, _js({"credentials": "same-origin"}))
    if not response.ok:
        raise ApiError(int(response.status), f"the server answered {response.status}")
    reader = response.body.getReader()
    decoder = js.TextDecoder.new()
    rows: list[dict] = []
    pending, finished = "", False
    try:
        while len(rows) < limit and not finished:
            chunk = await reader.read()
            if chunk.done:
                finished = True
                lines, pending = [pending], ""
            else:
                pending += str(decoder.decode(chunk.value, _js({"stream": True})))
                *lines, pending = pending.split("\n")
            for line in lines:
                if line.strip():
                    row = json.loads(line)
                    if want is None or want(row):
                        rows.append(row)
        return rows[:limit]
    finally:
        await reader.cancel()


class TryWorker:
    """One Pyodide worker for Try, started on first use and kept warm; replaced after a timeout."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worker = None
        self.ready: asyncio.Future | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 1
        self._proxy = None

    def start(self) -> asyncio.Future:
        if self.worker is None:
            loop = asyncio.get_event_loop()
            self.ready = loop.create_future()
            self.worker = js.Worker.new(self.url, _js({"type": "module"}))
            self._proxy = create_proxy(self._message)
            self.worker.onmessage = self._proxy
        return self.ready

    def _message(self, event) -> None:
        data = event.data
        kind = getattr(data, "type", None)
        if kind == "ready":
            if not self.ready.done():
                self.ready.set_result(True)
        elif kind == "fatal":
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(f"Python could not start in a worker: {data.error}"))
        else:
            future = self.pending.pop(int(data.id), None)
            if future is None or future.done():
                return
            error = getattr(data, "error", None)
            if error is not None and str(error) != "undefined":
                future.set_result({"error": f"worker error: {error}"})
            else:
                future.set_result(json.loads(str(data.result)))

    async def run(self, source: str, value: object, seconds: float) -> dict:
        await asyncio.wait_for(asyncio.shield(self.start()), 120)
        request_id, self.next_id = self.next_id, self.next_id + 1
        future = asyncio.get_event_loop().create_future()
        self.pending[request_id] = future
        code_hash = hashlib.sha256(source.encode()).hexdigest()
        payload = {"code_hash": code_hash, "input": value, "source": source, "job": None}
        self.worker.postMessage(_js({"id": request_id, "type": "run", "payload": payload}))
        try:
            return await asyncio.wait_for(future, seconds)
        except TimeoutError:
            self.stop()  # Worker.terminate() is the only sure stop
            return {"error": f"TimeoutError: main did not return within {seconds:g} s (the job's timeout)"}

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.terminate()
            self.worker.onmessage = None
            self.worker = None
        for future in self.pending.values():
            if not future.done():
                future.cancel()
        self.pending.clear()

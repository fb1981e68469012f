"""The dashboard's browser I/O: the JSON API over ``fetch``, NDJSON read as it streams, and the
Try worker (the volunteers' own ``public/worker.js`` and ``workers/runner.py``, through
``webapp/pyworker.py``).

Used by ``webapp/dashboard/main.py``; runs only in the browser (PyScript on Pyodide).
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import js

from ..pyworker import PyWorker, Supply


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
    """Try's Pyodide worker: one per version of the code, as volunteers' workers are one per job.

    Code that differs from what the current worker ran gets a fresh interpreter (the spare, kept
    booted), so nothing one version left behind (patched modules, ``builtins``) leaks into the
    next. A run past the job's timeout terminates its worker.
    """

    def __init__(self, url: str) -> None:
        self.supply = Supply(lambda prewarmed=None: PyWorker(url, self._changed, prewarmed))
        self.worker: PyWorker | None = None

    def _changed(self) -> None:
        # The spare boots after the current worker is up, so it never slows the first Try.
        self.supply.top_up(self.worker is not None and self.worker.ready)

    def start(self) -> asyncio.Future:
        """A booted (or booting) worker no code has run in yet; its ``booted`` future."""
        if self.worker is None or self.worker.failed is not None:
            self.stop()
            self.worker = self.supply.take()
        return self.worker.booted

    async def run(self, source: str, value: object, seconds: float, requirements: list | None = None) -> dict:
        code_hash = hashlib.sha256(source.encode()).hexdigest()
        if self.worker is not None and not self.worker.claim(code_hash):
            self.stop()  # other code ran in it: a fresh interpreter for this version
        booted = await asyncio.wait_for(asyncio.shield(self.start()), 120)
        if not booted:
            message = self.worker.failed if self.worker is not None else "the worker was stopped"
            raise RuntimeError(f"Python could not start in a worker: {message}")
        # the job's requirements load in the worker first (public/worker.js), as on a volunteer's
        payload = {"code_hash": code_hash, "input": value, "source": source, "job": None}
        payload["requirements"] = list(requirements or [])
        try:
            answer = await asyncio.wait_for(self.worker.run(code_hash, payload), seconds)
        except TimeoutError:
            self.stop()  # Worker.terminate() is the only sure stop
            return {"error": f"TimeoutError: main did not return within {seconds:g} s (the job's timeout)"}
        if answer.get("crashed"):
            self.stop()
        return answer

    def stop(self) -> None:
        if self.worker is not None:
            self.supply.retire(self.worker)
            self.worker = None

"""Runs research tasks inside a Pyodide web worker (and in CPython, for tests).

The JS bootstrap (``public/worker.js``) loads Pyodide once, imports this module and hands it one
request at a time as a JSON string; the answer is a JSON string too, so nothing but two strings
crosses the JS/Python boundary per task.

Each job's source is compiled once per worker and cached by its content hash; each task then
runs the compiled module in a fresh namespace and calls ``main(input)``. stdout and stderr are
captured together, capped; the result must be strict JSON (no NaN) of at most ``MAX_RESULT_BYTES``;
a failure comes back as the traceback of the research code only, without this module's frames,
with its source lines (the source is registered with ``linecache``) and the id of the job the task
belongs to (two jobs with the same code share a hash, so the compiled code is named again for the
job that runs it).

This is the only code that runs ``main(x)``: the browser's workers and ``volunteer-sim`` both use
it. The server never runs research code; it only checks what a volunteer sends back.
"""

from __future__ import annotations

import builtins
import json
import linecache
import sys
import time
import traceback
from typing import Any

# Kept local, no import cost in the worker; tests/test_runner.py checks they equal the server's.
MAX_OUTPUT_CHARS = 64 * 1024  # protocol.MAX_OUTPUT_CHARS
MAX_RESULT_BYTES = 1024 * 1024  # Config.max_result_bytes: one result, compact JSON
MAX_ERROR_CHARS = 16 * 1024
TRUNCATED = "\n[output truncated]\n"


class CappedWriter:
    """A text stream that keeps the first ``limit`` characters written to it."""

    def __init__(self, limit: int = MAX_OUTPUT_CHARS) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.truncated = False

    def write(self, text: str) -> int:
        room = self.limit - self.size
        if room > 0:
            piece = text[:room]
            self.parts.append(piece)
            self.size += len(piece)
        if len(text) > max(room, 0):
            self.truncated = True
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        return "".join(self.parts) + (TRUNCATED if self.truncated else "")


class Runner:
    """Compiled job code by content hash, and the running of one task at a time."""

    def __init__(self) -> None:
        self.code: dict[str, Any] = {}
        self.sources: dict[str, tuple[str, int | None]] = {}  # code hash -> (source, job it is named for)

    def has(self, code_hash: str) -> bool:
        return code_hash in self.code

    def load(self, code_hash: str, source: str, job: int | None = None) -> None:
        """Compile a job's source once per job; a syntax error is raised when a task of it runs."""
        if code_hash in self.code and self.sources[code_hash][1] == job:
            return
        filename = f"<job {job}>" if job is not None else f"<job {code_hash[:12]}>"
        # Tracebacks read source lines through linecache; a None mtime keeps checkcache() off it.
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
        self.sources[code_hash] = (source, job)
        try:
            self.code[code_hash] = compile(source, filename, "exec")
        except SyntaxError as exc:
            self.code[code_hash] = exc

    def run(self, code_hash: str, value: Any, job: int | None = None) -> dict:
        """Run ``main(value)`` of a loaded job (as a task of ``job``, when given); returns
        ``{result, output, error, cpu}``."""
        known = self.sources.get(code_hash)
        if job is not None and known is not None and known[1] != job:
            self.load(code_hash, known[0], job)  # same code, another job: its tracebacks name this one
        code = self.code.get(code_hash)
        if code is None:
            return _outcome(error=f"runtime error: job code {code_hash[:12]} was not loaded")
        if isinstance(code, SyntaxError):
            text = "".join(traceback.format_exception_only(type(code), code))
            return _outcome(error=text[-MAX_ERROR_CHARS:])
        out = CappedWriter()
        saved = sys.stdout, sys.stderr
        start = time.perf_counter()
        sys.stdout = sys.stderr = out
        try:
            namespace = {"__name__": "__job__", "__builtins__": builtins}
            exec(code, namespace)
            main = namespace.get("main")
            if not callable(main):
                raise NameError("the job code defines no function main(x)")
            result = main(value)
        except BaseException as exc:  # research code may raise anything, SystemExit included
            sys.stdout, sys.stderr = saved
            return _outcome(
                output=out.getvalue(),
                error=_job_traceback(exc),
                cpu=time.perf_counter() - start,
            )
        finally:
            sys.stdout, sys.stderr = saved
        cpu = time.perf_counter() - start
        try:
            encoded = json.dumps(result, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError) as exc:
            return _outcome(output=out.getvalue(), error=not_json_error(exc), cpu=cpu)
        if len(encoded) > MAX_RESULT_BYTES:
            return _outcome(output=out.getvalue(), error=too_large_error(len(encoded), MAX_RESULT_BYTES), cpu=cpu)
        return _outcome(result=json.loads(encoded), output=out.getvalue(), cpu=cpu)


def not_json_error(exc: BaseException) -> str:
    """The error of a task whose result is not strict JSON (the server words its check the same)."""
    return f"ValueError: the result of main() is not JSON-serialisable: {exc}"


def too_large_error(size: int, limit: int) -> str:
    """The error of a task whose result is too large (the server words its check the same)."""
    return f"ValueError: the result of main() is {size} bytes of JSON; the limit is {limit}"


def _outcome(result: Any = None, output: str = "", error: str | None = None, cpu: float = 0.0) -> dict:
    return {"result": result, "output": output, "error": error, "cpu": round(cpu, 6)}


def _job_traceback(exc: BaseException) -> str:
    """The traceback from the research code's first frame on; ours is noise to a researcher."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<job"):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return text[-MAX_ERROR_CHARS:]


_RUNNER = Runner()


def handle(request: str) -> str:
    """One request from the JS bootstrap (a JSON string) -> the answer (a JSON string).

    ``{"code_hash", "input", "job"?, "source"?}``: ``source`` is sent only the first time this
    worker sees a job; later tasks of the job reuse the compiled code.
    """
    data = json.loads(request)
    code_hash = data["code_hash"]
    if data.get("source") is not None and not _RUNNER.has(code_hash):
        _RUNNER.load(code_hash, data["source"], data.get("job"))
    return json.dumps(_RUNNER.run(code_hash, data.get("input"), data.get("job")), allow_nan=False)

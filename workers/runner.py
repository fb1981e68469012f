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
it. The server never runs research code; it only checks what a volunteer sends back. A chunk of a
job's tasks (protocol 5) runs in one request (``Runner.run_many``), each task as it would alone.

Long tasks: while a task runs, research code can ``import uvm`` (a module made for that one task,
see ``TaskContext``) to report progress, save a checkpoint, restore the last one and append partial
results. What it reports leaves through ``emit`` (a callable given by whoever runs the task: the
browser worker posts it to the page, volunteer-sim sends it on its socket) as one JSON text at
most every ``every`` seconds, the latest checkpoint winning. A bad call (an oversized or
non-JSON state, a progress outside [0, 1]) writes a clear message to the task's output and
returns False: it never stops the task.
"""

from __future__ import annotations

import builtins
import json
import linecache
import sys
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

# Kept local, no import cost in the worker; tests/test_runner.py checks they equal the server's.
MAX_OUTPUT_CHARS = 64 * 1024  # protocol.MAX_OUTPUT_CHARS
MAX_RESULT_BYTES = 1024 * 1024  # Config.max_result_bytes: one result, compact JSON
MAX_ERROR_CHARS = 16 * 1024
TRUNCATED = "\n[output truncated]\n"
# Same caps as server/protocol.py (kept local, as above); the server checks them again.
MAX_CHECKPOINT_BYTES = 1024 * 1024
MAX_PARTIAL_BYTES = 64 * 1024
MAX_PARTIALS_PER_TASK = 256
CHECKPOINT_EVERY = 5.0  # seconds between two updates of one task (the server says how often in `welcome`)
_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode  # made once: json.dumps makes one a call
_PLAIN = frozenset({int, float, str, bool, type(None)})


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


class TaskContext:
    """The ``uvm`` calls of one running task, and the throttled updates they produce.

    An update is ``{"state": <JSON text> | null, "progress": <0..1> | null, "partials": [...]}``;
    the first goes out at once, the next no sooner than ``every`` seconds later, carrying the
    latest checkpoint and progress and every partial appended meanwhile (latest wins).
    """

    def __init__(self, restore: str | None = None, emit: Callable[[str], Any] | None = None, every: float = 0.0):
        self._restore = restore
        self._emit = emit
        self.every = every
        self._sent_at: float | None = None
        self._state: str | None = None
        self._progress: float | None = None
        self._partials: list[Any] = []
        self.partials_total = 0

    def module(self) -> types.ModuleType:
        """A fresh ``uvm`` module whose functions act on this task only."""
        mod = types.ModuleType("uvm", "UVM Compute: progress, checkpoints and partial results of this task.")
        mod.progress = self.progress  # type: ignore[attr-defined]
        mod.checkpoint = self.checkpoint  # type: ignore[attr-defined]
        mod.restore = self.restore  # type: ignore[attr-defined]
        mod.partial = self.partial  # type: ignore[attr-defined]
        mod.MAX_CHECKPOINT_BYTES = MAX_CHECKPOINT_BYTES  # type: ignore[attr-defined]
        return mod

    def progress(self, fraction: float) -> bool:
        """Report the fraction of this task done, in [0, 1]."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
            return _refuse(f"uvm.progress: the fraction must be a number in [0, 1], not {fraction!r:.40}")
        self._progress = float(fraction)
        self._maybe_send()
        return True

    def checkpoint(self, state: Any) -> bool:
        """Save ``state`` (any JSON value, at most 1 MiB as JSON); a later attempt gets it from restore()."""
        text = _json(state, "uvm.checkpoint", MAX_CHECKPOINT_BYTES)
        if text is None:
            return False
        self._state = self._restore = text
        self._maybe_send()
        return True

    def restore(self) -> Any:
        """This task's last saved state (a fresh copy), or None if it never checkpointed."""
        return None if self._restore is None else json.loads(self._restore)

    def partial(self, value: Any) -> bool:
        """Append a partial result (JSON, at most 64 KiB) the researcher sees before the task ends."""
        if self.partials_total >= MAX_PARTIALS_PER_TASK:
            return _refuse(f"uvm.partial: at most {MAX_PARTIALS_PER_TASK} partial results per task")
        text = _json(value, "uvm.partial", MAX_PARTIAL_BYTES)
        if text is None:
            return False
        self.partials_total += 1
        self._partials.append(json.loads(text))
        self._maybe_send()
        return True

    def _maybe_send(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and self._sent_at is not None and now - self._sent_at < self.every:
            return
        if self._emit is None or (self._state is None and self._progress is None and not self._partials):
            return
        # The task's end sends what partials are left; its state and progress no longer matter.
        update: dict[str, Any] = {
            "state": None if final else self._state,
            "progress": None if final else self._progress,
        }
        update["partials"], self._partials = self._partials, []
        self._state = self._progress = None
        self._sent_at = now
        self._emit(json.dumps(update, allow_nan=False))

    def finish(self) -> None:
        """The task ended: send the partials still waiting for the throttle."""
        if self._partials:
            self._maybe_send(final=True)


def _refuse(message: str) -> bool:
    """A bad uvm call: say why in the task's output, and let the task go on."""
    print(message, file=sys.stderr)
    return False


def _json(value: Any, where: str, limit: int) -> str | None:
    """``value`` as JSON text within ``limit`` bytes, or None (with the reason in the output)."""
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        _refuse(f"{where}: the value is not JSON-serialisable: {exc}")
        return None
    size = len(text.encode())
    if size > limit:
        _refuse(f"{where}: the value is {size} bytes as JSON; the limit is {limit}")
        return None
    return text


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

    def run(self, code_hash: str, value: Any, job: int | None = None, context: TaskContext | None = None) -> dict:
        """Run ``main(value)`` of a loaded job (as a task of ``job``, when given); returns
        ``{result, output, error, elapsed}``.

        ``context`` backs the task's ``import uvm``; the module is this task's alone and is taken
        away when the task ends.
        """
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
        context = context if context is not None else TaskContext()
        sys.modules["uvm"] = context.module()
        try:
            namespace = {"__name__": "__job__", "__builtins__": builtins}
            exec(code, namespace)
            main = namespace.get("main")
            if not callable(main):
                raise NameError("the job code defines no function main(x)")
            result = main(value)
        except BaseException as exc:  # research code may raise anything, SystemExit included
            sys.stdout, sys.stderr = saved
            if isinstance(exc, Stopped):
                raise
            return _outcome(
                output=out.getvalue(),
                error=_job_traceback(exc),
                elapsed=time.perf_counter() - start,
            )
        finally:
            sys.stdout, sys.stderr = saved
            sys.modules.pop("uvm", None)
        context.finish()
        elapsed = time.perf_counter() - start
        try:
            encoded = _ENCODE(result)
        except (TypeError, ValueError, RecursionError) as exc:
            return _outcome(output=out.getvalue(), error=not_json_error(exc), elapsed=elapsed)
        if len(encoded) > MAX_RESULT_BYTES:
            return _outcome(
                output=out.getvalue(), error=too_large_error(len(encoded), MAX_RESULT_BYTES), elapsed=elapsed
            )
        # What the server gets is the JSON: a tuple comes back a list, a dict's int keys strings. A
        # number, string, bool or None is its own JSON value already (exactly these types: a subclass
        # may encode otherwise), so it is not decoded again (a trivial task's largest cost).
        value = result if type(result) in _PLAIN else json.loads(encoded)
        return _outcome(result=value, output=out.getvalue(), elapsed=elapsed)

    def run_many(
        self,
        code_hash: str,
        items: list[dict],
        job: int | None = None,
        timeout: float | None = None,
        emit: Callable[[str], Any] | None = None,
        every: float = CHECKPOINT_EVERY,
    ) -> list[dict]:
        """Run ``main(x)`` for each item of a chunk (``{"input", "restore"?}``), one after another in
        this one call; returns one outcome per item, as ``run`` gives, in order.

        Each task keeps what a task run alone has: a fresh namespace, its own output, error and
        ``uvm`` module, and its own timeout: a task that ran past ``timeout`` seconds gets a timeout
        error (``timeout: True``), as if stopped then (its result is not kept). Its ``uvm`` updates
        go to ``emit`` carrying ``"item": i``, the index of the task in the chunk.
        """
        outcomes = []
        for i, item in enumerate(items):
            restore = item.get("restore")
            tag = None if emit is None else _tagged(emit, i)
            context = TaskContext(restore if isinstance(restore, str) else None, tag, every)
            outcome = self.run(code_hash, item.get("input"), job, context)
            if timeout is not None and outcome["elapsed"] > timeout:
                outcome = _outcome(output=outcome["output"], error=timed_out_error(timeout), elapsed=timeout)
                outcome["timeout"] = True
            outcomes.append(outcome)
        return outcomes


def _tagged(emit: Callable[[str], Any], item: int) -> Callable[[str], Any]:
    """``emit`` for the ``item``-th task of a chunk: its updates say which task they are of."""
    return lambda text: emit(text[:-1] + f',"item":{item}}}')


def timed_out_error(timeout: float) -> str:
    """The error of a task of a chunk that ran past its timeout."""
    return f"timed out after {timeout:g} s"


class Stopped(BaseException):  # noqa: N818 - not an error: the carrier of the task went away
    """Raised by an ``emit`` whose task was stopped from outside (volunteer-sim's killed volunteer)."""


def not_json_error(exc: BaseException) -> str:
    """The error of a task whose result is not strict JSON (the server words its check the same)."""
    return f"ValueError: the result of main() is not JSON-serialisable: {exc}"


def too_large_error(size: int, limit: int) -> str:
    """The error of a task whose result is too large (the server words its check the same)."""
    return f"ValueError: the result of main() is {size} bytes of JSON; the limit is {limit}"


def _outcome(result: Any = None, output: str = "", error: str | None = None, elapsed: float = 0.0) -> dict:
    return {"result": result, "output": output, "error": error, "elapsed": round(elapsed, 6)}


def _job_traceback(exc: BaseException) -> str:
    """The traceback from the research code's first frame on; ours is noise to a researcher."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<job"):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return text[-MAX_ERROR_CHARS:]


_RUNNER = Runner()


def handle(request: str, emit: Callable[[str], Any] | None = None) -> str:
    """One request from the JS bootstrap (a JSON string) -> the answer (a JSON string).

    ``{"code_hash", "input", "job"?, "source"?, "restore"?, "every"?}``: ``source`` is sent only
    the first time this worker sees a job; later tasks of the job reuse the compiled code.
    ``restore`` is the JSON text of the task's last checkpoint; ``emit`` receives its updates.

    A chunk (``"items": [{"input", "restore"?}, ...]`` and ``"timeout"``, in place of ``input``) runs
    all its tasks in this one call (``Runner.run_many``); the answer is ``{"outcomes": [...]}``.
    """
    data = json.loads(request)
    code_hash = data["code_hash"]
    if data.get("source") is not None and not _RUNNER.has(code_hash):
        _RUNNER.load(code_hash, data["source"], data.get("job"))
    every = data.get("every")
    every = float(every) if isinstance(every, int | float) and not isinstance(every, bool) else CHECKPOINT_EVERY
    items = data.get("items")
    if isinstance(items, list):
        timeout = data.get("timeout")
        timeout = float(timeout) if isinstance(timeout, int | float) and not isinstance(timeout, bool) else None
        outcomes = _RUNNER.run_many(code_hash, items, data.get("job"), timeout, emit, every)
        return json.dumps({"outcomes": outcomes}, allow_nan=False)
    restore = data.get("restore")
    context = TaskContext(restore if isinstance(restore, str) else None, emit, every)
    return json.dumps(_RUNNER.run(code_hash, data.get("input"), data.get("job"), context), allow_nan=False)

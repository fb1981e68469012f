"""A synchronous client for notebooks and scripts, shaped like Dask's ``client.map``.

    client = Client("http://127.0.0.1:8080", token)
    job = client.map(fn, inputs, requirements=["numpy"], timeout=60)   # fn's source is sent
    job.wait()            # tqdm progress bar in a terminal or a notebook
    job.results()         # in input order
    for i, r in job.as_completed(): ...
    job.cancel()

Only the standard library and tqdm: HTTP with ``urllib.request``, progress by polling the job's
status (cheap: one small JSON object). The function's own source is what runs in volunteers'
browsers, so only a self-contained top-level ``def`` can be sent; anything else is refused
here, before a job exists, with a message that says why.
"""

from __future__ import annotations

import ast
import builtins
import dis
import inspect
import json
import os
import textwrap
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

TERMINAL = frozenset({"done", "failed", "cancelled"})
POLL_SECONDS = 0.25
MAX_POLL_SECONDS = 2.0
RECONNECT_SECONDS = 300.0  # how long wait() and as_completed() ride out a server that is away
TRANSIENT = frozenset({0, 502, 503, 504})  # 0: no connection


class UVMError(Exception):
    """Base class of this client's errors."""


class ApiError(UVMError):
    """The server refused a request. ``line`` is set for a syntax error in the sent code."""

    def __init__(self, status: int, message: str, body: dict | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.status = status
        self.message = message
        self.body = body or {}
        self.line = self.body.get("line")
        self.field = self.body.get("field")


class UnsendableFunction(UVMError, TypeError):
    """The function cannot run elsewhere from its source alone (lambda, closure, nested, ...)."""


class TaskError(UVMError):
    """A task failed on a volunteer; ``remote_traceback`` is the traceback from the browser."""

    def __init__(self, job: int, index: int, input: Any, remote_traceback: str, attempts: int = 0) -> None:
        last = remote_traceback.strip().splitlines()
        summary = last[-1] if last else "the task failed"
        super().__init__(
            f"task {index} of job {job} (input {_short(input)}) failed: {summary}\n\n"
            f"Remote traceback:\n{textwrap.indent(remote_traceback.rstrip(), '  ')}"
        )
        self.job = job
        self.index = index
        self.input = input
        self.remote_traceback = remote_traceback
        self.attempts = attempts


class JobCancelled(UVMError):
    """The job was cancelled before every task finished."""


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------- function -> source
def function_source(fn: Callable | str) -> str:
    """The source to send for ``fn``: its own ``def``, plus ``main = <name>`` when it is not ``main``,
    placed at its line number in its file so that remote tracebacks point at your lines.

    Raises ``UnsendableFunction`` for what cannot run from its source alone: lambdas, nested
    functions, closures, decorated or async functions, and functions that use module globals
    (imports, helpers, constants) not defined inside themselves.
    """
    if isinstance(fn, str):
        return fn
    if not isinstance(fn, types.FunctionType):
        raise UnsendableFunction(
            f"{fn!r} is not a plain Python function; define one with `def` at the top level of a module or notebook"
        )
    name = fn.__name__
    if name == "<lambda>":
        raise UnsendableFunction("a lambda cannot be sent: define the function with `def` at the top level")
    if fn.__code__.co_freevars:
        raise UnsendableFunction(
            f"{name}() is a closure over {', '.join(fn.__code__.co_freevars)}; pass those values as inputs instead"
        )
    if "<locals>" in fn.__qualname__:
        raise UnsendableFunction(
            f"{name}() is defined inside another function; define it at the top level so its source stands alone"
        )
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise UnsendableFunction(f"{name}() is async; volunteers call main(x) synchronously")
    try:
        lines, first_line = inspect.getsourcelines(fn)
        source = textwrap.dedent("".join(lines))
    except (OSError, TypeError):
        raise UnsendableFunction(
            f"the source of {name}() is not available (defined at an interactive prompt?); "
            "put it in a file or a notebook cell"
        ) from None
    tree = ast.parse(source)
    node = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(node, ast.FunctionDef) or node.name != name:
        raise UnsendableFunction(f"could not isolate the source of {name}()")
    if node.decorator_list:
        raise UnsendableFunction(f"{name}() is decorated; send the undecorated function")
    missing = sorted(_global_names(fn.__code__) - set(dir(builtins)) - {name})
    if missing:
        modules = [m for m in missing if isinstance(fn.__globals__.get(m), types.ModuleType)]
        hint = (
            f" Import modules inside the function (e.g. `import {fn.__globals__[modules[0]].__name__}` in its body)"
            if modules
            else " Define them inside the function or pass them as inputs"
        )
        raise UnsendableFunction(
            f"{name}() uses module globals that are not in its source: {', '.join(missing)}.{hint}; "
            "only the function's own source is sent."
        )
    if name != "main":
        source = source.rstrip("\n") + f"\n\n\nmain = {name}\n"
    # Annotations are never evaluated remotely (they may name types only imported here), and
    # blank lines put the def on its own line number, so remote tracebacks match your file.
    header = "from __future__ import annotations\n"
    return header + "\n" * max(0, first_line - 2) + source if first_line >= 2 else source


def _global_names(code: types.CodeType) -> set[str]:
    """Names the code (and code nested in it: comprehensions, inner defs) loads as globals."""
    names = {
        ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME", "DELETE_GLOBAL")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    # Globals assigned inside the function (``global x; x = 1``) are defined by its source.
    stored = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "STORE_GLOBAL"}
    return names - stored


def _inputs(inputs: Any) -> Any:
    """The API's ``inputs`` from a list/iterable, a ``range``, a ``Job`` (its results) or None."""
    if inputs is None:
        return None
    if isinstance(inputs, Job):
        return {"results_of": inputs.id}
    if isinstance(inputs, range):
        return {"range": [inputs.start, inputs.stop, inputs.step]}
    if isinstance(inputs, dict):
        if set(inputs) & {"range", "results_of", "after"}:
            return inputs
        raise TypeError("inputs must be a list (or iterable), a range, a Job, or None -- not a dict")
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs must be a list of inputs; wrap a single string in a list")
    if isinstance(inputs, Iterable):
        return list(inputs)
    raise TypeError(f"inputs must be a list (or iterable), a range, a Job, or None -- not {type(inputs).__name__}")


# ------------------------------------------------------------------------------------ client
class Client:
    """A researcher's connection to a UVM Compute server (token from the argument or ``UVM_TOKEN``)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        request_timeout: float = 60.0,
        reconnect: float = RECONNECT_SECONDS,
    ) -> None:
        self.url = url.rstrip("/")
        self.reconnect = reconnect  # seconds wait() keeps trying while the server is unreachable
        self.token = token or os.environ.get("UVM_TOKEN", "")
        if not self.token:
            raise UVMError("no API token: pass Client(url, token) or set UVM_TOKEN")
        self.request_timeout = request_timeout

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # ---------------------------------------------------------------------------- HTTP
    def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        data = None if body is None else json.dumps(body, allow_nan=False).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                answer = json.loads(text)
            except ValueError:
                answer = {"error": text[:500] or exc.reason}
            answer = answer if isinstance(answer, dict) else {"error": str(answer)[:500]}
            raise ApiError(exc.code, answer.get("error") or str(exc.reason), answer) from None
        except urllib.error.URLError as exc:
            raise ApiError(0, f"cannot reach {self.url}: {exc.reason}") from None
        return payload.decode() if raw else json.loads(payload or b"null")

    # ---------------------------------------------------------------------------- jobs
    def map(
        self,
        fn: Callable | str,
        inputs: Any = None,
        *,
        name: str | None = None,
        timeout: float = 60.0,
        max_attempts: int = 3,
        priority: int = 0,
        requirements: Iterable[str] = (),
        replication: int = 1,
    ) -> Job:
        """Run ``fn`` on every input in volunteers' browsers; returns the ``Job`` at once.

        ``inputs``: a list (or any iterable) of JSON values, a ``range`` (sent as a sweep, not
        expanded), a finished ``Job`` (its results, in order), or None (one task, ``fn(None)``).
        ``fn``: a self-contained top-level function, or Python source defining ``main(x)``.
        """
        code = function_source(fn)
        default_name = fn.__name__ if isinstance(fn, types.FunctionType) else ""
        body = {
            "code": code,
            "inputs": _inputs(inputs),
            "name": name if name is not None else default_name,
            "timeout": timeout,
            "max_attempts": max_attempts,
            "priority": priority,
            "requirements": list(requirements),
            "replication": replication,
        }
        created = self.request("POST", "/api/jobs", body)
        chained = isinstance(body["inputs"], dict) and not body["inputs"].keys() & {"range"}
        return Job(self, created["id"], None if chained else created.get("n_tasks"))

    def submit(self, fn: Callable | str, *args: Any, **kwargs: Any) -> Job:
        """Alias of ``map`` (Dask's name for one call is ``submit``; here every job is a map)."""
        return self.map(fn, *args, **kwargs)

    def job(self, job_id: int) -> Job:
        """A handle on an existing job of yours."""
        status = self.request("GET", f"/api/jobs/{int(job_id)}")
        return Job(self, status["id"], status["n_tasks"], status)

    def jobs(self) -> list[dict]:
        """Your jobs' statuses, newest first."""
        return self.request("GET", "/api/jobs")["jobs"]


class Job:
    """A submitted job: status, progress, results, cancel. Cheap to create; holds no connection."""

    def __init__(self, client: Client, job_id: int, n_tasks: int | None = None, status: dict | None = None) -> None:
        self.client = client
        self.id = int(job_id)
        self.n_tasks = n_tasks
        self._status = status

    def __repr__(self) -> str:
        state = self._status["state"] if self._status else "?"
        return f"<Job {self.id} {state} n_tasks={self.n_tasks}>"

    # ---------------------------------------------------------------------------- status
    def _poll_status(self, since: list) -> dict:
        """``status()`` that rides out a restarting server for ``RECONNECT_SECONDS``.

        ``since`` holds the monotonic time of the first failure in a row (or nothing).
        """
        while True:
            try:
                status = self.status()
            except ApiError as exc:
                if exc.status not in TRANSIENT:
                    raise
                since[:] = since or [time.monotonic()]
                if time.monotonic() - since[0] > self.client.reconnect:
                    raise
                time.sleep(min(MAX_POLL_SECONDS * 2, max(POLL_SECONDS, time.monotonic() - since[0])))
                continue
            since.clear()
            return status

    def status(self) -> dict:
        self._status = self.client.request("GET", f"/api/jobs/{self.id}")
        self.n_tasks = self._status["n_tasks"]
        return self._status

    @property
    def state(self) -> str:
        return self.status()["state"]

    def done(self) -> bool:
        return self.state in TERMINAL

    def wait(self, timeout: float | None = None, progress: bool = True) -> dict:
        """Block until the job ends (done, failed or cancelled); a tqdm bar shows progress.

        Returns the final status. Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        bar = None
        end = None if timeout is None else time.monotonic() + timeout
        delay = POLL_SECONDS
        failing: list = []
        try:
            while True:
                status = self._poll_status(failing)
                finished = status["counts"]["done"] + status["counts"]["failed"]
                if progress:
                    bar = bar or _progress_bar(self.id, status)
                    bar.total = status["n_tasks"]
                    bar.update(finished - bar.n)
                    bar.set_postfix(
                        failed=status["counts"]["failed"], volunteers=status.get("volunteers", 0), refresh=False
                    )
                if status["state"] in TERMINAL:
                    return status
                if end is not None and time.monotonic() > end:
                    raise TimeoutError(f"job {self.id} did not finish in {timeout:g} s: {status['counts']}")
                time.sleep(delay)
                delay = min(delay * 1.25, MAX_POLL_SECONDS)
        finally:
            if bar is not None:
                bar.close()

    # --------------------------------------------------------------------------- results
    def rows(self) -> list[dict]:
        """Every task's row in input order: ``{index, input, state, result, error, output}``."""
        return self.client.request("GET", f"/api/jobs/{self.id}/results?format=json")

    def results(self, raise_errors: bool = True, timeout: float | None = None, progress: bool = True) -> list:
        """The results in input order, after waiting for the job to end.

        A failed task raises ``TaskError`` (the first one, with its remote traceback); with
        ``raise_errors=False`` a failed task's place holds its ``TaskError`` instead.
        """
        status = self.wait(timeout=timeout, progress=progress)
        rows = self.rows()
        out = []
        for row in rows:
            if row["state"] == "done":
                out.append(row["result"])
                continue
            error = self._task_error(row)
            if raise_errors:
                raise error
            out.append(error)
        if status["state"] == "cancelled" and raise_errors:
            raise JobCancelled(f"job {self.id} was cancelled; {status['counts']['done']} tasks had finished")
        return out

    def _task_error(self, row: dict) -> UVMError:
        if row["state"] == "failed":
            return TaskError(self.id, row["index"], row["input"], row.get("error") or "", row.get("attempts", 0))
        return JobCancelled(f"task {row['index']} of job {self.id} did not run ({row['state']})")

    def as_completed(self, raise_errors: bool = True, timeout: float | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` as tasks finish, in completion order (roughly).

        A failed task raises ``TaskError`` when reached (or is yielded as ``(index, TaskError)``
        with ``raise_errors=False``).
        """
        seen: set[int] = set()
        end = None if timeout is None else time.monotonic() + timeout
        delay = POLL_SECONDS
        last_finished = -1
        failing: list = []
        while True:
            status = self._poll_status(failing)
            finished = status["counts"]["done"] + status["counts"]["failed"]
            terminal = status["state"] in TERMINAL
            if finished != last_finished or terminal:
                last_finished = finished
                for row in self.rows():
                    if row["index"] in seen or row["state"] not in ("done", "failed"):
                        continue
                    seen.add(row["index"])
                    if row["state"] == "done":
                        yield row["index"], row["result"]
                    elif raise_errors:
                        raise self._task_error(row)
                    else:
                        yield row["index"], self._task_error(row)
            if terminal:
                return
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {self.id} did not finish in {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 1.25, MAX_POLL_SECONDS)

    def errors(self) -> dict:
        """Failed tasks and errors grouped by message: ``{errors: [...], groups: [...]}``."""
        return self.client.request("GET", f"/api/jobs/{self.id}/errors")

    def download(self, fmt: str = "csv", path: str | None = None) -> str:
        """The results file as text (txt, json, ndjson or csv); also written to ``path`` if given."""
        text = self.client.request("GET", f"/api/jobs/{self.id}/results?format={urllib.parse.quote(fmt)}", raw=True)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    # --------------------------------------------------------------------------- control
    def cancel(self) -> bool:
        """Cancel the job; True if it was still running."""
        answer = self.client.request("POST", f"/api/jobs/{self.id}/cancel")
        return bool(answer.get("cancelled"))

    def retry(self) -> int:
        """Queue the failed tasks again; returns how many."""
        return int(self.client.request("POST", f"/api/jobs/{self.id}/retry")["retried"])

    def then(self, fn: Callable | str, **options: Any) -> Job:
        """A pipeline stage: ``fn`` runs on each result of this job as soon as that task is done."""
        return self.client.map(fn, {"after": self.id}, **options)

    def map(self, fn: Callable | str, **options: Any) -> Job:
        """A new job over this (finished) job's results, in order; failed tasks are skipped."""
        return self.client.map(fn, {"results_of": self.id}, **options)


def _progress_bar(job_id: int, status: dict):  # noqa: ANN202
    from tqdm.auto import tqdm

    return tqdm(total=status["n_tasks"], desc=f"job {job_id}", unit="task", dynamic_ncols=True, leave=True)

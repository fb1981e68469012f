"""A synchronous client for notebooks and scripts, shaped like Dask's ``client.map``.

    client = Client("http://127.0.0.1:8080", token)
    job = client.map(fn, inputs, requirements=["numpy"], timeout=60)   # fn's source is sent
    job.wait()            # tqdm progress bar in a terminal or a notebook
    job.results()         # in input order
    for i, r in job.as_completed(): ...
    job.cancel()

HTTP with ``urllib.request``; progress follows the server's events websocket (aiohttp, in a
thread), with a status poll as the fallback while the socket is away. ``as_completed`` asks which
tasks finished and downloads each result once, by index range. The function's own source is what runs in volunteers'
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
import queue
import textwrap
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

TERMINAL = frozenset({"done", "failed", "cancelled"})
POLL_SECONDS = 0.25
MAX_POLL_SECONDS = 2.0
RECONNECT_SECONDS = 300.0  # how long wait() and as_completed() ride out a server that is away
QUIET_SECONDS = 5.0  # with the events socket up, poll once after this long without an event
NO_VOLUNTEER_SECONDS = 10.0  # warn once when nobody has worked on a job for this long
RESULTS_PAGE = 5000  # rows per results request in as_completed
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


class NoVolunteersWarning(UserWarning):
    """Nobody has worked on a job for a while: no volunteer is connected, or all are busy elsewhere."""


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
        replication: int | str | None = None,
        quorum: int | None = None,
        max_replicas: int | None = None,
        tolerance: dict[str, float] | None = None,
    ) -> Job:
        """Run ``fn`` on every input in volunteers' browsers; returns the ``Job`` at once.

        ``inputs``: a list (or any iterable) of JSON values, a ``range`` (sent as a sweep, not
        expanded), a finished ``Job`` (its results, in order), or None (one task, ``fn(None)``).
        ``fn``: a self-contained top-level function, or Python source defining ``main(x)``.
        ``replication``: 1-10 volunteers per task, a ``quorum`` of them agreeing, or "adaptive"
        (trusted volunteers are spot-checked); None: the server's default. ``tolerance``:
        ``{"rtol", "atol"}`` for comparing float results.
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
        }
        options = {"replication": replication, "quorum": quorum, "max_replicas": max_replicas, "tolerance": tolerance}
        body.update({k: v for k, v in options.items() if v is not None})
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
        self._idle_since: float | None = None
        self._warned = False

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

    def progress(self) -> dict[int, float]:
        """The progress its running tasks last reported (``uvm.progress``): ``{task index: fraction}``."""
        return {int(p["index"]): float(p["progress"]) for p in self.status().get("progress") or []}

    def partials(self) -> dict[int, list]:
        """The partial results each task appended so far (``uvm.partial``), finished or not: ``{index: [...]}``."""
        return {row["index"]: row["partials"] for row in self.rows() if row.get("partials")}

    def done(self) -> bool:
        return self.state in TERMINAL

    def wait(self, timeout: float | None = None, progress: bool = True) -> dict:
        """Block until the job ends (done, failed or cancelled); a tqdm bar shows progress.

        Returns the final status. Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        bar = None
        try:
            for status in self._statuses(timeout):
                if progress:
                    bar = bar or _progress_bar(self.id, status)
                    bar.total = status["n_tasks"]
                    bar.update(status["counts"]["done"] + status["counts"]["failed"] - bar.n)
                    counts = status["counts"]
                    bar.set_postfix(  # honest counts: computed now, apart from the prefetched (leased)
                        failed=counts["failed"],
                        running=counts.get("running", 0),
                        prefetched=counts.get("leased", 0),
                        volunteers=status.get("volunteers", 0),
                        refresh=False,
                    )
                    bar.set_description(
                        f"job {self.id}" + (f" ({waiting})" if (waiting := waiting_note(status)) else "")
                    )
                if status["state"] in TERMINAL:
                    return status
            raise AssertionError("unreachable: _statuses ends only on a terminal state")  # pragma: no cover
        finally:
            if bar is not None:
                bar.close()

    def _statuses(self, timeout: float | None) -> Iterator[dict]:
        """The job's status now and at every change until it ends, from the events websocket;
        polled (with backoff) while the socket is away, and once per quiet spell when it is up."""
        end = None if timeout is None else time.monotonic() + timeout
        failing: list = []
        delay = POLL_SECONDS
        status = self._poll_status(failing)
        with _EventFeed(self.client, self.id) as feed:
            while True:
                self._warn_if_unattended(status)
                yield status
                if status["state"] in TERMINAL:
                    return
                if end is not None and time.monotonic() > end:
                    raise TimeoutError(f"job {self.id} did not finish in {timeout:g} s: {status['counts']}")
                wait = QUIET_SECONDS if feed.live else delay
                if end is not None:
                    wait = max(0.0, min(wait, end - time.monotonic()))
                pushed = feed.next(wait)
                if pushed is not None:
                    status = self._status = pushed
                    delay = POLL_SECONDS
                else:
                    status = self._poll_status(failing)
                    delay = min(delay * 1.25, MAX_POLL_SECONDS)

    def _warn_if_unattended(self, status: dict) -> None:
        """Warn once when the job has waited ``NO_VOLUNTEER_SECONDS`` with nobody working on it."""
        idle = status.get("volunteers", 0) == 0 and status["counts"].get("running", 0) == 0
        if status["state"] in TERMINAL or not idle:
            self._idle_since = None
            return
        self._idle_since = self._idle_since or time.monotonic()
        if not self._warned and time.monotonic() - self._idle_since >= NO_VOLUNTEER_SECONDS:
            self._warned = True
            warnings.warn(
                f"job {self.id}: no volunteer has worked on it for {NO_VOLUNTEER_SECONDS:g} s. Volunteers join by "
                f"opening {self.client.url}/ in a browser: share that link (or run `uvm-compute volunteer-sim` "
                "for a trusted test job).",
                NoVolunteersWarning,
                stacklevel=4,
            )

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

        Each result is downloaded once: on every change the client asks which tasks finished
        since it last looked and fetches only those, by index range. A failed task raises
        ``TaskError`` when reached (or is yielded as ``(index, TaskError)`` with ``raise_errors=False``).
        """
        tracker = _Finished()
        for status in self._statuses(timeout):
            finished = status["counts"]["done"] + status["counts"]["failed"]
            if finished > tracker.count or status["state"] in TERMINAL:
                for row in self._new_rows(tracker):
                    if row["state"] == "done":
                        yield row["index"], row["result"]
                    elif raise_errors:
                        raise self._task_error(row)
                    else:
                        yield row["index"], self._task_error(row)

    def _new_rows(self, tracker: _Finished) -> Iterator[dict]:
        """Rows of tasks finished since the tracker last looked, each fetched once."""
        start: int | None = tracker.frontier
        while start is not None:
            answer = self.client.request("GET", f"/api/jobs/{self.id}/finished?start={start}")
            for first, stop in tracker.unseen(answer["runs"]):
                for page in range(first, stop, RESULTS_PAGE):
                    limit = min(RESULTS_PAGE, stop - page)
                    path = f"/api/jobs/{self.id}/results?format=json&start={page}&limit={limit}"
                    rows = self.client.request("GET", path)
                    for row in rows:
                        if row["state"] in ("done", "failed") and tracker.add(row["index"]):
                            yield row
            start = answer["next"]

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


class _Finished:
    """The indices ``as_completed`` has yielded: everything below ``frontier`` plus a sparse set."""

    def __init__(self) -> None:
        self.frontier = 0
        self.above: set[int] = set()
        self.count = 0

    def add(self, index: int) -> bool:
        if index < self.frontier or index in self.above:
            return False
        self.above.add(index)
        self.count += 1
        while self.frontier in self.above:
            self.above.discard(self.frontier)
            self.frontier += 1
        return True

    def unseen(self, runs: list[list[int]]) -> Iterator[tuple[int, int]]:
        """The parts of the runs ``[a, b)`` not yielded yet, as ``(first, stop)`` ranges.

        Lazy: the caller adds the rows of each range before the next is made, which may move
        indices from ``above`` to below ``frontier``; both count as seen."""
        for a, b in runs:
            first = None
            for index in range(max(a, self.frontier), b):
                if index < self.frontier or index in self.above:
                    if first is not None:
                        yield first, index
                        first = None
                elif first is None:
                    first = index
            if first is not None:
                yield first, b


class _EventFeed:
    """A job's status as the server pushes it on ``/api/events``, read by a thread.

    ``next(timeout)`` returns the newest pushed status, or None when nothing came in time (or
    the socket is away: ``live`` says which). The thread reconnects with backoff until closed.
    """

    def __init__(self, client: Client, job_id: int) -> None:
        base = client.url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        self.url = f"{base}/api/events?job={job_id}"
        self.headers = {"Authorization": f"Bearer {client.token}"}
        self.updates: queue.Queue = queue.Queue()
        self.live = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"uvm-events-{job_id}", daemon=True)

    def __enter__(self) -> _EventFeed:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._thread.join(timeout=5)

    def next(self, timeout: float) -> dict | None:
        try:
            status = self.updates.get(timeout=timeout)
        except queue.Empty:
            return None
        while not self.updates.empty():  # only the newest matters
            status = self.updates.get_nowait()
        return status

    def _run(self) -> None:
        import asyncio

        asyncio.run(self._follow())

    async def _follow(self) -> None:

        import aiohttp

        backoff = POLL_SECONDS
        async with aiohttp.ClientSession(headers=self.headers) as session:
            while not self._closed.is_set():
                try:
                    async with session.ws_connect(self.url, heartbeat=30) as ws:
                        self.live, backoff = True, POLL_SECONDS
                        while not self._closed.is_set():
                            try:
                                message = await ws.receive(timeout=0.25)
                            except TimeoutError:
                                continue
                            if message.type != aiohttp.WSMsgType.TEXT:
                                break
                            event = json.loads(message.data)
                            if isinstance(event, dict) and event.get("type") == "job":
                                self.updates.put({k: v for k, v in event.items() if k != "type"})
                except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                    pass
                self.live = False
                self._closed.wait(backoff)
                backoff = min(backoff * 2, MAX_POLL_SECONDS * 4)


def waiting_note(status: dict) -> str:
    """ "N results waiting for a second volunteer to confirm" when results await confirmation
    (under replication, one volunteer -- or two tabs of one browser -- cannot confirm its own)."""
    n = (status.get("validation") or {}).get("pending_validation", 0)
    if not n:
        return ""
    return f"{n} result{'s' if n != 1 else ''} waiting for a second volunteer to confirm"


def _progress_bar(job_id: int, status: dict):  # noqa: ANN202
    from tqdm.auto import tqdm

    return tqdm(total=status["n_tasks"], desc=f"job {job_id}", unit="task", dynamic_ncols=True, leave=True)

"""The Python client against a live server with simulated volunteers (SQLite + in-process queue).

The client is synchronous (urllib); it runs in a thread while the server and the simulated
volunteers run on the test's event loop.
"""

from __future__ import annotations

import asyncio
import csv
import inspect
import io
import json
import math
from typing import Annotated

import pytest

from tests.test_dashboard_api import redis_url  # noqa: F401 -- Redis db 5 for these tests
from uvm_compute import ApiError, Client, TaskError, UnsendableFunction, function_source

SCALE = 3


@pytest.fixture
def backend() -> str:
    """The client speaks HTTP only; the backend pair is covered by the server's own tests."""
    return "sqlite"


def cube(x):
    return {"x": x, "cube": x**3}


def fragile(x):
    if x == 3:
        raise ValueError(f"bad input {x}")
    return x * 2


def slow(x):
    import time

    time.sleep(0.05)
    return x


def stage_one(x: Annotated[int, "not importable remotely"]) -> int:
    return x + 1


def stage_two(x):
    return x * 10


def uses_module_global(x):
    return math.sqrt(x)


def uses_constant(x):
    return x * SCALE


def imports_inside(x):
    import math

    return [math.isqrt(i) for i in range(x)] + [abs(-x), sorted([3, 1])]


async def coroutine(x):
    return x


def decorated(fn):
    return fn


@decorated
def wrapped(x):
    return x


async def wait_for(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


async def test_map_progress_order_and_remote_traceback(serve, volunteers, capsys):
    api, _ = await serve()
    client = Client(api.url, api.token)
    volunteers(api.url, 3)

    job = await asyncio.to_thread(client.map, cube, list(range(40)), timeout=30)
    assert job.n_tasks == 40
    status = await asyncio.to_thread(job.wait)
    assert status["state"] == "done"
    progress = capsys.readouterr().err
    assert f"job {job.id}" in progress and "40/40" in progress  # the tqdm bar
    results = await asyncio.to_thread(job.results, progress=False)
    assert results == [{"x": x, "cube": x**3} for x in range(40)]
    assert (await api.job(job.id))["name"] == "cube"

    seen = await asyncio.to_thread(lambda: dict(job.as_completed()))
    assert seen == {i: {"x": i, "cube": i**3} for i in range(40)}
    table = list(csv.DictReader(io.StringIO(await asyncio.to_thread(job.download, "csv"))))
    assert [json.loads(r["result"])["cube"] for r in table] == [x**3 for x in range(40)]

    failing = await asyncio.to_thread(client.map, fragile, range(6), max_attempts=1)
    with pytest.raises(TaskError) as info:
        await asyncio.to_thread(failing.results, progress=False)
    err = info.value
    assert err.index == 3 and err.input == 3
    assert "ValueError: bad input 3" in err.remote_traceback
    raise_line = inspect.getsourcelines(fragile)[1] + 2
    assert f"line {raise_line}, in fragile" in err.remote_traceback  # the line in this file
    assert "Traceback" in err.remote_traceback
    assert "Remote traceback" in str(err)
    partial = await asyncio.to_thread(failing.results, raise_errors=False, progress=False)
    assert partial[:3] == [0, 2, 4] and isinstance(partial[3], TaskError) and partial[4:] == [8, 10]
    with pytest.raises(TaskError):
        await asyncio.to_thread(lambda: list(failing.as_completed()))


async def test_cancel_and_job_handles(serve, volunteers):
    api, _ = await serve()
    client = Client(api.url, api.token)
    job = await asyncio.to_thread(client.map, slow, list(range(300)))
    volunteers(api.url, 1)
    assert await asyncio.to_thread(job.cancel) is True
    status = await asyncio.to_thread(job.wait, 30, False)
    assert status["state"] == "cancelled"
    again = await asyncio.to_thread(client.job, job.id)
    assert again.id == job.id and again.n_tasks == 300
    assert job.id in [j["id"] for j in await asyncio.to_thread(client.jobs)]


async def test_bad_code_and_inputs_raise_api_errors(serve):
    api, _ = await serve()
    client = Client(api.url, api.token)
    with pytest.raises(ApiError) as info:
        await asyncio.to_thread(client.map, "def main(x):\n    return x +\n", [1])
    assert info.value.status == 400 and info.value.line == 2 and "SyntaxError" in str(info.value)
    with pytest.raises(ApiError) as info:
        await asyncio.to_thread(client.map, cube, [], timeout=5)
    assert info.value.field == "inputs"
    with pytest.raises(TypeError, match="not a dict"):
        client.map(cube, {"a": 1})
    with pytest.raises(ApiError) as info:
        await asyncio.to_thread(Client(api.url, "uvm_wrong").jobs)
    assert info.value.status == 401


def test_unsendable_functions_are_refused():
    def nested(x):
        return x

    offset = 3

    def closure(x):
        return x + offset

    cases = [
        (lambda x: x, "lambda"),
        (nested, "inside another function"),
        (closure, "closure over offset"),
        (uses_module_global, "module globals that are not in its source: math"),
        (uses_constant, "SCALE"),
        (wrapped, "decorated"),
        (coroutine, "is async"),
        (print, "not a plain Python function"),
    ]
    for fn, message in cases:
        with pytest.raises(UnsendableFunction, match=message):
            function_source(fn)
    assert "import math` in its body" in _message(uses_module_global)


def _message(fn) -> str:
    try:
        function_source(fn)
    except UnsendableFunction as exc:
        return str(exc)
    raise AssertionError("not refused")


def test_sendable_source_is_aliased_as_main():
    source = function_source(imports_inside)
    first = inspect.getsourcelines(imports_inside)[1]
    assert source.splitlines()[first - 1] == "def imports_inside(x):"
    assert source.startswith("from __future__ import annotations\n")
    assert source.rstrip().endswith("main = imports_inside")
    namespace: dict = {}
    exec(compile(source, "<sent>", "exec"), namespace)  # noqa: S102 -- our own function
    assert namespace["main"](4) == [0, 1, 1, 1, 4, [1, 3]]
    assert function_source("def main(x):\n    return x\n") == "def main(x):\n    return x\n"


async def test_chained_job_and_declared_pipeline(serve, volunteers):
    api, _ = await serve()
    client = Client(api.url, api.token)
    first = await asyncio.to_thread(client.map, stage_one, range(6))
    piped = await asyncio.to_thread(first.then, stage_two)  # declared before anything ran
    assert (await asyncio.to_thread(piped.status))["n_tasks"] == 6
    volunteers(api.url, 2)
    assert await asyncio.to_thread(piped.results, progress=False) == [(x + 1) * 10 for x in range(6)]
    assert await asyncio.to_thread(first.results, progress=False) == [x + 1 for x in range(6)]
    chained = await asyncio.to_thread(client.map, stage_two, first)  # a finished job's results
    again = await asyncio.to_thread(first.map, stage_one)
    assert await asyncio.to_thread(chained.results, progress=False) == [(x + 1) * 10 for x in range(6)]
    assert await asyncio.to_thread(again.results, progress=False) == [x + 2 for x in range(6)]
    status = await asyncio.to_thread(chained.status)
    assert status["parent_job_id"] == first.id


def test_wait_rides_out_an_unreachable_server_then_gives_up():
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens here
    client = Client(f"http://127.0.0.1:{port}", "uvm_token", reconnect=0.6)
    started = time.monotonic()
    with pytest.raises(ApiError, match="cannot reach"):
        client.job(1)  # a single request fails at once
    assert time.monotonic() - started < 0.5
    from uvm_compute import Job

    with pytest.raises(ApiError, match="cannot reach"):
        Job(client, 1).wait(progress=False)  # keeps trying for `reconnect` seconds
    assert 0.6 <= time.monotonic() - started < 5


async def test_wait_survives_a_server_restart(aiohttp_server, make_config, volunteers):  # noqa: F811
    from server.web.app import create_app
    from tests.conftest import add_researcher

    config = make_config()
    first = await aiohttp_server(create_app(config))
    token = await add_researcher(first.app, "restart@example.org")
    url, port = str(first.make_url("")).rstrip("/"), first.port
    client = Client(url, token, reconnect=30)
    job = await asyncio.to_thread(client.map, cube, list(range(10)))
    waiting = asyncio.ensure_future(asyncio.to_thread(job.wait, 60, False))
    await asyncio.sleep(0.3)
    await first.close()  # the server goes away while the client waits
    await asyncio.sleep(1.0)
    assert not waiting.done()
    second = await aiohttp_server(create_app(config), port=port)
    try:
        volunteers(url, 2)
        status = await asyncio.wait_for(waiting, 30)
        assert status["state"] == "done"
        assert await asyncio.to_thread(job.results, progress=False) == [{"x": x, "cube": x**3} for x in range(10)]
    finally:
        await second.close()


async def counted_server(aiohttp_server, make_config) -> tuple[str, str, list[tuple[str, dict]]]:  # noqa: F811
    """A server whose every request is logged as (path, query) by an outer middleware."""
    from aiohttp import web

    from server.web.app import create_app
    from tests.conftest import add_researcher

    log: list[tuple[str, dict]] = []

    @web.middleware
    async def count(request, handler):  # noqa: ANN001, ANN202
        log.append((request.path, dict(request.query)))
        return await handler(request)

    app = create_app(make_config())
    app.middlewares.insert(0, count)
    server = await aiohttp_server(app)
    token = await add_researcher(app, "counted@example.org")
    return str(server.make_url("")).rstrip("/"), token, log


async def test_as_completed_downloads_each_result_once(aiohttp_server, make_config, volunteers):  # noqa: F811
    url, token, log = await counted_server(aiohttp_server, make_config)
    client = Client(url, token)
    n = 5000
    job = await asyncio.to_thread(client.map, "def main(x):\n    return x * 3\n", range(n))
    volunteers(url, 4)
    seen = await asyncio.to_thread(lambda: list(job.as_completed(timeout=120)))
    assert sorted(seen) == [(i, i * 3) for i in range(n)]
    fetched = [(int(q["start"]), int(q["limit"])) for path, q in log if path.endswith("/results")]
    assert sum(limit for _, limit in fetched) == n  # every row asked for once ...
    covered = sorted(i for start, limit in fetched for i in range(start, start + limit))
    assert covered == list(range(n))  # ... and no range twice
    assert any(path.endswith("/finished") for path, _ in log)


def test_finished_ranges_skip_what_was_yielded_while_they_were_made() -> None:
    """``unseen`` is lazy: rows yielded for one range can move later indices below the frontier
    (11 was seen out of order, then 0-10 arrived); those are not asked for again."""
    from uvm_compute.client import _Finished

    tracker = _Finished()
    assert tracker.add(10) and tracker.add(11)
    asked = []
    for first, stop in tracker.unseen([[0, 20]]):
        asked.append((first, stop))
        for index in range(first, stop):
            assert tracker.add(index)
    assert asked == [(0, 10), (12, 20)]
    assert tracker.frontier == 20 and tracker.count == 20 and not tracker.above


async def test_wait_follows_the_events_socket_instead_of_polling(aiohttp_server, make_config, volunteers):  # noqa: F811
    url, token, log = await counted_server(aiohttp_server, make_config)
    client = Client(url, token)
    job = await asyncio.to_thread(client.map, slow, list(range(60)))
    volunteers(url, 2)  # ~1.5 s of work: a polling client would ask for the status ~8 times
    status = await asyncio.to_thread(job.wait, 60, False)
    assert status["state"] == "done" and status["counts"]["done"] == 60
    polls = [path for path, _ in log if path == f"/api/jobs/{job.id}"]
    assert len(polls) <= 2, polls  # the first status, and at most one quiet-spell check
    assert any(path == "/api/events" for path, _ in log)


async def test_a_job_nobody_works_on_warns_once(serve, monkeypatch):
    import uvm_compute.client as client_module
    from uvm_compute import NoVolunteersWarning

    monkeypatch.setattr(client_module, "NO_VOLUNTEER_SECONDS", 0.5)
    api, _ = await serve()
    client = Client(api.url, api.token)
    job = await asyncio.to_thread(client.map, cube, [1, 2])

    def wait_briefly() -> list:
        expected = r"no volunteer has worked on it .* share that link"
        with pytest.warns(NoVolunteersWarning, match=expected) as caught, pytest.raises(TimeoutError):
            job.wait(timeout=1.5, progress=False)
        return list(caught)

    caught = await asyncio.to_thread(wait_briefly)
    assert len([w for w in caught if issubclass(w.category, NoVolunteersWarning)]) == 1
    assert api.url in str(caught[0].message)


async def test_readme_snippet_runs_as_written(serve, volunteers, tmp_path):
    import os
    import re
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Python client") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    api, _ = await serve()
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("http://127.0.0.1:8080", api.url))
    volunteers(api.url, 4)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env={**os.environ, "UVM_TOKEN": api.token},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert re.fullmatch(r"1000 means, first 0\.\d{4}\n", out.decode()), out

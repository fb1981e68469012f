"""Benchmark: the volunteer page in headless Chromium against a real server (SQLite default).

Prints numbers; asserts nothing. Measures:
- page open -> first result, cold (fresh browser profile) and warm (HTTP cache filled);
- per-task overhead for a trivial task (one worker, 300 tasks, after warm-up);
- worker utilisation with 1-second tasks (one worker): CPU seconds given / wall seconds;
- throughput of a CPU-bound task with 1 and 2 workers (hardwareConcurrency faked as 2 and 3);
- the cost of a job switch (one worker; a task of a new job arrives -> it starts on a fresh
  interpreter), with the pre-booted spare worker and without it (``/?spare=0``);
- optionally (``--mpy DIR``, an installed ``@micropython/micropython-webassembly-pyscript``):
  PyScript main-thread start-up on MicroPython vs Pyodide, and whether protocol.py imports.

    .venv/bin/python bench/browser.py [--only-switch] [--mpy /path/to/node_modules/@micropython/...-pyscript]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import cpu_seconds  # noqa: E402
from e2e.conftest import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    LiveServer,
    _cli,
    _wait_healthy,
    fake_device,
    free_port,
    state,
)

AUTOSTART = (
    "localStorage.setItem('uvm.settings', JSON.stringify({running: true, cpu_cap: 100, when_hidden: 'continue'}));"
)
TRIVIAL = "def main(x):\n    return x\n"
ONE_SECOND = """
import time

def main(x):
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        pass
    return x
"""
CPU_BOUND = """
def main(x):
    return sum(i * i for i in range(150_000 + x))
"""


def start_server(data: Path, chunk_target: float | None = None, profile: str | None = None) -> LiveServer:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("UVM_")}
    env["UVM_DATA_DIR"] = str(data)
    env["UVM_DEFAULT_REPLICATION"] = "1"  # one page volunteers: no second volunteer to replicate with
    if chunk_target is not None:  # 0: no chunked hand-out (protocol 5), every task its own lease and worker call
        env["UVM_CHUNK_TARGET"] = str(chunk_target)
    token = _cli(env, "researcher", "add", "bench@example.org", "--password-stdin", stdin="bench-password\n")
    port = free_port()
    log = data / "server.log"
    process = subprocess.Popen(
        [
            sys.executable,
            *(("-m", "cProfile", "-o", profile) if profile else ()),
            *("-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)),
        ],
        env=env,
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    server = LiveServer(f"http://127.0.0.1:{port}", token.strip().splitlines()[-1], process, env, log)
    _wait_healthy(server)
    return server


def poll(page, predicate, timeout: float = 120.0, every_ms: int = 20) -> tuple[float, dict]:  # noqa: ANN001
    end = time.monotonic() + timeout
    while True:
        snap = state(page)
        if predicate(snap):
            return time.monotonic(), snap
        if time.monotonic() > end:
            raise TimeoutError(json.dumps(snap)[:2000])
        page.wait_for_timeout(every_ms)


def open_page(context, server: LiveServer, path: str = "/"):  # noqa: ANN001
    page = context.new_page()
    page.goto(server.url + path)
    page.wait_for_function("() => window.uvm_state", timeout=120_000)
    return page


def time_to_first_result(context, server: LiveServer) -> dict:  # noqa: ANN001
    job = server.submit(TRIVIAL, list(range(50)), name="first", timeout=30)
    t0 = time.monotonic()
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("() => window.uvm_state", timeout=120_000)
    t_python = time.monotonic()
    t1, snap = poll(page, lambda s: s["session"]["tasks"] >= 1)
    boot = max((w["boot"] or 0) for w in snap["workers"])
    server.wait(job, timeout=120, page=page)
    page.close()
    return {"first_result": t1 - t0, "main_python": t_python - t0, "worker_boot": boot}


def run_job(context, server: LiveServer, code: str, n: int, cores: int) -> dict:  # noqa: ANN001
    """Open a page with ``cores`` faked, warm it up, then time ``n`` tasks of ``code``."""
    page = open_page(context, server)
    poll(page, lambda s: s["workers"] and all(w["ready"] for w in s["workers"]))
    warm = server.submit(code, list(range(4)), name="warm-up", timeout=60)
    server.wait(warm, timeout=120, page=page)
    base_tasks = state(page)["session"]["tasks"]
    job = server.submit(code, list(range(n)), name="measured", timeout=60)
    t0, first = poll(page, lambda s: s["session"]["tasks"] >= base_tasks + 1)
    cpu0 = cpu_seconds(server.process.pid)
    t1, last = poll(page, lambda s: s["session"]["tasks"] >= base_tasks + n, timeout=600)
    server_cpu = cpu_seconds(server.process.pid) - cpu0
    server.wait(job, timeout=60, page=page)
    page.close()
    done = n - 1  # tasks finished between the first result and the last
    wall = t1 - t0
    counts = last["counts"]
    return {
        "chunk_ms": 1000 * counts.get("chunk_seconds", 0) / max(1, counts.get("chunked_tasks", 0)),
        "results_ms": 1000 * counts.get("results_seconds", 0) / max(1, counts.get("chunked_tasks", 0)),
        "server_ms": 1000 * server_cpu / done,  # the server's CPU (event loop and SQLite) a task
        "workers": len(last["workers"]),
        "tasks_per_s": done / wall,
        "per_task_ms": 1000 * wall / done,
        "utilisation": (last["session"]["elapsed"] - first["session"]["elapsed"]) / (wall * len(last["workers"])),
    }


def job_switches(context, server: LiveServer, spare: bool, switches: int = 5) -> dict:  # noqa: ANN001
    """One worker runs a job, then ``switches`` new jobs one after another; each needs a fresh worker.

    With the spare, the next job is submitted once the spare has booted again (switches spaced at
    least a Pyodide boot apart); without it, each switch boots a worker while the task waits.
    """
    page = open_page(context, server, "/" if spare else "/?spare=0")
    ready = (lambda s: s["spare"] and s["spare"]["ready"]) if spare else (lambda s: True)
    poll(page, lambda s: s["workers"] and all(w["ready"] for w in s["workers"]) and ready(s))
    first = server.submit(TRIVIAL, list(range(3)), name="switch-0", timeout=60)
    server.wait(first, timeout=120, page=page)
    for n in range(switches):
        poll(page, ready)
        job = server.submit(TRIVIAL, list(range(3)), name=f"switch-{n + 1}", timeout=60)
        server.wait(job, timeout=120, page=page)
    _, snap = poll(page, lambda s: s["switches"] >= switches)
    page.close()
    recent = snap["recent_switches"][-switches:]
    hand_over = sorted(s["seconds"] for s in recent)
    arrival = sorted(s["since_arrival"] for s in recent if s["since_arrival"] is not None)
    return {
        "switches": len(recent),
        "hand_over_median": hand_over[len(hand_over) // 2],
        "hand_over_max": hand_over[-1],
        "arrival_median": arrival[len(arrival) // 2],
        "arrival_max": arrival[-1],
    }


def measure_mpy(mpy_dir: Path) -> dict:
    """PyScript main thread: time to first Python statement on mpy vs py; does protocol import?"""
    from aiohttp import web
    from playwright.sync_api import sync_playwright

    from server.web.static import add_static_routes

    page_tpl = """<!doctype html><html><head>
<script type="module" src="/vendor/pyscript/0.7.31/core.js"></script></head><body>
<script type="{kind}" config='{{"interpreter": "{interp}", "files": {{"/py/protocol.py": "./protocol.py"}}}}'>
import js
js.window.t_python = js.performance.now()
try:
    import protocol
    protocol.decode('{{"type": "ready", "n": 1}}')
    js.window.protocol_ok = "yes"
except Exception as exc:
    js.window.protocol_ok = "no: " + repr(exc)
</script></body></html>"""

    app = web.Application()
    add_static_routes(app, ROOT / "public", ROOT)

    async def page(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        interp = "/mpy/micropython.mjs" if kind == "mpy" else "/vendor/pyodide/314.0.7/pyodide.mjs"
        return web.Response(text=page_tpl.format(kind=kind, interp=interp), content_type="text/html")

    async def mpy_file(request: web.Request) -> web.FileResponse:
        path = mpy_dir / request.match_info["name"]
        mime = "application/wasm" if path.suffix == ".wasm" else "text/javascript"
        return web.FileResponse(path, headers={"Content-Type": mime})

    app.router.add_get("/bench/{kind}", page)
    app.router.add_get("/mpy/{name}", mpy_file)
    port = free_port()
    runner_ready = threading.Event()

    def serve() -> None:
        import asyncio

        async def main() -> None:
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runner_ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())

    threading.Thread(target=serve, daemon=True).start()
    runner_ready.wait(10)
    out: dict = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        for kind in ("mpy", "py"):
            runs = []
            for _ in range(3):
                context = browser.new_context()
                pg = context.new_page()
                pg.goto(f"http://127.0.0.1:{port}/bench/{kind}")
                pg.wait_for_function("() => window.protocol_ok", timeout=60_000)
                runs.append(pg.evaluate("window.t_python") / 1000)
                memory = pg.evaluate("performance.memory ? performance.memory.usedJSHeapSize : 0")
                out[f"{kind}_protocol"] = pg.evaluate("window.protocol_ok")
                context.close()
            out[f"{kind}_start_s"] = sorted(runs)[1]
            out[f"{kind}_js_heap_mb"] = memory / 1e6
        browser.close()
    return out


def print_page_numbers(browser, server: LiveServer) -> None:  # noqa: ANN001
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2) + AUTOSTART)
    cold = time_to_first_result(context, server)
    warm = time_to_first_result(context, server)  # same profile: HTTP cache filled
    print(
        f"page open -> first result: cold {cold['first_result']:.2f} s "
        f"(main-thread Python {cold['main_python']:.2f} s, worker boot {cold['worker_boot']:.2f} s); "
        f"warm {warm['first_result']:.2f} s (main-thread Python {warm['main_python']:.2f} s, "
        f"worker boot {warm['worker_boot']:.2f} s)"
    )
    trivial = run_job(context, server, TRIVIAL, 300, cores=2)
    print(
        f"trivial task, 1 worker: {trivial['per_task_ms']:.1f} ms per task end to end "
        f"({trivial['tasks_per_s']:.1f} tasks/s)"
    )
    context.close()
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2) + AUTOSTART)
    second = run_job(context, server, ONE_SECOND, 12, cores=2)
    print(f"1-second tasks, 1 worker: utilisation {second['utilisation']:.1%}")
    context.close()


def print_trivial(browser, server: LiveServer, n: int) -> None:  # noqa: ANN001
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2) + AUTOSTART)
    trivial = run_job(context, server, TRIVIAL, n, cores=2)
    print(
        f"trivial task, 1 worker, {n} tasks: {trivial['per_task_ms']:.3f} ms per task end to end "
        f"({trivial['tasks_per_s']:.1f} tasks/s; main() itself {trivial['utilisation']:.1%} of the time; "
        f"a chunk's call into the worker {trivial['chunk_ms']:.3f} ms a task, "
        f"the page's handling of its results {trivial['results_ms']:.3f} ms a task; "
        f"the server's CPU {trivial['server_ms']:.3f} ms a task); "
        f"load {os.getloadavg()[0]:.2f}"
    )
    context.close()


def print_switch_numbers(browser, server: LiveServer) -> None:  # noqa: ANN001
    for spare in (True, False):
        context = browser.new_context()
        context.add_init_script(fake_device(cores=2) + AUTOSTART)
        switch = job_switches(context, server, spare)
        print(
            f"job switch, 1 worker, {'with' if spare else 'without'} the spare: "
            f"old worker stopped -> new one ready median {switch['hand_over_median'] * 1000:.0f} ms "
            f"(max {switch['hand_over_max'] * 1000:.0f} ms); task arrived -> started median "
            f"{switch['arrival_median'] * 1000:.0f} ms (max {switch['arrival_max'] * 1000:.0f} ms), "
            f"{switch['switches']} switches"
        )
        context.close()


def print_cpu_numbers(browser, server: LiveServer) -> None:  # noqa: ANN001
    for cores in (2, 3):
        context = browser.new_context()
        context.add_init_script(fake_device(cores=cores) + AUTOSTART)
        cpu = run_job(context, server, CPU_BOUND, 120, cores=cores)
        print(
            f"CPU-bound task, {cpu['workers']} worker(s): {cpu['tasks_per_s']:.1f} tasks/s "
            f"(utilisation {cpu['utilisation']:.1%})"
        )
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpy", type=Path, help="an installed @micropython/micropython-webassembly-pyscript")
    parser.add_argument("--only-switch", action="store_true", help="measure job switches only")
    parser.add_argument("--only-trivial", type=int, metavar="N", help="measure the per-task overhead only, N tasks")
    parser.add_argument("--chunk-target", type=float, help="UVM_CHUNK_TARGET for the server (0: no chunks)")
    parser.add_argument("--profile", metavar="FILE", help="run the server under cProfile, its stats written to FILE")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, {platform.platform()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), args.chunk_target, args.profile)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                if args.only_trivial:
                    print_trivial(browser, server, args.only_trivial)
                    return
                if not args.only_switch:
                    print_page_numbers(browser, server)
                print_switch_numbers(browser, server)
                if not args.only_switch:
                    print_cpu_numbers(browser, server)
                browser.close()
        finally:
            server.stop()
    if args.mpy:
        mpy = measure_mpy(args.mpy)
        print(
            f"PyScript main thread, median of 3 cold starts: mpy {mpy['mpy_start_s']:.2f} s, "
            f"Pyodide {mpy['py_start_s']:.2f} s; JS heap after start: mpy {mpy['mpy_js_heap_mb']:.0f} MB, "
            f"Pyodide {mpy['py_js_heap_mb']:.0f} MB"
        )
        print(f"protocol.py under mpy: {mpy['mpy_protocol']}; under Pyodide: {mpy['py_protocol']}")


if __name__ == "__main__":
    main()

"""Benchmark: N idle volunteers connected to one server (MariaDB + Redis), then a job arrives.

Prints the time for all of them to connect and wait, the server's memory per connection, its CPU
(% of one core) and the messages per second while everyone is idle, and -- once a job of
``--tasks`` tasks is submitted -- the p50/p99 from the submit to each volunteer's first pushed
``tasks``, and from a ``ready`` to its ``tasks`` for the readies answered at once (volunteers that
finished their tasks and asked again while work was there). Not a test: it asserts nothing, it measures.

    ulimit -n 30000   # each socket is a file descriptor in the server and in a volunteer process
    .venv/bin/python bench/idle.py --volunteers 10000 --tasks 20000
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import DATABASE, REDIS_URL  # noqa: E402
from bench.harness import get_json as _get  # noqa: E402
from bench.harness import post_json as _post  # noqa: E402
from bench.harness import tree_cpu as _tree_cpu  # noqa: E402
from tests.procs import ServerProcess, add_researcher  # noqa: E402


def _volunteers(url: str, count: int, ramp: float, commands, out) -> None:  # noqa: ANN001
    """A process of ``count`` simulated volunteers; answers "counts" and "pushed" requests, ends on "stop"."""
    from workers.sim import SimVolunteer, run_volunteers

    async def go() -> None:
        sims = [SimVolunteer(url, prefetch=2) for _ in range(count)]
        stop = asyncio.Event()
        run = asyncio.create_task(run_volunteers(url, 0, stop=stop, ramp=ramp, sims=sims, quiet=True))
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, commands.get)
            if command == "counts":
                out.put(
                    (
                        sum(sum(s.received.values()) for s in sims),
                        sum(sum(s.sent.values()) for s in sims),
                        sum(s.received["wait"] for s in sims),
                        sum(s.connects for s in sims),
                    )
                )
            elif command == "pushed":
                out.put([s.pushed[0] for s in sims if s.pushed])
            elif command == "latencies":  # `ready` -> `tasks` of the readies answered at once (work was there)
                out.put([x for s in sims for x in s.latencies])
            elif command == "stop":
                stop.set()
                await run
                out.put("stopped")
                return

    asyncio.run(go())


def _metric(url: str, name: str) -> float:
    """A gauge from /metrics; -1 when the server is too busy to answer within a minute."""
    try:
        return _read_metric(url, name)
    except TimeoutError:
        return -1.0


def _read_metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _ask(procs: list, command: str) -> list:  # noqa: ANN001
    for commands, _ in procs:
        commands.put(command)
    return [out.get(timeout=300) for _, out in procs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volunteers", type=int, default=10_000)
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--procs", type=int, default=2, help="processes the volunteers are spread over")
    p.add_argument("--ramp", type=float, default=10.0, help="seconds over which volunteers first connect")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    p.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds idle before measuring (the idle heartbeats' intervals grow to UVM_IDLE_HEARTBEAT first)",
    )
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.volunteers + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))  # inherited by the children

    data = Path(f"/tmp/uvm-bench-idle-{os.getpid()}")
    subprocess.run(["rm", "-rf", str(data)], check=True)
    subprocess.run(
        ["mariadb", "-h127.0.0.1", "-uroot", "-e", f"DROP DATABASE IF EXISTS {DATABASE}; CREATE DATABASE {DATABASE}"],
        check=True,
    )
    subprocess.run(["redis-cli", "-p", REDIS_URL.split(":")[2].split("/")[0], "-n", "12", "flushdb"], check=True)
    env = {
        "UVM_DATA_DIR": str(data),
        "UVM_DATABASE_URL": f"mysql+aiomysql://root@127.0.0.1:3306/{DATABASE}",
        "UVM_REDIS_URL": REDIS_URL,
        "UVM_KEY": os.urandom(32).hex(),
        "UVM_METRICS_ALLOW": "127.0.0.1",
    }
    token = add_researcher(env, "bench@example.org")
    server = ServerProcess(env).start()
    assert server.proc is not None
    procs = []
    try:
        rss0 = _rss(server.proc.pid)
        per = [args.volunteers // args.procs + (i < args.volunteers % args.procs) for i in range(args.procs)]
        for n in per:
            commands: multiprocessing.Queue = multiprocessing.Queue()
            out: multiprocessing.Queue = multiprocessing.Queue()
            multiprocessing.Process(target=_volunteers, args=(server.url, n, args.ramp, commands, out)).start()
            procs.append((commands, out))
        t0 = time.perf_counter()
        waiting = 0.0
        while waiting < args.volunteers and time.perf_counter() - t0 < 300:
            time.sleep(0.5)
            waiting = _metric(server.url, "uvm_volunteers_waiting")
        connected_in = time.perf_counter() - t0
        time.sleep(3 + args.settle)  # let the last hellos settle (and the intervals grow, with --settle)
        rss1 = _rss(server.proc.pid)
        before = _ask(procs, "counts")
        cpu0, w0 = _tree_cpu(server.proc.pid), time.perf_counter()
        time.sleep(args.idle)
        cpu1, w1 = _tree_cpu(server.proc.pid), time.perf_counter()
        after = _ask(procs, "counts")
        messages = sum(a[0] + a[1] - b[0] - b[1] for a, b in zip(after, before, strict=True))
        body = {"code": "def main(x):\n    return x\n", "inputs": {"range": [args.tasks]}, "replication": 1}
        submitted = time.time()
        job = _post(f"{server.url}/api/jobs", token, body)
        posted = time.time() - submitted
        while _get(f"{server.url}/api/jobs/{job['id']}", token)["state"] not in ("done", "failed", "cancelled"):
            time.sleep(0.25)
        finished = time.time() - submitted
        pushed = sorted(t - submitted for chunk in _ask(procs, "pushed") for t in chunk)
        answered = sorted(x for chunk in _ask(procs, "latencies") for x in chunk)
        _ask(procs, "stop")
    finally:
        server.stop()
    python = platform.python_version()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {python}")
    print(f"volunteers: {args.volunteers} in {args.procs} processes, connecting over {args.ramp:g} s (jitter)")
    print(f"all connected and waiting after {connected_in:.1f} s ({waiting:.0f} waiting)")
    per = (rss1 - rss0) / max(1, waiting) / 1024
    print(f"server memory: +{(rss1 - rss0) / 2**20:.0f} MiB RSS, {per:.1f} KiB per connection")
    idle = w1 - w0
    cpu = 100 * (cpu1 - cpu0) / idle
    settled = f", from {args.settle:g} s after all connected" if args.settle else ""
    print(f"idle {idle:.0f} s{settled}: server CPU {cpu:.1f} % of a core, {messages / idle:.0f} messages/s")
    print(f"job of {args.tasks} tasks: POST {posted:.2f} s, done after {finished:.1f} s")
    if pushed:
        q = statistics.quantiles(pushed, n=100)
        print(
            f"submit -> first pushed tasks: {len(pushed)} volunteers, p50 {q[49] * 1000:.0f} ms, "
            f"p99 {q[98] * 1000:.0f} ms, last {pushed[-1] * 1000:.0f} ms"
        )
    if len(answered) > 1:
        q = statistics.quantiles(answered, n=100)
        print(
            f"ready -> tasks answered at once during the job: {len(answered)} readies, p50 {q[49] * 1000:.0f} ms, "
            f"p99 {q[98] * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()

"""What the benchmarks that run a UVM server share: a fresh MariaDB + Redis pair, the researchers'
API over plain HTTP, and simulated volunteers in processes of their own."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import queue
import subprocess
import urllib.request
from pathlib import Path

# UVM_TEST_REDIS_PORT, as in the tests: parallel checkouts each bench against a Redis of their own.
REDIS_PORT = os.environ.get("UVM_TEST_REDIS_PORT", "6379")


def fresh_mariadb_redis(database: str, redis_url: str) -> dict[str, str]:
    """Drop and create ``database``, flush the Redis database; the server's environment for them."""
    subprocess.run(
        ["mariadb", "-h127.0.0.1", "-uroot", "-e", f"DROP DATABASE IF EXISTS {database}; CREATE DATABASE {database}"],
        check=True,
    )
    port, db = redis_url.rsplit(":", 1)[1].split("/")
    subprocess.run(["redis-cli", "-p", port, "-n", db, "flushdb"], check=True, capture_output=True)
    return {
        "UVM_DATABASE_URL": f"mysql+asyncmy://root@127.0.0.1:3306/{database}",
        "UVM_REDIS_URL": redis_url,
        "UVM_KEY": os.urandom(32).hex(),  # required on MySQL
    }


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used: a cost that contention does not inflate."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and its children (``serve --processes N`` forks N servers)."""
    if not pid:
        return 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return cpu_seconds(pid) + sum(tree_cpu(int(c)) for c in children)


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def get_json(url: str, token: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def post_json(url: str, token: str, body: dict) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def volunteers_process(url: str, count: int, prefetch: int, done, out: multiprocessing.Queue) -> None:  # noqa: ANN001
    """A process's worth of simulated volunteers, until ``done`` (an Event) is set; their stats to ``out``."""
    from workers.sim import run_volunteers

    async def go() -> dict:
        stop = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                await asyncio.sleep(0.1)
            stop.set()

        watcher = asyncio.create_task(watch())
        stats = await run_volunteers(url, count, prefetch=prefetch, quiet=True, stop=stop)
        await watcher
        return stats

    out.put(asyncio.run(go()))


def start_volunteers(url: str, count: int, prefetch: int, procs: int) -> tuple[list, multiprocessing.Queue, object]:
    """``count`` simulated volunteers spread over ``procs`` processes: (processes, stats queue, stop event)."""
    out: multiprocessing.Queue = multiprocessing.Queue()
    finished = multiprocessing.Event()
    per = [count // procs + (i < count % procs) for i in range(procs)]
    processes = [
        multiprocessing.Process(target=volunteers_process, args=(url, n, prefetch, finished, out)) for n in per
    ]
    for proc in processes:
        proc.start()
    return processes, out, finished


def stop_volunteers(processes: list, out: multiprocessing.Queue, finished) -> list[dict]:  # noqa: ANN001
    """Stop them; each process's stats (done, errors, latencies)."""
    finished.set()
    stats = []
    for _ in processes:
        try:
            stats.append(out.get(timeout=60))
        except queue.Empty:  # a process that died (interrupted) says nothing
            break
    for proc in processes:
        proc.join(timeout=10)
    return stats

"""Benchmark: N simulated volunteers against one server on MariaDB + Redis (or the embedded default).

Prints end-to-end tasks/s (submission to the last committed result), the p50/p99 latency
from a volunteer's ``ready`` to its ``tasks``, CPU per task (server, MariaDB, and on MariaDB + Redis
the Redis scripts' time, where leasing runs) and the volunteers' job switches. Not a test: it
asserts nothing, it measures.

    .venv/bin/python bench/dispatch.py --volunteers 500 --tasks 60000
    .venv/bin/python bench/dispatch.py --backend sqlite
    .venv/bin/python bench/dispatch.py --jobs 4 --no-affinity   # 4 researchers' jobs, no job affinity
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    REDIS_PORT,
    cpu_seconds,
    fresh_mariadb_redis,
    get_json,
    post_json,
    start_volunteers,
    stop_volunteers,
    tree_cpu,
)
from tests.procs import ServerProcess, add_researcher  # noqa: E402

REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/12"
DATABASE = "uvm_bench" if REDIS_PORT == "6379" else f"uvm_bench_{REDIS_PORT}"


def _mariadb_cpu() -> float:
    pids = subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True, text=True).stdout.split()
    return sum(cpu_seconds(int(p)) for p in pids)


def _redis_script_seconds() -> float:
    """Seconds Redis spent in scripts since its stats were reset (leases, ends, pushes: Lua)."""
    info = subprocess.run(
        ["redis-cli", "-p", REDIS_PORT, "info", "commandstats"], capture_output=True, text=True
    ).stdout
    total = 0
    for line in info.splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            total += int(line.split("usec=", 1)[1].split(",", 1)[0])
    return total / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["mariadb", "sqlite"], default="mariadb")
    p.add_argument("--volunteers", type=int, default=500)
    p.add_argument("--tasks", type=int, default=60_000)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--procs", type=int, default=2, help="processes the volunteers are spread over")
    p.add_argument("--server-processes", type=int, default=1, help="uvm-compute serve --processes N (MariaDB only)")
    p.add_argument("--seconds", type=float, default=120.0, help="upper bound on the run")
    p.add_argument("--jobs", type=int, default=1, help="the tasks split over this many jobs of as many researchers")
    p.add_argument(
        "--no-affinity", action="store_true", help="volunteers do not tell the server which jobs they have loaded"
    )
    p.add_argument(
        "--limits",
        action="store_true",
        help="apply the per-address limits to loopback too (UVM_LIMIT_LOOPBACK), as for remote volunteers",
    )
    p.add_argument("--profile", metavar="FILE", help="run the server under cProfile, its stats written to FILE")
    p.add_argument("--chunk-target", type=float, help="UVM_CHUNK_TARGET for the server (0: no chunked hand-out)")
    args = p.parse_args()

    data = Path(f"/tmp/uvm-bench-{REDIS_PORT}")
    subprocess.run(["rm", "-rf", str(data)], check=True)
    env = {"UVM_DATA_DIR": str(data)}
    if args.limits:  # every volunteer on one address: allow them all, keep the per-socket message rate
        env |= {"UVM_LIMIT_LOOPBACK": "1", "UVM_MAX_CONNECTIONS_PER_ADDRESS": str(args.volunteers + 10)}
    if args.backend == "mariadb":
        env |= fresh_mariadb_redis(DATABASE, REDIS_URL)
    if args.chunk_target is not None:
        env["UVM_CHUNK_TARGET"] = str(args.chunk_target)
    tokens = [add_researcher(env, f"bench{i}@example.org") for i in range(args.jobs)]
    python = ("-m", "cProfile", "-o", args.profile) if args.profile else ()
    server = ServerProcess(env, args=("--processes", str(args.server_processes)), python=python).start()
    try:
        t0 = time.perf_counter()
        jobs = []
        for i, token in enumerate(tokens):
            size = args.tasks // args.jobs + (i < args.tasks % args.jobs)
            body = {"code": f"def main(x):\n    return x + {i}\n", "inputs": {"range": [size]}, "replication": 1}
            jobs.append((post_json(f"{server.url}/api/jobs", token, body)["id"], token))  # one replica: dispatch
        t_submit = time.perf_counter() - t0
        procs, out, finished = start_volunteers(
            server.url, args.volunteers, args.prefetch, args.procs, affinity=not args.no_affinity
        )
        start = time.perf_counter()
        if args.backend == "mariadb":
            subprocess.run(["redis-cli", "-p", REDIS_PORT, "config", "resetstat"], check=True, capture_output=True)
        cpu0 = tree_cpu(server.proc.pid), _mariadb_cpu()
        done = 0
        while time.perf_counter() - start < args.seconds:
            states = [get_json(f"{server.url}/api/jobs/{job}", token) for job, token in jobs]
            done = sum(s.get("counts", {}).get("done", 0) for s in states)
            if all(s["state"] in ("done", "failed", "cancelled") for s in states):
                break
            time.sleep(0.25)
        elapsed = time.perf_counter() - start
        cpu1 = tree_cpu(server.proc.pid), _mariadb_cpu()
        scripts = _redis_script_seconds() if args.backend == "mariadb" else 0.0
        stats = stop_volunteers(procs, out, finished)
    finally:
        server.stop()
    latencies = sorted(x for s in stats for x in s["latencies"])
    python = platform.python_version()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {python}")
    limits = "per-address limits on" if args.limits else "loopback exempt from per-address limits"
    print(
        f"backend: {args.backend}, {args.server_processes} server process(es); "
        f"volunteers: {args.volunteers} in {args.procs} processes, "
        f"prefetch {args.prefetch}; {limits}"
    )
    print(f"submit {args.tasks} tasks (range) in {args.jobs} job(s) of as many researchers: {t_submit:.2f} s")
    print(f"completed: {done}/{args.tasks} tasks in {elapsed:.2f} s -> {done / elapsed:.0f} tasks/s end to end")
    if done:
        server_ms = (cpu1[0] - cpu0[0]) * 1000 / done
        db_ms = (cpu1[1] - cpu0[1]) * 1000 / done if args.backend == "mariadb" else 0.0
        print(
            f"CPU per task: server {server_ms:.3f} ms, MariaDB {db_ms:.3f} ms "
            f"(one core could serve ~{1000 / server_ms:.0f} tasks/s in the server process)"
        )
        if args.backend == "mariadb":
            print(f"Redis scripts per task: {scripts * 1e6 / done:.1f} µs (leasing, ending and pushing tasks)")
        switches = sum(s.get("switches", 0) for s in stats)
        affinity = "off" if args.no_affinity else "on"
        print(f"job switches (job affinity {affinity}): {switches}, {switches * 1000 / done:.1f} per 1000 tasks")
    if latencies:
        q = statistics.quantiles(latencies, n=100)
        print(f"ready->tasks latency: p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms ({len(latencies)} samples)")


if __name__ == "__main__":
    main()

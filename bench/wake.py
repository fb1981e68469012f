"""Benchmark: the wake alone. N waiting volunteers, a job arrives: how long until each has its tasks?

In one process, on MariaDB + Redis: the server's dispatcher with N volunteer sockets whose ``send``
only encodes the message (no network, no simulated volunteers computing afterwards), each holding a
``ready {2}``. A range job of 2N tasks is submitted through the dispatcher, and the time from the
submit to each socket's ``tasks`` is recorded, with the server's CPU for the whole wake. Repeated
``--rounds`` times (the volunteers wait again after each). What it isolates: the wake's own cost per
waiter (leases, reads, messages), which ``bench/idle.py`` mixes with everything the woken volunteers
then ask of the same process.

    .venv/bin/python bench/wake.py --volunteers 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import REDIS_PORT, fresh_mariadb_redis  # noqa: E402

DATABASE = "uvm_bench_wake" if REDIS_PORT == "6379" else f"uvm_bench_wake_{REDIS_PORT}"
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/13"


async def run(volunteers: int, rounds: int) -> None:
    from aiohttp import web

    from server import protocol as P
    from server.cli import tune_gc
    from server.config import Config
    from server.crypto import hash_password, hash_token, new_token
    from server.jobs.dispatch import VolunteerSocket
    from server.spec import parse
    from server.web import appkeys as K
    from server.web.app import create_app

    data = tempfile.TemporaryDirectory(prefix="uvm-bench-wake-")
    env = fresh_mariadb_redis(DATABASE, REDIS_URL) | {"UVM_DATA_DIR": data.name}
    config = Config.from_env(env | {"UVM_DEFAULT_REPLICATION": "1"})
    app = create_app(config)
    tune_gc()  # as `serve` does
    runner = web.AppRunner(app)
    await runner.setup()  # the engine, Redis and the dispatcher's loops, as `serve` starts them
    try:
        storage, dispatcher = app[K.storage], app[K.dispatcher]
        secret, token = hash_password("a long password"), hash_token(new_token())
        researcher = await storage.add_researcher("bench@example.org", secret, token)
        got: dict[int, float] = {}

        def volunteer(i: int) -> VolunteerSocket:
            async def send(msg: object) -> None:
                P.encode(msg)  # what a real send costs before the socket's write
                if isinstance(msg, P.Tasks) and msg.tasks:
                    got[i] = time.perf_counter()

            return VolunteerSocket(f"bench{i:05d}", send, capabilities=P.Capabilities(workers=1, prefetch=1))

        socks = [volunteer(i) for i in range(volunteers)]
        for sock in socks:
            dispatcher.connect(sock)
        for n in range(rounds):
            got.clear()
            for sock in socks:
                sock.held.clear()  # as if its results were in: room under its cap again
                await dispatcher.ready(sock, 2)
            spec = parse({"code": "def main(x):\n    return x\n", "inputs": {"range": [2 * volunteers]}}, config)
            cpu0, t0 = time.process_time(), time.perf_counter()
            await dispatcher.submit(researcher, spec)
            while len(got) < volunteers and time.perf_counter() - t0 < 300:
                await asyncio.sleep(0.005)
            cpu = time.process_time() - cpu0
            after = sorted(t - t0 for t in got.values())
            q = statistics.quantiles(after, n=100)
            print(
                f"round {n + 1}: {len(after)} of {volunteers} woken; submit -> tasks p50 {q[49] * 1000:.0f} ms, "
                f"p99 {q[98] * 1000:.0f} ms, last {after[-1] * 1000:.0f} ms; CPU {cpu:.2f} s "
                f"({cpu / max(1, len(after)) * 1e6:.0f} µs per volunteer woken, the submit included)"
            )
    finally:
        await runner.cleanup()
        data.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volunteers", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    asyncio.run(run(args.volunteers, args.rounds))


if __name__ == "__main__":
    main()

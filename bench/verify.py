"""Benchmark: what verified results cost, and how many forged results get through.

Three parts, printed as Markdown tables for the README:
1. honest simulated volunteers: tasks/s and results per task for replication 1, 2, 3 and adaptive;
2. one volunteer that forges a fraction of its results (1, 10, 30, 100 %) beside honest ones:
   the fraction of tasks that end with a wrong result, under replication 3 and under adaptive;
3. a model of a volunteer that lies on every result once trusted: the wrong results it gets
   accepted per identity, against the trust threshold and the spot-check rate (the validator's
   own ``spot_rate`` and ``Trust``), before it is caught and its lone results are re-checked.

Not a test: it asserts nothing, it measures. The server runs on the embedded default (SQLite +
in-process queue) in a subprocess; the simulated volunteers run in this process.

    .venv/bin/python bench/verify.py                 # about a minute on 2 cores
    .venv/bin/python bench/verify.py --tasks 4000 --volunteers 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.jobs.validator import Trust, spot_rate  # noqa: E402
from tests.procs import ServerProcess, add_researcher  # noqa: E402
from workers.sim import SimVolunteer  # noqa: E402

CODE = "def main(x):\n    return x * x\n"


async def run_job(url: str, token: str, tasks: int, replication: object, sims: list[SimVolunteer]) -> dict:
    """Submit one job, run the volunteers until it ends; its status, wall time and wrong results."""
    headers = {"Authorization": f"Bearer {token}"}
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        body = {"code": CODE, "inputs": {"range": [tasks]}, "replication": replication}
        async with session.post(f"{url}/api/jobs", json=body, headers=headers) as resp:
            job = (await resp.json())["id"]
        start = time.perf_counter()
        runs = [asyncio.create_task(sim.run(session, stop)) for sim in sims]
        while True:
            async with session.get(f"{url}/api/jobs/{job}", headers=headers) as resp:
                status = await resp.json()
            if status["state"] in ("done", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
        async with session.get(f"{url}/api/jobs/{job}/results", params={"format": "json"}, headers=headers) as resp:
            rows = await resp.json()
    wrong = sum(1 for r in rows if r["state"] == "done" and r["result"] != r["input"] ** 2)
    return {"status": status, "seconds": elapsed, "wrong": wrong}


def fresh_server() -> tuple[ServerProcess, str, Path]:
    """A server of its own per run, so reputations earned in one run do not carry to the next."""
    data = Path(tempfile.mkdtemp(prefix="uvm-bench-verify-"))
    env = {"UVM_DATA_DIR": str(data)}
    token = add_researcher(env, "bench@example.org")
    return ServerProcess(env).start(), token, data


async def measure(tasks: int, replication: object, honest: int, liars: int = 0, lie_rate: float = 0.0) -> dict:
    server, token, data = fresh_server()
    try:
        sims = [SimVolunteer(server.url, prefetch=4) for _ in range(honest)]
        sims += [SimVolunteer(server.url, prefetch=4, lie_rate=lie_rate, seed=i) for i in range(liars)]
        return await run_job(server.url, token, tasks, replication, sims)
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def liar_model(trust_after: int, base: float, trials: int = 20_000, seed: int = 1) -> tuple[float, float]:
    """A volunteer earns trust honestly, then lies on every result. Returns the mean number of
    forged results accepted alone before a spot check catches it, and the mean results it took."""
    rng = random.Random(seed)
    accepted = 0
    sent = 0
    for _ in range(trials):
        trust = Trust(consecutive=trust_after)
        while True:
            sent += 1
            if rng.random() < spot_rate(trust.consecutive, trust_after, base):
                trust.update(False, 0.0)  # the spot check disagrees: caught, trust back to zero
                break
            accepted += 1
    return accepted / trials, sent / trials


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--volunteers", type=int, default=5, help="honest volunteers (one more lies in part 2)")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}")
    print(f"{args.tasks} tasks of x*x per job; simulated volunteers with prefetch 4; SQLite + in-process queue\n")

    print(f"1. honest volunteers ({args.volunteers})\n")
    print("| replication | tasks/s | results per task |")
    print("|---|---|---|")
    for replication in (1, 2, 3, "adaptive"):
        r = await measure(args.tasks, replication, args.volunteers)
        per_task = r["status"]["validation"]["replicas"] / args.tasks
        print(f"| {replication} | {args.tasks / r['seconds']:.0f} | {per_task:.2f} |")

    print(f"\n2. one liar beside {args.volunteers - 1} honest volunteers: tasks that end wrong\n")
    print("| lie rate | replication 3: wrong | adaptive: wrong | adaptive: results per task |")
    print("|---|---|---|---|")
    for rate in (0.01, 0.1, 0.3, 1.0):
        three = await measure(args.tasks, 3, args.volunteers - 1, liars=1, lie_rate=rate)
        adaptive = await measure(args.tasks, "adaptive", args.volunteers - 1, liars=1, lie_rate=rate)
        per_task = adaptive["status"]["validation"]["replicas"] / args.tasks
        print(
            f"| {rate:.0%} | {three['wrong'] / args.tasks:.2%} | {adaptive['wrong'] / args.tasks:.2%} "
            f"| {per_task:.2f} |"
        )

    print("\n3. model: a volunteer that lies on every result once trusted (before re-checks)\n")
    print("| trust after | spot-check | forged results accepted per identity | per honest result it cost |")
    print("|---|---|---|---|")
    for trust_after in (5, 10, 20):
        for base in (0.02, 0.05, 0.1, 0.2):
            forged, _sent = liar_model(trust_after, base)
            print(f"| {trust_after} | {base:.0%} | {forged:.1f} | {forged / trust_after:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())

"""Benchmark: UVM against its peers (Dask, Celery, Ray) on one job, side by side in one run.

The job is f(x) = x*x + 1 over 60,000 inputs, timed from submit until every result is back, in
input order, in the submitting process. Each system gets this machine's cores:

- UVM: one server on MariaDB + Redis, simulated volunteers (``workers/sim.py``) in 2 processes;
  every result is committed to MariaDB before the volunteer's acknowledgement, and the results come
  back through the results download (``GET /api/jobs/{id}/results``);
- Dask: a ``LocalCluster`` of 2 worker processes, once with plain ``client.map`` (one future per
  input) and once with 500 inputs per future;
- Celery: a worker of 2 processes (prefork), Redis as broker and result backend;
- Ray: ``ray.init(num_cpus=2)``, one remote call per input; skipped, with the reason, when Ray
  cannot be imported.

Prints each run's tasks/s, then a table of ranges and each system's ratio to UVM. Not a test: it
asserts nothing, it measures. The peers come with ``pip install -e '.[bench]'``.

    .venv/bin/python bench/peers.py                      # everything, 3 runs each
    .venv/bin/python bench/peers.py --only uvm dask-500 --runs 1
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    REDIS_PORT,
    fresh_mariadb_redis,
    get_json,
    post_json,
    start_volunteers,
    stop_volunteers,
)
from tests.procs import ServerProcess, add_researcher  # noqa: E402

DATABASE = f"uvm_bench_peers_{REDIS_PORT}"
UVM_REDIS = f"redis://127.0.0.1:{REDIS_PORT}/12"
CELERY_BROKER = f"redis://127.0.0.1:{REDIS_PORT}/13"
CELERY_BACKEND = f"redis://127.0.0.1:{REDIS_PORT}/14"
CORES = 2  # what each peer is given (this machine has 2)
BATCH = 500  # inputs per future in the batched Dask run
GATHER = 1000  # results collected (in order) per step of a progress bar
CODE = "def main(x):\n    return x * x + 1\n"


def f(x: int) -> int:
    return x * x + 1


def f_batch(xs: list[int]) -> list[int]:
    return [x * x + 1 for x in xs]


def expected(n: int) -> list[int]:
    return [f(x) for x in range(n)]


def _bar(name: str, n: int) -> tqdm:
    return tqdm(total=n, desc=f"{name:>10}", unit="task", leave=False, mininterval=0.5)


# ------------------------------------------------------------------------------------------ UVM
class Uvm:
    """A server on MariaDB + Redis and its volunteers, started once for all runs."""

    name = "uvm"

    def __init__(self, volunteers: int, prefetch: int) -> None:
        self.volunteers, self.prefetch = volunteers, prefetch

    @contextmanager
    def running(self) -> Iterator[Callable[[int], list]]:
        data = Path(f"/tmp/uvm-bench-peers-{REDIS_PORT}")
        env = {"UVM_DATA_DIR": str(data)} | fresh_mariadb_redis(DATABASE, UVM_REDIS)
        token = add_researcher(env, "peers@example.org")
        server = ServerProcess(env).start()
        volunteers = start_volunteers(server.url, self.volunteers, self.prefetch, procs=2)
        try:
            time.sleep(2)  # let every volunteer connect and say hello before the clock starts
            yield lambda n: self.run(server.url, token, n)
        finally:
            stop_volunteers(*volunteers)
            server.stop()

    def run(self, url: str, token: str, n: int) -> list:
        started = time.perf_counter()
        job = post_json(f"{url}/api/jobs", token, {"code": CODE, "inputs": {"range": [n]}, "replication": 1})
        submitted = time.perf_counter()
        with _bar("uvm", n) as bar:
            while True:
                status = get_json(f"{url}/api/jobs/{job['id']}", token)
                bar.update(status["counts"]["done"] - bar.n)
                if status["state"] in ("done", "failed", "cancelled"):
                    break
                time.sleep(0.05)
        finished = time.perf_counter()
        rows = get_json(f"{url}/api/jobs/{job['id']}/results?format=json", token)
        results = [row["result"] for row in rows]  # type: ignore[union-attr]
        print(
            f"  uvm: submit {submitted - started:.2f} s, run {finished - submitted:.2f} s, "
            f"download {time.perf_counter() - finished:.2f} s",
            flush=True,
        )
        return results


# ------------------------------------------------------------------------------------------ Dask
class Dask:
    """A LocalCluster of CORES single-threaded worker processes; ``batch`` inputs per future."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.name = "dask-map" if batch == 1 else f"dask-{batch}"

    @contextmanager
    def running(self) -> Iterator[Callable[[int], list]]:
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=CORES,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # any free port: others may hold 8787
                silence_logs=logging.CRITICAL,  # not the heartbeats that fail as the cluster closes
            ) as cluster,
            Client(cluster) as client,
        ):
            yield lambda n: self.run(client, n)

    def run(self, client, n: int) -> list:  # noqa: ANN001
        if self.batch == 1:
            futures = client.map(f, range(n), pure=False)
        else:
            chunks = [list(range(i, min(i + self.batch, n))) for i in range(0, n, self.batch)]
            futures = client.map(f_batch, chunks, pure=False)
        out: list = []
        with _bar(self.name, n) as bar:
            step = max(1, GATHER // self.batch)
            for i in range(0, len(futures), step):
                got = client.gather(futures[i : i + step])
                for value in got:
                    if self.batch == 1:
                        out.append(value)
                    else:
                        out.extend(value)
                bar.update(len(out) - bar.n)
        return out


# ------------------------------------------------------------------------------------------ Celery
def celery_app():  # noqa: ANN201
    from celery import Celery

    app = Celery("uvm_bench_peers", broker=CELERY_BROKER, backend=CELERY_BACKEND)
    app.conf.update(worker_prefetch_multiplier=16, result_expires=600, worker_hijack_root_logger=False)
    app.task(name="square_plus_one")(f)
    return app


def _celery_worker() -> None:
    from celery.platforms import SecurityWarning

    warnings.filterwarnings("ignore", category=SecurityWarning)  # root in a container: not this bench's topic
    celery_app().Worker(concurrency=CORES, pool="prefork", loglevel="WARNING", quiet=True).start()


class Celery:
    name = "celery"

    @contextmanager
    def running(self) -> Iterator[Callable[[int], list]]:
        import redis

        for url in (CELERY_BROKER, CELERY_BACKEND):
            redis.Redis.from_url(url).flushdb()
        app = celery_app()
        worker = multiprocessing.Process(target=_celery_worker, daemon=False)
        worker.start()
        try:
            deadline = time.monotonic() + 60
            while not app.control.ping(timeout=1):  # until the worker answers
                if time.monotonic() > deadline or not worker.is_alive():
                    raise RuntimeError("the Celery worker did not start")
            yield lambda n: self.run(app, n)
        finally:
            app.control.shutdown()
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()

    def run(self, app, n: int) -> list:  # noqa: ANN001
        from celery.result import ResultSet

        task = app.tasks["square_plus_one"]
        results = [task.delay(x) for x in range(n)]
        out: list = []
        with _bar("celery", n) as bar:
            for i in range(0, n, GATHER):
                out.extend(ResultSet(results[i : i + GATHER], app=app).join_native(timeout=600))
                bar.update(len(out) - bar.n)
        for result in results:
            result.forget()
        return out


# ------------------------------------------------------------------------------------------ Ray
class Ray:
    name = "ray"

    @contextmanager
    def running(self) -> Iterator[Callable[[int], list]]:
        import ray

        ray.init(num_cpus=CORES, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            remote = ray.remote(f)
            yield lambda n: self.run(ray, remote, n)
        finally:
            ray.shutdown()

    def run(self, ray, remote, n: int) -> list:  # noqa: ANN001
        refs = [remote.remote(x) for x in range(n)]
        out: list = []
        with _bar("ray", n) as bar:
            for i in range(0, n, GATHER):
                out.extend(ray.get(refs[i : i + GATHER]))
                bar.update(len(out) - bar.n)
        return out


def _missing(module: str) -> str | None:
    """Why a peer cannot run here (its package does not import), or None."""
    try:
        __import__(module)
    except Exception as exc:  # an import can fail in many ways (no wheel, a missing library)
        return f"{module} does not import here ({type(exc).__name__}: {exc}); pip install -e '.[bench]'"
    return None


SYSTEMS = {
    "uvm": ("UVM ({volunteers} simulated volunteers, MariaDB + Redis)", None),
    "dask-map": ("Dask (plain client.map)", "distributed"),
    "dask-500": (f"Dask ({BATCH} inputs per future)", "distributed"),
    "celery": ("Celery (Redis broker and backend)", "celery"),
    "ray": (f"Ray ({CORES} CPUs)", "ray"),
}


def _system(key: str, args: argparse.Namespace):  # noqa: ANN202
    return {
        "uvm": lambda: Uvm(args.volunteers, args.prefetch),
        "dask-map": lambda: Dask(1),
        "dask-500": lambda: Dask(BATCH),
        "celery": Celery,
        "ray": Ray,
    }[key]()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=60_000)
    p.add_argument("--runs", type=int, default=3, help="runs of each system (the table gives the range)")
    p.add_argument("--only", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    p.add_argument("--volunteers", type=int, default=500)
    p.add_argument("--prefetch", type=int, default=8)
    args = p.parse_args()

    want = expected(args.tasks)
    rates: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for key in args.only:
        module = SYSTEMS[key][1]
        reason = _missing(module) if module else None
        if reason:
            skipped[key] = reason
            print(f"{key}: skipped: {reason}", flush=True)
            continue
        system = _system(key, args)
        with system.running() as run:
            for i in range(args.runs):
                started = time.perf_counter()
                got = run(args.tasks)
                seconds = time.perf_counter() - started
                if got != want:
                    wrong = next(j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b) if got else 0
                    raise SystemExit(f"{key}: wrong results (first at index {wrong}; {len(got)} of {args.tasks})")
                rates.setdefault(key, []).append(args.tasks / seconds)
                print(f"{key} run {i + 1}: {args.tasks} tasks in {seconds:.2f} s = {args.tasks / seconds:,.0f} tasks/s")
    _report(args, rates, skipped)


def _report(args: argparse.Namespace, rates: dict[str, list[float]], skipped: dict[str, str]) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load {load}")
    print(f"job: f(x) = x*x + 1 over {args.tasks:,} inputs, submit -> every result back in order; {args.runs} runs")
    uvm = rates.get("uvm")
    print(f"{'system':<52} {'tasks/s':>17} {'UVM / system':>14}")
    for key, (label, _module) in SYSTEMS.items():
        label = label.format(volunteers=args.volunteers)
        if key in skipped:
            print(f"{label:<52} {'skipped':>17}   {skipped[key]}")
        if key not in rates:
            continue
        low, high = min(rates[key]), max(rates[key])
        span = f"{low:,.0f}" if len(rates[key]) == 1 else f"{low:,.0f}–{high:,.0f}"
        ratio = ""
        if uvm:  # the least favourable pairing of runs to the most
            least, most = min(uvm) / high, max(uvm) / low
            ratio = f"{least:.2f}" if f"{least:.2f}" == f"{most:.2f}" else f"{least:.2f}–{most:.2f}"
        print(f"{label:<52} {span:>17} {ratio:>14}")


if __name__ == "__main__":
    main()

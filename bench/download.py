"""Benchmark: a results download from MariaDB - rows/s, CPU per row and the memory it takes.

Makes a job of N done tasks (each result ``x*x + 1``, sealed as the server seals it), then streams
its export through the same code as ``GET /api/jobs/{id}/results`` (``download.result_pages`` and
``export.render``) and prints rows/s, this process's CPU per row (what contention on a shared
machine inflates least) and the growth of its peak RSS. With ``--http``, a ``uvm-compute serve``
process answers the real endpoint and ``curl`` reads it (the server's CPU is then reported).
Not a test: it asserts nothing, it measures. ``--profile`` prints where the time goes; ``--keep``
keeps the job for the next run (making 1M rows takes minutes).

    .venv/bin/python bench/download.py --rows 1000000 --keep
    .venv/bin/python bench/download.py --rows 1000000 --keep --http
    .venv/bin/python bench/download.py --rows 200000 --format csv --profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import platform
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

import pymysql
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import peak_rss_mib, tree_cpu  # noqa: E402
from server.crypto import Box, hash_token  # noqa: E402
from server.spec import JobSpec  # noqa: E402
from server.store.download import PAGE, result_pages  # noqa: E402
from server.store.engine import make_engine, migrate  # noqa: E402
from server.store.storage import Storage  # noqa: E402
from server.store.tables import jobs, tasks  # noqa: E402
from server.web import export  # noqa: E402
from tests.procs import ServerProcess  # noqa: E402

DATABASE = "uvm_bench_download_" + os.environ.get("UVM_TEST_REDIS_PORT", "6379")
KEY = b"\x5a" * 32
TOKEN = "uvm_bench_download_token"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def make_job(storage: Storage, rows: int) -> int:
    """A range job of ``rows`` tasks, every one materialised (a task row) and done, with its result
    sealed as the server seals it. Range jobs are materialised lazily in windows (server/jobs/feeder.py)
    and a download renders the indices with no row yet without reading anything, so every row is
    written here: the download then reads, decrypts and renders ``rows`` stored results."""
    researcher = await storage.add_researcher("bench@example.org", "x", hash_token(TOKEN))
    job = await storage.create_job(
        researcher, JobSpec(code="def main(x):\n    return x\n", inputs_kind="range", range_stop=rows), 1024
    )
    async with storage.engine.begin() as conn:
        await conn.execute(tasks.delete().where(tasks.c.job_id == job))  # the first window, made anew below
    base = {"job_id": job, "state": "done", "attempts": 1, "replicas": 1, "accepted": "1/1", "finished_at": 1.0}
    for start in range(0, rows, 5000):
        batch = []
        for idx in range(start, min(rows, start + 5000)):
            task_id = idx + 1  # a fresh database holds this job alone
            result = storage.box.seal_json(idx * idx + 1, f"task:{task_id}:result")
            batch.append({**base, "id": task_id, "idx": idx, "result_ct": result})
        async with storage.engine.begin() as conn:
            await conn.execute(mysql_insert(tasks).values(batch))
    async with storage.engine.begin() as conn:
        await conn.execute(jobs.update().where(jobs.c.id == job).values(state="done", n_done=rows, materialised=rows))
    return job


async def download(storage: Storage, job: int, fmt: str, page: int) -> int:
    n_bytes = 0
    async for chunk in export.render(result_pages(storage, job, page=page), fmt):
        n_bytes += len(chunk)
    return n_bytes


def http_download(server: ServerProcess, job: int, fmt: str) -> int:
    url = f"{server.url}/api/jobs/{job}/results?format={fmt}"
    curl = ["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", "-H", f"Authorization: Bearer {TOKEN}", url]
    return int(subprocess.run(curl, check=True, capture_output=True, text=True).stdout)


async def existing_job(engine, rows: int) -> int | None:  # noqa: ANN001
    """The job a ``--keep`` run left, if it has ``rows`` tasks."""
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(jobs.c.n_done, jobs.c.materialised).where(jobs.c.id == 1))).first()
    except sa.exc.SQLAlchemyError:
        return None
    return 1 if row is not None and row.n_done == row.materialised == rows else None


async def main(args: argparse.Namespace) -> None:
    conn = pymysql.connect(host="127.0.0.1", user="root")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{DATABASE}`")
    url = f"mysql+asyncmy://root@127.0.0.1:3306/{DATABASE}"
    engine = make_engine(url)
    server = None
    try:
        storage = Storage(engine, Box({"k1": KEY}, "k1"))
        job = await existing_job(engine, args.rows) if args.keep else None
        if job is None:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
                cur.execute(f"CREATE DATABASE `{DATABASE}`")
            await engine.dispose()
            await migrate(engine)
            started = time.perf_counter()
            job = await make_job(storage, args.rows)
            print(f"made {args.rows} done tasks in {time.perf_counter() - started:.1f} s", flush=True)
        if args.http:
            env = {"UVM_DATABASE_URL": url, "UVM_KEY": KEY.hex(), "UVM_DATA_DIR": f"/tmp/{DATABASE}"}
            server = ServerProcess(env).start()
        pid = server.proc.pid if server and server.proc else 0
        rss = peak_rss_mib(pid) if pid else _rss_mib()
        profiler = cProfile.Profile() if args.profile else None
        for run in range(args.runs):
            if profiler:
                profiler.enable()
            started, cpu = time.perf_counter(), time.process_time()
            if server:
                cpu = tree_cpu(pid)
                n_bytes = http_download(server, job, args.format)
                cpu = tree_cpu(pid) - cpu
            else:
                n_bytes = await download(storage, job, args.format, args.page)
                cpu = time.process_time() - cpu
            seconds = time.perf_counter() - started
            if profiler:
                profiler.disable()
            where = "server process" if server else "this process"
            print(
                f"run {run + 1}: {args.rows} rows ({n_bytes / 1e6:.1f} MB {args.format}) in {seconds:.2f} s = "
                f"{args.rows / seconds:,.0f} rows/s; CPU ({where}) {cpu * 1e6 / args.rows:.2f} us/row; "
                f"peak RSS ({where}) +{(peak_rss_mib(pid) if pid else _rss_mib()) - rss:.1f} MiB; "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    finally:
        if server:
            server.stop()
        await engine.dispose()
        if not args.keep:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
        conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--format", choices=sorted(export.FORMATS), default="ndjson")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--page", type=int, default=PAGE, help="rows per page (query)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--keep", action="store_true", help="reuse the job of an earlier --keep run; keep it")
    parser.add_argument("--http", action="store_true", help="through a serve process and curl")
    asyncio.run(main(parser.parse_args()))

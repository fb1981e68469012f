"""Benchmark: a results download from MariaDB (or SQLite) - rows/s and the memory it takes.

Makes a job of N done tasks (each result ``x*x + 1``, sealed as the server seals it), then streams
its export through the same code as ``GET /api/jobs/{id}/results`` (``Storage.iter_tasks`` and
``export.render``) and prints rows/s and the growth of the process's peak RSS. Not a test: it
asserts nothing, it measures. ``--profile`` prints where the time goes.

    .venv/bin/python bench/download.py --rows 1000000
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
import sys
import time
from pathlib import Path

import pymysql
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.crypto import Box  # noqa: E402
from server.spec import JobSpec  # noqa: E402
from server.store.download import PAGE, result_pages  # noqa: E402
from server.store.engine import make_engine, migrate  # noqa: E402
from server.store.storage import Storage  # noqa: E402
from server.store.tables import jobs, tasks  # noqa: E402
from server.web import export  # noqa: E402

DATABASE = "uvm_bench_download_" + os.environ.get("UVM_TEST_REDIS_PORT", "6379")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def make_job(storage: Storage, rows: int) -> int:
    """A range job of ``rows`` tasks, all done, with their results sealed per task."""
    researcher = await storage.add_researcher("bench@example.org", "x", "t" * 64)
    job = await storage.create_job(
        researcher, JobSpec(code="def main(x):\n    return x\n", inputs_kind="range", range_stop=rows), 1024
    )
    async with storage.engine.connect() as conn:
        ids = [r.id for r in await conn.execute(sa.select(tasks.c.id, tasks.c.idx).where(tasks.c.job_id == job))]
    base = {"job_id": job, "state": "done", "attempts": 1, "replicas": 1, "accepted": "1/1", "finished_at": 1.0}
    for start in range(0, len(ids), 5000):
        batch = []
        for task_id in ids[start : start + 5000]:
            idx = task_id - ids[0]
            result = storage.box.seal_json(idx * idx + 1, f"task:{task_id}:result")
            batch.append({**base, "id": task_id, "idx": idx, "result_ct": result})
        stmt = mysql_insert(tasks).values(batch)
        stmt = stmt.on_duplicate_key_update(state=stmt.inserted.state, result_ct=stmt.inserted.result_ct)
        async with storage.engine.begin() as conn:
            await conn.execute(stmt)
    async with storage.engine.begin() as conn:
        await conn.execute(jobs.update().where(jobs.c.id == job).values(state="done", n_done=rows))
    return job


async def download(storage: Storage, job: int, fmt: str, page: int) -> tuple[int, int]:
    n_bytes = 0
    async for chunk in export.render(result_pages(storage, job, page=page), fmt):
        n_bytes += len(chunk)
    return n_bytes, 0


async def main(args: argparse.Namespace) -> None:
    conn = pymysql.connect(host="127.0.0.1", user="root")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
        cur.execute(f"CREATE DATABASE `{DATABASE}`")
    engine = make_engine(f"mysql+aiomysql://root@127.0.0.1:3306/{DATABASE}")
    try:
        await migrate(engine)
        storage = Storage(engine, Box({"k1": b"\x5a" * 32}, "k1"))
        started = time.perf_counter()
        job = await make_job(storage, args.rows)
        print(f"made {args.rows} done tasks in {time.perf_counter() - started:.1f} s", flush=True)
        rss = _rss_mib()
        profiler = cProfile.Profile() if args.profile else None
        for run in range(args.runs):
            if profiler:
                profiler.enable()
            started = time.perf_counter()
            n_bytes, _ = await download(storage, job, args.format, args.page)
            seconds = time.perf_counter() - started
            if profiler:
                profiler.disable()
            print(
                f"run {run + 1}: {args.rows} rows ({n_bytes / 1e6:.1f} MB {args.format}) in {seconds:.2f} s = "
                f"{args.rows / seconds:,.0f} rows/s; peak RSS +{_rss_mib() - rss:.1f} MiB",
                flush=True,
            )
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    finally:
        await engine.dispose()
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
    asyncio.run(main(parser.parse_args()))

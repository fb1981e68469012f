"""Benchmark: how fast ``rotate-key`` re-encrypts, on MariaDB (or SQLite).

Fills a fresh database with one job of N tasks whose inputs, results and outputs are sealed under
key k1, then re-encrypts everything under k2 and prints values and rows per second. Not a test: it
asserts nothing, it measures.

    .venv/bin/python bench/rotate.py --tasks 20000
    .venv/bin/python bench/rotate.py --backend sqlite --tasks 20000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pymysql  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from server.config import Config  # noqa: E402
from server.crypto import Box  # noqa: E402
from server.spec import parse  # noqa: E402
from server.store import rotation  # noqa: E402
from server.store.engine import make_engine, migrate  # noqa: E402
from server.store.storage import Storage  # noqa: E402
from server.store.tables import tasks  # noqa: E402

DATABASE = "uvm_bench_rotate"
K1, K2 = os.urandom(32), os.urandom(32)


async def fill(url: str, n: int) -> None:
    engine = make_engine(url)
    await migrate(engine)
    box = Box({"k1": K1}, "k1")
    storage = Storage(engine, box)
    researcher = await storage.add_researcher("bench@example.org", "x", "y" * 64)
    spec = parse({"code": "def main(x):\n    return x\n", "inputs": list(range(n))}, Config(max_tasks_per_job=n))
    job = await storage.create_job(researcher, spec, 1 << 20)
    async with engine.begin() as conn:
        ids = (await conn.execute(sa.select(tasks.c.id).where(tasks.c.job_id == job))).scalars().all()
        for start in range(0, len(ids), 1000):
            rows = [
                {
                    "id_": tid,
                    "r": box.seal_json({"value": tid, "pad": "x" * 64}, f"task:{tid}:result"),
                    "o": box.seal_text(f"task {tid} printed this\n", f"task:{tid}:output"),
                }
                for tid in ids[start : start + 1000]
            ]
            await conn.execute(
                tasks.update()
                .where(tasks.c.id == sa.bindparam("id_"))
                .values(result_ct=sa.bindparam("r"), output_ct=sa.bindparam("o"), state="done"),
                rows,
            )
    await engine.dispose()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["mariadb", "sqlite"], default="mariadb")
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args()
    if args.backend == "mariadb":
        conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="")
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
            cur.execute(f"CREATE DATABASE {DATABASE}")
        url = f"mysql+aiomysql://root@127.0.0.1:3306/{DATABASE}"
    else:
        url = f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/rotate.sqlite3"
    await fill(url, args.tasks)
    engine = make_engine(url)
    box = Box({"k2": K2, "k1": K1}, "k2")
    try:
        t0 = time.perf_counter()
        report = await rotation.rotate(engine, box, batch=args.batch)
        elapsed = time.perf_counter() - t0
    finally:
        await engine.dispose()
    rows = args.tasks + 1  # the tasks and the job
    print(
        f"{args.backend}: {report.rewritten} values in {rows} rows re-encrypted in {elapsed:.2f} s: "
        f"{report.rewritten / elapsed:,.0f} values/s, {rows / elapsed:,.0f} rows/s (batch {args.batch}); "
        f"left under old keys: {report.remaining}"
    )
    if args.backend == "mariadb":
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        conn.close()


if __name__ == "__main__":
    asyncio.run(main())

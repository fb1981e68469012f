"""Several server processes on one MariaDB + Redis; Redis flushed mid-job; encryption at rest.

Done-when 4, 5 and 6 of the backend issue, with real processes, MariaDB, Redis and SQLite.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import pymysql
import pytest

from tests.conftest import REDIS_URL, Api, mysql_url
from tests.procs import ServerProcess, add_researcher
from workers.sim import SimVolunteer

CODE = "def main(x):\n    return [x, x * 7]\n"


@pytest.fixture
def mariadb_env(mariadb_database: str, tmp_path: Path) -> dict[str, str]:
    return {
        "UVM_DATA_DIR": str(tmp_path / "data"),
        "UVM_DATABASE_URL": mysql_url(mariadb_database),
        "UVM_REDIS_URL": REDIS_URL,
        "UVM_KEY": "11" * 32,
        "UVM_DEFAULT_REPLICATION": "1",  # one replica per task: these tests are about dispatch
    }


async def _run_sims(sims: list[SimVolunteer], stop: asyncio.Event) -> list[asyncio.Task]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def one(sim: SimVolunteer) -> None:
        while not stop.is_set():
            try:
                await sim.run(session, stop)
            except (aiohttp.ClientError, ConnectionError, OSError):
                await asyncio.sleep(0.2)

    tasks = [asyncio.create_task(one(s)) for s in sims]
    closer = asyncio.create_task(_close_after(stop, tasks, session))
    return [*tasks, closer]


async def _close_after(stop: asyncio.Event, tasks: list[asyncio.Task], session: aiohttp.ClientSession) -> None:
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()


def _db_rows(database: str, query: str) -> list[tuple]:
    conn = pymysql.connect(host="127.0.0.1", user="root", password="", database=database)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return list(cur.fetchall())
    finally:
        conn.close()


async def test_two_instances_hand_out_each_task_once(mariadb_env, mariadb_database, redis_client):
    token = add_researcher(mariadb_env, "two@example.org")
    a = ServerProcess(mariadb_env).start()
    b = ServerProcess(mariadb_env).start()
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(a.url, session, token)
            job = await api.submit(CODE, list(range(600)))
            sims = [SimVolunteer(a.url if i % 2 else b.url, prefetch=4) for i in range(6)]
            runs = await _run_sims(sims, stop)
            result = await api.wait(job, timeout=90)
            assert result["state"] == "done"
            rows = json.loads(await Api(b.url, session, token).results(job))
            assert [r["result"] for r in rows] == [[x, x * 7] for x in range(600)]
            stop.set()
            await asyncio.gather(*runs)
        per_server = [sum(s.done for s in sims[i::2]) for i in (0, 1)]
        assert all(n > 0 for n in per_server), per_server  # both instances handed out work
        handed = [t for s in sims for t in s.task_ids]
        assert len(handed) == 600 and len(set(handed)) == 600  # no task ran twice
        attempts = _db_rows(mariadb_database, "SELECT task_id, COUNT(*) FROM attempts GROUP BY task_id")
        assert len(attempts) == 600 and {n for _, n in attempts} == {1}  # one hand-out each
        outcomes = _db_rows(mariadb_database, "SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome")
        assert outcomes == [("done", 600)]
    finally:
        stop.set()
        a.stop()
        b.stop()


async def test_redis_flushed_mid_job_then_restart(mariadb_env, mariadb_database, redis_client):
    token = add_researcher(mariadb_env, "flush@example.org")
    server = ServerProcess(mariadb_env).start()
    stop = asyncio.Event()
    slow = "import time\ndef main(x):\n    time.sleep(0.01)\n    return x * 2\n"
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(server.url, session, token)
            job = await api.submit(slow, list(range(300)))
            sims = [SimVolunteer(server.url, prefetch=2) for _ in range(3)]
            runs = await _run_sims(sims, stop)
            while (await api.job(job))["counts"]["done"] < 60:
                await asyncio.sleep(0.05)
            await redis_client.flushall()  # ready queue, leases: all gone
            server.stop(kill=True)
            server.start()  # rebuilds Redis from MariaDB
            result = await api.wait(job, timeout=90)
            assert result["state"] == "done", result
            rows = json.loads(await api.results(job))
            assert [r["result"] for r in rows] == [x * 2 for x in range(300)]
            stop.set()
            await asyncio.gather(*runs)
        done = _db_rows(
            mariadb_database, "SELECT task_id, COUNT(*) FROM attempts WHERE outcome='done' GROUP BY task_id"
        )
        assert len(done) == 300 and {n for _, n in done} == {1}  # each result recorded once
    finally:
        stop.set()
        server.stop()


CANARY = "CANARY-7f3a9e"


async def _canary_job(url: str, token: str) -> None:
    code = f"SECRET = '{CANARY}-code'\ndef main(x):\n    print('{CANARY}-printed')\n    return x + '-{CANARY}-result'\n"
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        api = Api(url, session, token)
        job = await api.submit(code, [f"{CANARY}-input-{i}" for i in range(5)], name="canary")
        runs = await _run_sims([SimVolunteer(url)], stop)
        assert (await api.wait(job))["state"] == "done"
        rows = json.loads(await api.results(job))
        assert rows[0]["result"] == f"{CANARY}-input-0-{CANARY}-result"  # decrypts fine
        assert rows[0]["output"] == f"{CANARY}-printed\n"
        stop.set()
        await asyncio.gather(*runs)


async def test_canary_not_in_mysqldump(mariadb_env, mariadb_database, redis_client):
    token = add_researcher(mariadb_env, "canary@example.org")
    server = ServerProcess(mariadb_env).start()
    try:
        await _canary_job(server.url, token)
    finally:
        server.stop()
    dump = subprocess.run(
        ["mysqldump", "-h127.0.0.1", "-uroot", "--hex-blob", mariadb_database], capture_output=True, check=True
    ).stdout
    raw = subprocess.run(["mysqldump", "-h127.0.0.1", "-uroot", mariadb_database], capture_output=True).stdout
    assert b"INSERT INTO `tasks`" in dump and b"canary@example.org" in dump  # the dump has the rows
    for blob in (dump, raw):
        assert CANARY.encode() not in blob
        assert CANARY.encode().hex().encode() not in blob.lower()


async def test_canary_not_in_sqlite_file(tmp_path: Path):
    env = {"UVM_DATA_DIR": str(tmp_path / "data"), "UVM_DEFAULT_REPLICATION": "1"}
    token = add_researcher(env, "canary@example.org")
    server = ServerProcess(env).start()
    try:
        await _canary_job(server.url, token)
    finally:
        server.stop()
    key = tmp_path / "data" / "secret.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    files = list((tmp_path / "data").glob("uvm.sqlite3*"))
    assert files
    conn = sqlite3.connect(tmp_path / "data" / "uvm.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone() == (5,)
    conn.close()
    for path in files:
        assert CANARY.encode() not in path.read_bytes(), path


async def test_database_connections_killed_mid_job(mariadb_env, mariadb_database, redis_client):
    """MariaDB drops every connection (as in a restart): the job still completes, nothing lost."""
    token = add_researcher(mariadb_env, "gone@example.org")
    server = ServerProcess(mariadb_env).start()
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(server.url, session, token)
            job = await api.submit(CODE, list(range(400)))
            runs = await _run_sims([SimVolunteer(server.url, prefetch=2) for _ in range(3)], stop)
            for progress in (50, 150, 250):  # three times, so some kills land mid-query
                while (await api.job(job))["counts"]["done"] < progress:
                    await asyncio.sleep(0.01)
                victims = _db_rows(
                    "information_schema",
                    f"SELECT id FROM processlist WHERE db = '{mariadb_database}' AND id <> CONNECTION_ID()",
                )
                assert victims  # the server's pooled connections
                for (conn_id,) in victims:
                    try:
                        _db_rows("information_schema", f"KILL {int(conn_id)}")
                    except pymysql.err.OperationalError as exc:  # it closed since the listing: gone anyway
                        assert exc.args[0] == 1094, exc
            result = await api.wait(job, timeout=60)
            assert result["state"] == "done"
            rows = json.loads(await api.results(job))
            assert [r["result"] for r in rows] == [[x, x * 7] for x in range(400)]
            stop.set()
            await asyncio.gather(*runs)
    finally:
        stop.set()
        server.stop()

"""``uvm-compute serve --processes N``: N processes on one port (SO_REUSEPORT), each an instance of
its own on the shared MariaDB + Redis; refused without them. Real processes, MariaDB and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp

from tests.conftest import Api
from tests.procs import ROOT, ServerProcess, add_researcher
from tests.test_multi_instance import _db_rows, _run_sims, mariadb_env  # noqa: F401
from workers.sim import SimVolunteer


def _instance(url: str) -> str:
    with urllib.request.urlopen(url + "/api/health", timeout=10) as resp:  # a new connection each time
        return json.loads(resp.read())["instance"]


async def test_two_processes_share_the_port_and_the_work(mariadb_env, mariadb_database, redis_client):  # noqa: F811
    token = add_researcher(mariadb_env, "procs@example.org")
    server = ServerProcess(mariadb_env, args=("--processes", "2")).start()
    stop = asyncio.Event()
    try:
        instances: set[str] = set()
        for _ in range(300):  # the second process may still be starting; then the kernel spreads connections
            instances.add(_instance(server.url))
            if len(instances) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(instances) == 2, instances
        async with aiohttp.ClientSession() as session:
            api = Api(server.url, session, token)
            job = await api.submit("def main(x):\n    return x * 3\n", list(range(300)))
            runs = await _run_sims([SimVolunteer(server.url, prefetch=2) for _ in range(4)], stop)
            assert (await api.wait(job, timeout=120))["state"] == "done"
            rows = json.loads(await api.results(job))
            assert [r["result"] for r in rows] == [x * 3 for x in range(300)]
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
        done = _db_rows(mariadb_database, f"SELECT COUNT(*) FROM attempts WHERE job_id = {job} AND outcome = 'done'")
        assert done[0][0] == 300  # each task handed out once, whichever process the volunteer reached
    finally:
        stop.set()
        proc = server.proc
        server.stop()
        assert proc is not None and proc.returncode == 0  # SIGTERM to the parent stops both, cleanly


def test_processes_need_a_shared_database_and_queue(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVM_")} | {"UVM_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--processes", "2", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--processes 2 needs a database and a queue the processes share" in proc.stderr

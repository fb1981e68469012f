"""Operators' tools: check-config, JSON logs, and the backup-and-restore drill of the README."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import aiohttp
import pymysql
import pytest
import redis.asyncio as aioredis

from server import protocol as P
from tests.conftest import MYSQL, REDIS_URL, TEST_KEY, mysql_url
from tests.procs import ServerProcess, add_researcher, free_port
from tests.test_keys import K2, _cli, _sims


def test_check_config_reports_what_it_found(mariadb_database, tmp_path, redis_client):
    env = {
        "UVM_DATA_DIR": str(tmp_path),
        "UVM_DATABASE_URL": mysql_url(mariadb_database),
        "UVM_REDIS_URL": REDIS_URL,
        "UVM_KEY": TEST_KEY,
        "UVM_TRUSTED_PROXIES": "10.0.0.1",
        "UVM_METRICS_TOKEN": "m" * 20,
    }
    good = _cli(env, "check-config")
    assert good.returncode == 0, good.stdout + good.stderr
    for expected in ("database reached: version 10.", "schema not created yet", "Redis reached: version 7.",
                     "trusted proxies: 10.0.0.1/32", "/metrics readable by: a token", "configuration OK"):  # fmt: skip
        assert expected in good.stdout, good.stdout
    assert "m" * 20 not in good.stdout and TEST_KEY not in good.stdout  # no secrets printed

    ServerProcess(env).start().stop()  # the schema and the key's fingerprint are recorded
    assert "key matches the fingerprint" in _cli(env, "check-config").stdout

    bad = _cli(env | {"UVM_KEY": K2.hex(), "UVM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "check-config")
    assert bad.returncode == 1
    assert "PROBLEM: the key given for key id 'k1' is not the key" in bad.stdout
    assert "PROBLEM: Redis not reachable" in bad.stdout and "2 problem(s) found" in bad.stdout
    nokey = _cli({k: v for k, v in env.items() if k != "UVM_KEY"}, "check-config")
    assert nokey.returncode == 1 and "PROBLEM: UVM_KEY is not set" in nokey.stdout
    down = _cli(env | {"UVM_DATABASE_URL": f"mysql+aiomysql://root@127.0.0.1:{free_port()}/x"}, "check-config")
    assert down.returncode == 1 and "PROBLEM: database not reachable" in down.stdout
    typo = _cli(env | {"UVM_METRIC_TOKEN": "x"}, "check-config")
    assert typo.returncode == 2 and "unknown setting UVM_METRIC_TOKEN" in typo.stderr


def test_check_config_masks_passwords():
    from server.ops import _mask

    assert _mask("mysql+aiomysql://uvm:hunter2@db:3306/uvm") == "mysql+aiomysql://uvm:***@db:3306/uvm"
    assert _mask("redis://:pw@r:6379/0") == "redis://:***@r:6379/0"
    assert _mask("redis://r:6379/0") == "redis://r:6379/0"


async def test_json_logs_carry_job_attempt_and_volunteer(tmp_path):
    env = {"UVM_DATA_DIR": str(tmp_path), "UVM_LOG_FORMAT": "json"}
    token = add_researcher(env, "logs@example.org")
    server = ServerProcess(env).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{server.url}/api/jobs",
                json={"code": "def main(x):\n    return x\n", "inputs": [1, 2, 3]},
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                job = (await resp.json())["id"]
            async with session.ws_connect(server.url.replace("http", "ws") + "/ws/volunteer") as ws:
                await ws.send_str(P.encode(P.Hello("", {})))
                volunteer = P.decode(await ws.receive_str()).volunteer.split("-", 1)[0]  # the id the server issued
                while True:
                    await ws.send_str(P.encode(P.Ready(2)))
                    tasks = P.decode(await ws.receive_str()).tasks
                    if tasks:
                        break
                    await asyncio.sleep(0.1)
            # the socket closed holding two attempts: they go back, and the log says so
            for _ in range(100):
                if "left holding" in server.log.read_text():
                    break
                await asyncio.sleep(0.1)
    finally:
        server.stop()
    lines = [ln for ln in server.log.read_text().splitlines() if ln.startswith("{")]
    entries = [json.loads(ln) for ln in lines]
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    submitted = next(e for e in entries if e["message"] == f"job {job} submitted")
    assert submitted["job"] == job
    left = next(e for e in entries if "left holding" in e["message"])
    assert left["volunteer"] == volunteer and sorted(left["attempts"]) == sorted(t.attempt for t in tasks)


def _mysql(*args: str, stdin: bytes | None = None) -> bytes:
    base = ["-uroot", f"-h{MYSQL['host']}", f"-P{MYSQL['port']}"]
    return subprocess.run([args[0], *base, *args[1:]], input=stdin, check=True, capture_output=True).stdout


@pytest.mark.parametrize("backend", ["mariadb"])
async def test_restore_drill(serve, volunteers, mariadb_database):
    """The README's drill: dump the database, restore it into a fresh one, start a server on it with
    the same key and an empty Redis: finished results download again, unfinished work completes."""
    api, app = await serve()
    code = "def main(x):\n    return [x, x * x]\n"
    finished = await api.submit(code, list(range(50)))
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        sims = await _sims(api.url, 2, stop, session)
        await api.wait(finished)
        stop.set()
        await asyncio.gather(*sims, return_exceptions=True)
    before = await api.results(finished, "csv")
    pending = await api.submit(code, {"range": [0, 30]})  # nobody works on it before the backup

    dump = _mysql("mysqldump", "--single-transaction", "--routines", mariadb_database)
    restored = "uvm_restore_" + uuid.uuid4().hex[:8]
    conn = pymysql.connect(**MYSQL)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{restored}`")
        _mysql("mariadb", restored, stdin=dump)
        empty = REDIS_URL.rsplit("/", 1)[0] + "/11"  # not the first server's: an empty Redis
        client = aioredis.from_url(empty)
        await client.flushdb()
        await client.aclose()
        api2, _ = await serve(database_url=mysql_url(restored), redis_url=empty)
        api2.token = api.token  # the accounts came back too
        assert await api2.results(finished, "csv") == before
        volunteers(api2.url, 2)
        assert (await api2.wait(pending))["state"] == "done"
        assert [r["result"] for r in json.loads(await api2.results(pending))][-1] == [29, 29 * 29]
        wrong = _cli({"UVM_DATABASE_URL": mysql_url(restored), "UVM_KEY": K2.hex()}, "check-config")
        assert "not the key this database has used" in wrong.stdout  # a restore needs the key too
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{restored}`")
        conn.close()


def test_systemd_unit_example():
    """deploy/uvm-compute.service: restarts on failure, checks the configuration first, serves."""
    import configparser

    from tests.procs import ROOT

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keys are case-sensitive in systemd
    unit.read(ROOT / "deploy" / "uvm-compute.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["ExecStartPre"].endswith("uvm-compute check-config")
    assert " serve " in service["ExecStart"] and service["EnvironmentFile"] == "/etc/uvm-compute/env"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    from server.cli import parser

    args = service["ExecStart"].split()[1:]
    assert parser().parse_args(args).command == "serve"  # the command line is one the CLI accepts

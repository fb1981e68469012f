"""Shared fixtures: each backend pair (SQLite + in-process, MariaDB + Redis) as a factory.

MariaDB and Redis are real services (``make test`` starts them). Each test gets a fresh MariaDB
database and an empty Redis database number of its own.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pymysql
import pytest
import redis.asyncio as aioredis

from server.config import Config
from server.web.app import create_app
from workers.sim import SimVolunteer

MYSQL = dict(host="127.0.0.1", port=3306, user="root", password="")
REDIS_DB = int(os.environ.get("UVM_TEST_REDIS_DB", "9"))
# UVM_TEST_REDIS_PORT lets parallel checkouts each run the suite against a Redis of their own.
REDIS_PORT = int(os.environ.get("UVM_TEST_REDIS_PORT", "6379"))
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/{REDIS_DB}"
BACKENDS = ["sqlite", "mariadb"]
STOP_GRACE = 20.0  # seconds simulated volunteers get to stop at the end of a test (a task may be running)
TEST_KEY = "5a" * 32  # UVM_KEY of the MariaDB tests (a server refuses MySQL without an explicit key)


@pytest.fixture(scope="session", autouse=True)
def _redis_to_ourselves() -> AsyncIterator[None]:
    """One test run at a time per Redis server. Job, task and attempt ids start at 1 in every
    test's fresh database, so two runs sharing a Redis database hand out each other's tasks
    (the same members, ``1:1:0:...``): the first ``ready`` after a submit then gets nothing, or a
    task of the other run. A second run on the same port stops at once and says why instead."""
    path = os.path.join(tempfile.gettempdir(), f"uvm-tests-redis-{REDIS_PORT}.lock")
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pytest.exit(
                f"another test run uses the Redis on port {REDIS_PORT} ({path} is locked): wait for it, or "
                "give this checkout a Redis of its own with UVM_TEST_REDIS_PORT",
                returncode=3,
            )
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)


def mysql_url(db: str) -> str:
    return f"mysql+aiomysql://root@127.0.0.1:3306/{db}"


@pytest.fixture
def mariadb_database() -> AsyncIterator[str]:
    name = "uvm_t_" + uuid.uuid4().hex[:10]
    conn = pymysql.connect(**MYSQL)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture
def redis_url() -> str:
    """The Redis database of this test; a module may override it to keep apart from others."""
    return REDIS_URL


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_config(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Config]:
    """Config for the test's backend; MariaDB gets a fresh database, Redis a flushed db."""
    extra: dict = {}
    if backend == "mariadb":
        db = request.getfixturevalue("mariadb_database")
        request.getfixturevalue("redis_client")
        extra = {
            "UVM_DATABASE_URL": mysql_url(db),
            "UVM_REDIS_URL": request.getfixturevalue("redis_url"),
            "UVM_KEY": TEST_KEY,  # required on MySQL
        }

    def make(**overrides: object) -> Config:
        # Tests that are not about verification run one replica per task (one simulated volunteer
        # completes a job); tests of verification ask for their replication explicitly.
        env = {"UVM_DATA_DIR": str(tmp_path / "data"), "UVM_DEFAULT_REPLICATION": "1", **extra}
        return Config.from_env(env, **overrides)

    return make


@dataclass
class Api:
    """A researcher's view of a running server."""

    url: str
    session: aiohttp.ClientSession
    token: str

    def headers(self, token: str | None = None) -> dict:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def submit(self, code: str, inputs: object = None, **options: object) -> int:
        async with self.session.post(
            f"{self.url}/api/jobs", json={"code": code, "inputs": inputs, **options}, headers=self.headers()
        ) as resp:
            body = await resp.json()
            assert resp.status == 201, body
            return body["id"]

    async def job(self, job_id: int) -> dict:
        async with self.session.get(f"{self.url}/api/jobs/{job_id}", headers=self.headers()) as resp:
            assert resp.status == 200
            return await resp.json()

    async def wait(self, job_id: int, timeout: float = 60.0) -> dict:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            job = await self.job(job_id)
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            if loop.time() > end:
                raise AssertionError(f"job {job_id} did not finish: {job}")
            await asyncio.sleep(0.1)

    async def results(self, job_id: int, fmt: str = "json") -> str:
        async with self.session.get(
            f"{self.url}/api/jobs/{job_id}/results", params={"format": fmt}, headers=self.headers()
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.text()


async def add_researcher(app_or_storage: object, email: str, operator: bool = False) -> str:
    from server.crypto import hash_password, hash_token, new_token
    from server.web import appkeys as K

    storage = app_or_storage[K.storage] if hasattr(app_or_storage, "router") else app_or_storage
    token = new_token()
    await storage.add_researcher(email, hash_password("correct horse"), hash_token(token), operator=operator)
    return token


@pytest.fixture
async def serve(aiohttp_server, make_config) -> AsyncIterator[Callable]:
    """``await serve(**config_overrides)`` -> (Api, app) on the test's backend."""
    sessions: list[aiohttp.ClientSession] = []
    servers: list = []

    async def start(**overrides: object) -> tuple[Api, object]:
        app = create_app(make_config(**overrides))
        server = await aiohttp_server(app)
        servers.append(server)
        session = aiohttp.ClientSession()
        sessions.append(session)
        token = await add_researcher(app, f"r{len(sessions)}-{uuid.uuid4().hex[:6]}@example.org")
        return Api(str(server.make_url("")).rstrip("/"), session, token), app

    yield start
    for session in sessions:
        await session.close()
    for server in servers:  # before the test's database is dropped
        await server.close()


@pytest.fixture
async def volunteers() -> AsyncIterator[Callable]:
    """``volunteers(url, n, **kw)`` starts simulated volunteers; all stop at the end of the test."""
    stop = asyncio.Event()
    runs: list[asyncio.Task] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    def start(url: str, n: int, **kwargs: object) -> list[SimVolunteer]:
        sims = [SimVolunteer(url, **kwargs) for _ in range(n)]
        for sim in sims:
            runs.append(asyncio.create_task(_run_until(sim, session, stop)))
        return sims

    yield start
    stop.set()
    # Bounded: a volunteer stuck waiting for an answer that never comes must not hang the run.
    _, stuck = await asyncio.wait(runs, timeout=STOP_GRACE) if runs else (set(), set())
    for run in stuck:
        run.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    await session.close()
    if stuck:
        logging.getLogger(__name__).warning("%d simulated volunteers did not stop when told: cancelled", len(stuck))


async def _run_until(sim: SimVolunteer, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await sim.run(session, stop)
        except (aiohttp.ClientError, ConnectionError, OSError):
            await asyncio.sleep(0.2)
        except Exception:  # anything else: reconnect, as a browser's page does, rather than vanish
            logging.getLogger(__name__).exception("simulated volunteer %s reconnects", sim.volunteer)
            await asyncio.sleep(0.2)
        if sim.crash_after is not None and sim.leased >= sim.crash_after:
            return
        if sim.crashed:  # vanished mid-task (crash_after_checkpoints): gone for good
            return
        if sim.leave_after is not None and sim.batches >= sim.leave_after:  # did its share and left
            return

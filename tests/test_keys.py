"""Key safety and rotation: servers with diverging keys refuse to start; rotate-key re-encrypts live data."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import urllib.request
import warnings

import aiohttp
import pytest
import sqlalchemy as sa

from server import protocol as P
from server.config import Config, ConfigError
from server.crypto import key_id_of
from server.queue import redis_keys
from server.store import rotation
from server.store.keys import KeyProblem, box_for, check_keys
from server.store.tables import key_fingerprints
from server.web import appkeys as K
from tests.conftest import mysql_url
from tests.procs import ROOT, ServerProcess
from workers.sim import SimVolunteer

K1, K2 = bytes.fromhex("a1" * 32), bytes.fromhex("b2" * 32)


def _cli(env: dict[str, str], *args: str, stdin: str = "a long enough password\n") -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UVM_")}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        env=clean | env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=stdin,
    )


def _serve_refused(env: dict[str, str]) -> str:
    """Start `serve`, expect it to exit by itself with code 2; returns what it printed."""
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", "0"],
        env={k: v for k, v in os.environ.items() if not k.startswith("UVM_")} | env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stderr


def test_mysql_without_key_refuses_to_start(mariadb_database, tmp_path):
    env = {"UVM_DATABASE_URL": mysql_url(mariadb_database), "UVM_DATA_DIR": str(tmp_path)}
    err = _serve_refused(env)
    assert "UVM_KEY is not set" in err and "os.urandom(32).hex()" in err
    assert not (tmp_path / "secret.key").exists()  # no key was generated behind the operator's back
    add = _cli(env, "researcher", "add", "x@example.org", "--password-stdin")
    assert add.returncode == 1 and "UVM_KEY is not set" in add.stderr


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"])
def test_second_server_with_another_key_refuses(backend, tmp_path, request):
    env = {"UVM_DATA_DIR": str(tmp_path / "data"), "UVM_KEY": K1.hex()}
    if backend == "mariadb":
        env["UVM_DATABASE_URL"] = mysql_url(request.getfixturevalue("mariadb_database"))
    first = ServerProcess(env).start()
    try:
        err = _serve_refused(env | {"UVM_KEY": K2.hex()})
        assert "refusing to start" in err and "key id 'k1' is not the key this database has used" in err
        assert "Every server on one database needs the same UVM_KEY" in err
        again = ServerProcess(env).start()  # the same key is welcome
        again.stop()
    finally:
        first.stop()
    # A generated key (embedded default) is recorded too: an explicit other key is refused.
    if backend == "sqlite":
        fresh = {"UVM_DATA_DIR": str(tmp_path / "generated")}
        ServerProcess(fresh).start().stop()
        assert "not the key" in _serve_refused(fresh | {"UVM_KEY": K2.hex()})


async def test_database_from_before_fingerprints_checks_its_rows(serve):
    """No fingerprint stored yet (an upgraded database): the key must still open the rows it has."""
    api, app = await serve(key=K1)
    job = await api.submit("def main(x):\n    return x\n", [1])
    async with app[K.storage].engine.begin() as conn:
        await conn.execute(key_fingerprints.delete())
    with pytest.raises(KeyProblem, match=f"does not decrypt job {job}"):
        await check_keys(app[K.storage].engine, box_for(Config(key=K2)))
    assert await check_keys(app[K.storage].engine, box_for(Config(key=K1))) == []


def test_old_keys_setting_is_checked():
    config = Config.from_env({"UVM_OLD_KEYS": f"k0:{K1.hex()}, old2:{K2.hex()}"})
    assert config.old_keys == (("k0", K1), ("old2", K2))
    for raw, message in [
        (f"k1:{K1.hex()}", "current UVM_KEY_ID"),
        ("k0", "id:hex pairs"),
        ("k0:abcd", "64 hex digits"),
        (f"k0:{K1.hex()},k0:{K2.hex()}", "appears twice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Config.from_env({"UVM_OLD_KEYS": raw})


class Holder:
    """A scripted volunteer that leases one task and keeps it until told: the job stays running."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("http://", "ws://") + "/ws/volunteer"

    async def take(self, session: aiohttp.ClientSession) -> P.TaskSpec:
        self.ws = await session.ws_connect(self.url)
        await self.ws.send_str(P.encode(P.Hello("holder-1", {"cores": 1}, protocol=3)))  # polls: see below
        assert P.decode(await self.ws.receive_str()).TYPE == "welcome"
        while True:  # a server that just started may still be filling its ready queue
            await self.ws.send_str(P.encode(P.Ready(1)))
            tasks = P.decode(await self.ws.receive_str())
            if tasks.tasks:
                self.spec = tasks.tasks[0]
                return self.spec
            await asyncio.sleep(0.1)

    async def finish(self, result: object) -> P.Ack:
        out = P.Outcome(attempt=self.spec.attempt, task=self.spec.task, result=result)
        await self.ws.send_str(P.encode(P.Results([out])))
        ack = P.decode(await self.ws.receive_str())
        await self.ws.close()
        return ack


async def _sims(url: str, n: int, stop: asyncio.Event, session: aiohttp.ClientSession) -> list[asyncio.Task]:
    sims = [SimVolunteer(url, prefetch=4) for _ in range(n)]
    tasks = [asyncio.create_task(sim.run(session, stop)) for sim in sims]
    SIMS.update(zip(tasks, sims, strict=True))
    return tasks


SIMS: dict[asyncio.Task, SimVolunteer] = {}  # each sim's run -> the sim, for `_why_not_finished`


async def _why_not_finished(app, job: int, sims: list[asyncio.Task]) -> str:  # noqa: ANN001
    """What holds the job's open tasks, for a failure's message: every live lease of the job (its
    volunteer and server instance) and each sim's state, with the error its run ended on, if any."""
    queue = app[K.dispatcher].queue
    if hasattr(queue, "redis"):
        raw = await queue.redis.hgetall(redis_keys.LEASES)
        text = lambda b: b.decode() if isinstance(b, bytes) else str(b)  # noqa: E731
        leases = [(text(k), text(v)) for k, v in raw.items()]
    else:
        leases = [(a, f"{score}|{member}|{who}|") for a, (score, member, who) in queue._leases.items()]
    mine = [(a, v) for a, v in leases if v.split("|")[1].startswith(f"{job}:")]
    lines = [f"live leases of job {job}: {mine}"]
    for run in sims:
        sim = SIMS[run]
        ended = repr(run.exception()) if run.done() and not run.cancelled() else "running"
        lines.append(
            f"sim {sim.volunteer}: {ended}; leased {sim.leased}, done {sim.done}, unrun {sim.unrun}, "
            f"holds {sim.holds}, refusals {sim.refusals[-3:]}, received {dict(sim.received)}"
        )
    return "\n".join(lines)


async def _values(engine) -> list[tuple[str, bytes]]:  # noqa: ANN001
    """Every stored ciphertext: (where, value)."""
    out = []
    async with engine.connect() as conn:
        for spec in rotation.SEALED:
            for row in (await conn.execute(sa.select(spec.table))).all():
                for name in spec.columns:
                    value = getattr(row, name)
                    if value:
                        out.append((f"{spec.table.name}:{row.id}:{name}", value))
    return out


async def _rotate(config, *args: str) -> str:  # noqa: ANN001
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVM_")} | {
        "UVM_DATA_DIR": str(config.data_dir),
        "UVM_KEY": K2.hex(),
        "UVM_KEY_ID": "k2",
        "UVM_OLD_KEYS": f"k1:{K1.hex()}",
    }
    if config.database_url:
        env["UVM_DATABASE_URL"] = config.database_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "rotate-key", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


@pytest.mark.timeout(240)  # a lease left until it expires (below) makes it about 2 minutes
async def test_rotate_key_while_volunteers_work(serve, caplog):
    """A finished job and a running one, written under k1; the servers restart on k2 with k1 as an
    old key; rotate-key (interrupted once) re-encrypts while volunteers keep working; afterwards a
    server that knows only k2 reads everything."""
    code = "def main(x):\n    return x * x\n"
    async with aiohttp.ClientSession() as session:
        # no chunks on the first server: its two volunteers, told to stop at 60 results, finish what they
        # hold first, and chunks of hundreds of tiny tasks would have finished the job (the key must
        # rotate while it runs); the second server hands out in chunks as usual
        api1, app1 = await serve(key=K1, key_id="k1", chunk_target=0.0)
        finished = await api1.submit(code, list(range(40)))
        running = await api1.submit(code, list(range(600)), max_attempts=5)
        stop = asyncio.Event()
        sims = await _sims(api1.url, 2, stop, session)
        await api1.wait(finished)
        while (await api1.job(running))["counts"]["done"] < 60:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*sims, return_exceptions=True)
        first = sims

        api2, app2 = await serve(key=K2, key_id="k2", old_keys=(("k1", K1),))
        api2.token = api1.token
        config = app2[K.config]
        holder = Holder(api2.url)
        held = await holder.take(session)  # this task stays leased: the job cannot finish yet
        stop = asyncio.Event()
        sims = await _sims(api2.url, 2, stop, session)
        out = await _rotate(config, "--batch", "10", "--max-rows", "30")
        assert "stopped after --max-rows 30" in out
        before = {where: key_id_of(v) for where, v in await _values(app2[K.storage].engine)}
        assert "k1" in before.values()  # interrupted: some rows still under k1
        out = await _rotate(config, "--batch", "50")
        assert "no row uses key 'k1' any more: remove it from UVM_OLD_KEYS" in out
        assert "%|" in out  # tqdm's bar
        assert (await api2.job(running))["state"] == "running"  # rotated while the job ran

        ack = await holder.finish(held.input * held.input)
        assert ack.attempts == [held.attempt]
        # Done in about a second. Twice in CI runs (never here) a first-server volunteer's last 4
        # leases, made as it stopped, were left with nobody computing them: they expire after the
        # job's timeout and the grace (90 s), and others do the tasks. The rotation under test is not
        # at fault, so that is waited for, and reported in the run's warnings with who held what.
        try:
            await api2.wait(running, timeout=30.0)
        except AssertionError as exc:
            left = f"{exc}\n{await _why_not_finished(app2, running, [*first, *sims])}"
            try:
                await api2.wait(running, timeout=80.0)
            except AssertionError as again:
                raise AssertionError(f"{left}\nand 80 s later: {again}") from None
            warnings.warn(f"a lease was left until it expired: {left}", stacklevel=1)
        stop.set()
        await asyncio.gather(*sims, return_exceptions=True)

        values = await _values(app2[K.storage].engine)
        assert values and {key_id_of(v) for _, v in values} == {"k2"}, [w for w, v in values if key_id_of(v) != "k2"]

        caplog.set_level(logging.WARNING)
        await serve(key=K2, key_id="k2", old_keys=(("k1", K1),))  # told that k1 can go
        assert "old key k1 is no longer used by any row" in caplog.text
        api3, _ = await serve(key=K2, key_id="k2")  # only the new key
        api3.token = api1.token
        for job, n in ((finished, 40), (running, 600)):
            rows = json.loads(await api3.results(job))
            assert [r["result"] for r in rows] == [i * i for i in range(n)]


def test_rotate_key_refuses_without_the_old_key(tmp_path):
    env = {"UVM_DATA_DIR": str(tmp_path), "UVM_KEY": K1.hex()}
    server = ServerProcess(env).start()
    try:
        token = _cli(env, "researcher", "add", "r@example.org", "--password-stdin").stdout.split()[-1]
        req = urllib.request.Request(
            server.url + "/api/jobs",
            data=json.dumps({"code": "def main(x):\n    return x\n", "inputs": [1]}).encode(),
            headers={"Authorization": f"Bearer {token}"},
        )
        urllib.request.urlopen(req).close()
    finally:
        server.stop()
    out = _cli(env | {"UVM_KEY": K2.hex(), "UVM_KEY_ID": "k2"}, "rotate-key")
    assert out.returncode == 1 and "give every key still in use in UVM_OLD_KEYS" in out.stderr

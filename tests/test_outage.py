"""MariaDB gone for 30 s in the middle of a job: volunteers hold their results (no resend storm),
nothing is acknowledged that is not committed, the job completes afterwards, none lost or duplicated.
And an outage that begins in the middle of a hand-out gives the leased tasks back at once.

The database is a private ``mariadbd`` started by the test: the shared one serves other tests.
Every wait here is bounded and says what it waited for: a hang would stop CI.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from server import protocol as P
from server.config import Config
from server.jobs.outage import HOLD_MIN
from server.store import live
from server.web import appkeys as K
from server.web.app import create_app
from tests.conftest import add_researcher as add_researcher_in_app
from tests.procs import PrivateMariaDB, ServerProcess, add_researcher
from tests.test_keys import Holder

OUTAGE = 30.0
N = 1200
METRICS_TOKEN = "outage-metrics-token-0123"
# Tasks from index `first` on wait until the test opens the gate: the database is stopped while every
# volunteer holds tasks (volunteer-sim runs one task at a time in a process, so one task waiting at
# the gate holds up the others' batches), and their results are sent while it is away.
GATED = """import os
import time


def main(x):
    if x >= {first}:
        open({waiting!r}, "a").close()
        while not os.path.exists({gate!r}):
            time.sleep(0.01)
    return x * x
"""
STEP = 90.0  # seconds any one step may take on a loaded machine before the test fails, naming the step
WHOLE = 300.0  # seconds for all the steps of one test together
# pytest-timeout only as a last resort, well past our own bounds (its signal lands in the event loop).
pytestmark = pytest.mark.timeout(WHOLE + 300)


async def _until(what: str, done: Callable[[], Awaitable[bool]], state: Callable[[], Awaitable[str]]) -> None:
    """Poll ``done`` until true; after STEP seconds fail with ``what`` and the state then."""
    deadline = time.monotonic() + STEP
    while not await done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {STEP:.0f} s; {await state()}")
        await asyncio.sleep(0.2)


class Inbox:
    """A volunteer socket read all along, as a browser's is: it answers the server's pings (a socket
    left unread longer than the server's heartbeat is closed) and keeps what arrives for ``next``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.queue: asyncio.Queue[object | None] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read(ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for raw in ws:
            if raw.type == aiohttp.WSMsgType.TEXT:
                await self.queue.put(P.decode(raw.data))
        await self.queue.put(None)

    async def next(self, what: str) -> object:
        try:
            msg = await asyncio.wait_for(self.queue.get(), STEP)
        except TimeoutError:
            raise AssertionError(f"no answer to {what} within {STEP:.0f} s") from None
        assert msg is not None, f"the server closed the socket before answering {what}"
        return msg


async def _get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str]:
    async with session.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_mariadb_outage_of_30_seconds(tmp_path, volunteers, redis_client, redis_url):
    db = PrivateMariaDB(tmp_path / "mariadb").start()
    env = {
        "UVM_DATA_DIR": str(tmp_path / "data"),
        "UVM_DATABASE_URL": db.url,
        "UVM_REDIS_URL": redis_url,
        "UVM_KEY": "0c" * 32,
        "UVM_METRICS_TOKEN": METRICS_TOKEN,
        "UVM_DEFAULT_REPLICATION": "1",  # one replica per task: "duplicated" below means a result recorded twice
    }
    server = None
    try:
        token = add_researcher(env, "ops@example.org")
        server = ServerProcess(env).start()
        async with asyncio.timeout(WHOLE), aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP)) as session:
            await _ride_out_an_outage(session, server, token, db, volunteers, tmp_path)
    finally:
        if server is not None:
            server.stop()
        db.stop()


async def _ride_out_an_outage(session, server, token, db, volunteers, tmp_path):  # noqa: ANN001
    url, auth = server.url, {"Authorization": f"Bearer {token}"}
    gate, waiting = tmp_path / "gate-open", tmp_path / "waiting-at-gate"
    code = GATED.format(first=N // 4, gate=str(gate), waiting=str(waiting))
    async with session.post(
        f"{url}/api/jobs", json={"code": code, "inputs": list(range(N)), "timeout": 300}, headers=auth
    ) as resp:
        job = (await resp.json())["id"]
    holder = Holder(url)
    held = await asyncio.wait_for(holder.take(session), STEP)  # held across the outage: the job cannot end before it
    inbox = Inbox(holder.ws)
    sims = volunteers(url, 4, prefetch=4)

    async def state() -> str:
        """What the server and the volunteers were doing, for a failure message."""
        try:
            _, health = await _get(session, f"{url}/api/health")
            _, metrics = await _get(session, f"{url}/metrics", Authorization=f"Bearer {METRICS_TOKEN}")
            async with session.get(f"{url}/api/jobs/{job}", headers=auth) as resp:
                counts = (await resp.json()).get("counts") if resp.status == 200 else resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"server unreachable: {exc!r}"
        health_fields = {k: v for k, v in json.loads(health).items() if k in ("database", "volunteers", "ready")}
        leases = _sample(metrics, "uvm_queue_leases")
        seen = [(s.volunteer, s.connects, s.done, s.unrun, s.holds) for s in sims]
        return f"job {counts}; health {health_fields}; leases {leases}; sims (id, connects, done, unrun, holds) {seen}"

    async def each_holds_work() -> bool:  # a task waits at the gate, so no volunteer can finish its batch
        return waiting.exists() and all(s.unrun > 0 for s in sims)

    await _until("every volunteer holding tasks, one waiting at the gate", each_holds_work, state)
    assert sum(s.done for s in sims) > 0

    await asyncio.to_thread(db.stop)
    stopped = time.monotonic()

    async def health_says_down() -> bool:
        return (await _get(session, f"{url}/api/health"))[0] == 503

    await _until("/api/health seeing the outage", health_says_down, state)
    detected = time.monotonic() - stopped
    status, body = await _get(session, f"{url}/api/health")
    assert status == 503 and json.loads(body)["database"]["state"] == "down"
    _, text = await _get(session, f"{url}/metrics", Authorization=f"Bearer {METRICS_TOKEN}")
    assert _sample(text, "uvm_database_up") == 0 and _sample(text, "uvm_database_down_seconds") > 0
    async with session.get(f"{url}/api/jobs/{job}", headers=auth) as resp:  # researchers: retry
        assert resp.status == 503 and resp.headers["Retry-After"] == "5", await resp.text()

    result = P.Outcome(attempt=held.attempt, task=held.task, result=held.input * held.input)
    await holder.ws.send_str(P.encode(P.Results([result])))
    hold = await inbox.next("the holder's results during the outage")
    assert isinstance(hold, P.Hold) and hold.attempts == [held.attempt] and hold.retry_after >= HOLD_MIN, hold

    acked = sum(s.done for s in sims)
    sends = [len(s.sends) for s in sims]
    gate.touch()  # the volunteers finish their tasks and send the results while the database is away
    await asyncio.sleep(OUTAGE - (time.monotonic() - stopped))
    assert sum(s.done for s in sims) == acked  # nothing acknowledged while the database was away
    assert all(s.holds > 0 for s in sims), [s.holds for s in sims]  # each was told to hold...
    storm = [len(s.sends) - n for s, n in zip(sims, sends, strict=True)]
    assert max(storm) <= OUTAGE / HOLD_MIN + 1, storm  # ...and did not resend in a storm
    assert (await _get(session, f"{url}/api/health"))[0] == 503

    await asyncio.to_thread(db.start)
    restarted = time.monotonic()
    answer: object = hold
    while isinstance(answer, P.Hold):  # the holder resends once its hold is over, as the browser does
        assert time.monotonic() - restarted < STEP, f"still held {STEP:.0f} s after the database returned: {answer}"
        await asyncio.sleep(answer.retry_after)
        await holder.ws.send_str(P.encode(P.Results([result])))
        answer = await inbox.next("the holder's results after the outage")
    assert isinstance(answer, P.Ack) and answer.attempts == [held.attempt], answer

    async def job_done() -> bool:
        async with session.get(f"{url}/api/jobs/{job}", headers=auth) as resp:
            return resp.status == 200 and (await resp.json())["state"] == "done"

    await _until("the job completing after the database returned", job_done, state)
    assert (await _get(session, f"{url}/api/health"))[0] == 200
    print(
        f"\noutage: seen by /api/health after {detected:.1f} s; {sum(s.holds for s in sims)} holds; "
        f"resends per volunteer during {OUTAGE:.0f} s: {storm}; job done {time.monotonic() - restarted:.1f} s "
        "after the database was back"
    )
    async with session.get(f"{url}/api/jobs/{job}/results?format=json", headers=auth) as resp:
        rows = await resp.json()
    assert [r["result"] for r in rows] == [i * i for i in range(N)]  # lost 0
    duplicated = db.query(
        "SELECT task_id FROM uvm.attempts WHERE outcome = 'done' GROUP BY task_id HAVING COUNT(*) > 1"
    )
    assert duplicated.strip() == ""  # duplicated 0
    assert db.query(f"SELECT n_done, n_tasks FROM uvm.jobs WHERE id = {job}").split() == [str(N), str(N)]
    acked_tasks = [t for s in sims for t in s.task_ids] + [held.task]
    assert len(acked_tasks) == len(set(acked_tasks))  # each result acknowledged once
    await holder.ws.close()


async def test_an_outage_beginning_mid_hand_out_gives_the_tasks_back(
    tmp_path, aiohttp_server, redis_client, redis_url, monkeypatch
):
    """The database goes away after a volunteer's tasks were leased but before their checkpoints
    were read: the volunteer is answered "none now" (``tasks``, empty: it asks again later), the
    leases go back to the ready queue at once (not at their deadline, minutes later), and once the
    database returns that connected volunteer gets the work and the job completes.

    The outage is real (the private mariadbd is stopped); only its moment is chosen, by stopping
    the database from inside the checkpoint read."""
    db = PrivateMariaDB(tmp_path / "mariadb").start()
    try:
        env = {
            "UVM_DATA_DIR": str(tmp_path / "data"),
            "UVM_DATABASE_URL": db.url,
            "UVM_REDIS_URL": redis_url,
            "UVM_KEY": "0d" * 32,
            "UVM_DEFAULT_REPLICATION": "1",
        }
        app = create_app(Config.from_env(env))
        server = await aiohttp_server(app)
        url = str(server.make_url("")).rstrip("/")
        auth = {"Authorization": f"Bearer {await add_researcher_in_app(app, 'race@example.org')}"}
        async with asyncio.timeout(WHOLE), aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP)) as s:
            code, inputs = "def main(x):\n    return x + 1\n", list(range(8))
            async with s.post(f"{url}/api/jobs", json={"code": code, "inputs": inputs}, headers=auth) as resp:
                job = (await resp.json())["id"]

            async def ready_count() -> int | None:
                return json.loads((await _get(s, f"{url}/api/health"))[1])["ready"]

            async def all_ready() -> bool:
                return await ready_count() == len(inputs)

            async def described() -> str:
                return f"health {(await _get(s, f'{url}/api/health'))[1][:300]}"

            await _until("the job's tasks in the ready queue", all_ready, described)
            ws = await s.ws_connect(f"{url}/ws/volunteer")
            inbox = Inbox(ws)
            # protocol 3 (a polling volunteer): "none now" is an empty `tasks`; protocol 4 would be held (`wait`)
            await ws.send_str(P.encode(P.Hello("", {"cores": 1, "workers": 1, "prefetch": 3}, protocol=3)))
            assert isinstance(await inbox.next("hello"), P.Welcome)

            read_checkpoints = live.restore

            async def database_goes_away(storage, wanted):  # noqa: ANN001, ANN202
                await asyncio.to_thread(db.stop)
                return await read_checkpoints(storage, wanted)

            monkeypatch.setattr(live, "restore", database_goes_away)
            await ws.send_str(P.encode(P.Ready(4)))
            answer = await inbox.next("ready, as the database went away")
            assert isinstance(answer, P.Tasks) and answer.tasks == [], answer  # "none now", not an error
            assert await ready_count() == len(inputs)  # every lease given back at once
            assert not any(sock.held for sock in app[K.dispatcher].sockets)  # none left on the connection
            monkeypatch.setattr(live, "restore", read_checkpoints)

            await asyncio.to_thread(db.start)
            results: dict[int, int] = {}

            async def all_done_by_this_volunteer() -> bool:
                await ws.send_str(P.encode(P.Ready(4)))
                tasks = await inbox.next("ready, after the database returned")
                assert isinstance(tasks, P.Tasks), tasks
                if tasks.tasks:
                    outcomes = [P.Outcome(t.attempt, t.task, result=t.input + 1) for t in tasks.tasks]
                    await ws.send_str(P.encode(P.Results(outcomes)))
                    ack = await inbox.next("results, after the database returned")
                    assert isinstance(ack, P.Ack) and sorted(ack.attempts) == sorted(o.attempt for o in outcomes), ack
                    results.update({t.index: t.input + 1 for t in tasks.tasks})
                return len(results) == len(inputs)

            await _until("the connected volunteer getting every task once the database returned",
                         all_done_by_this_volunteer, described)  # fmt: skip
            async with s.get(f"{url}/api/jobs/{job}/results?format=json", headers=auth) as resp:
                assert [r["result"] for r in await resp.json()] == [x + 1 for x in inputs]
            await ws.close()
    finally:
        db.stop()

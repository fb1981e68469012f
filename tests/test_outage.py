"""MariaDB gone for 30 s in the middle of a job: volunteers hold their results (no resend storm),
nothing is acknowledged that is not committed, the job completes afterwards, none lost or duplicated.

The database is a private ``mariadbd`` started by the test: the shared one serves other tests.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from server import protocol as P
from server.jobs.outage import HOLD_MIN
from tests.procs import PrivateMariaDB, ServerProcess, add_researcher
from tests.test_keys import Holder

OUTAGE = 30.0
N = 1200
METRICS_TOKEN = "outage-metrics-token-0123"


async def _get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str]:
    async with session.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.timeout(240)
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
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{server.url}/api/jobs",
                json={"code": "def main(x):\n    return x * x\n", "inputs": list(range(N)), "timeout": 300},
                headers=auth,
            ) as resp:
                job = (await resp.json())["id"]
            holder = Holder(server.url)
            held = await holder.take(session)  # held across the outage: the job cannot end before it
            sims = volunteers(server.url, 4, prefetch=4)
            while sum(s.done for s in sims) < N // 4:
                await asyncio.sleep(0.05)

            await asyncio.to_thread(db.stop)
            stopped = time.monotonic()
            while (await _get(session, f"{server.url}/api/health"))[0] != 503:
                await asyncio.sleep(0.2)
            detected = time.monotonic() - stopped
            status, body = await _get(session, f"{server.url}/api/health")
            assert status == 503 and json.loads(body)["database"]["state"] == "down"
            _, text = await _get(session, f"{server.url}/metrics", Authorization=f"Bearer {METRICS_TOKEN}")
            assert _sample(text, "uvm_database_up") == 0 and _sample(text, "uvm_database_down_seconds") > 0
            async with session.get(f"{server.url}/api/jobs/{job}", headers=auth) as resp:  # researchers: retry
                assert resp.status == 503 and resp.headers["Retry-After"] == "5", await resp.text()

            result = P.Outcome(attempt=held.attempt, task=held.task, result=held.input * held.input)
            await holder.ws.send_str(P.encode(P.Results([result])))
            hold = P.decode(await holder.ws.receive_str())
            assert isinstance(hold, P.Hold) and hold.attempts == [held.attempt] and hold.retry_after >= HOLD_MIN

            acked = sum(s.done for s in sims)
            sends = [len(s.sends) for s in sims]
            await asyncio.sleep(OUTAGE - (time.monotonic() - stopped))
            assert sum(s.done for s in sims) == acked  # nothing acknowledged while the database was away
            assert sum(s.holds for s in sims) > 0  # they were told to hold...
            storm = [len(s.sends) - n for s, n in zip(sims, sends, strict=True)]
            assert max(storm) <= OUTAGE / HOLD_MIN + 1, storm  # ...and did not resend in a storm
            assert (await _get(session, f"{server.url}/api/health"))[0] == 503

            await asyncio.to_thread(db.start)
            restarted = time.monotonic()
            while True:  # the holder resends once its hold is over, as the browser does
                await asyncio.sleep(hold.retry_after)
                await holder.ws.send_str(P.encode(P.Results([result])))
                answer = P.decode(await holder.ws.receive_str())
                if isinstance(answer, P.Ack):
                    break
                assert isinstance(answer, P.Hold)
            assert answer.attempts == [held.attempt], answer

            while True:
                async with session.get(f"{server.url}/api/jobs/{job}", headers=auth) as resp:
                    state = (await resp.json())["state"]
                if state == "done":
                    break
                await asyncio.sleep(0.2)
            assert (await _get(session, f"{server.url}/api/health"))[0] == 200
            print(
                f"\noutage: seen by /api/health after {detected:.1f} s; {sum(s.holds for s in sims)} holds; "
                f"resends per volunteer during {OUTAGE:.0f} s: {storm}; job done {time.monotonic() - restarted:.1f} s "
                "after the database was back"
            )
            async with session.get(f"{server.url}/api/jobs/{job}/results?format=json", headers=auth) as resp:
                rows = await resp.json()
        assert [r["result"] for r in rows] == [i * i for i in range(N)]  # lost 0
        duplicated = db.query(
            "SELECT task_id FROM uvm.attempts WHERE outcome = 'done' GROUP BY task_id HAVING COUNT(*) > 1"
        )
        assert duplicated.strip() == ""  # duplicated 0
        assert db.query(f"SELECT n_done, n_tasks FROM uvm.jobs WHERE id = {job}").split() == [str(N), str(N)]
        acked_tasks = [t for s in sims for t in s.task_ids] + [held.task]
        assert len(acked_tasks) == len(set(acked_tasks))  # each result acknowledged once
    finally:
        if server is not None:
            server.stop()
        db.stop()

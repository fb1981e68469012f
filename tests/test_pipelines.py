"""Chaining: a job from another job's results, and a declared pipeline fed as its source runs."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import sqlalchemy as sa

from server.store.tables import tasks
from server.web import appkeys as K

STAGE1 = (
    "import time\ndef main(x):\n    time.sleep(0.01)\n    if x == 5:\n        raise ValueError('five')\n"
    "    return x * 10\n"
)
STAGE2 = "def main(x):\n    return {'got': x, 'plus': x + 1}\n"


async def test_results_of_a_finished_job(serve, volunteers):
    api, _ = await serve()
    first = await api.submit(STAGE1, list(range(8)), max_attempts=1)
    volunteers(api.url, 2)
    assert (await api.wait(first))["state"] == "failed"  # task 5 failed
    second = await api.submit(STAGE2, {"results_of": first})
    job = await api.wait(second)
    assert job["state"] == "done" and job["parent_job_id"] == first
    rows = json.loads(await api.results(second))
    assert [r["result"] for r in rows] == [{"got": x * 10, "plus": x * 10 + 1} for x in range(8) if x != 5]


async def test_declared_pipeline_starts_on_results_as_they_complete(serve, volunteers):
    api, app = await serve()
    slow_last = STAGE1.replace("time.sleep(0.01)", "time.sleep(0.8 if x == 39 else 0.01)")
    first = await api.submit(slow_last, list(range(40)), max_attempts=1)
    second = await api.submit(STAGE2, {"after": first})  # declared before anything ran
    third = await api.submit("def main(x):\n    return x['plus'] * 2\n", {"after": second})
    assert (await api.job(second))["n_tasks"] == 40
    # Three volunteers in three processes: a simulated volunteer runs code on its event loop, so a
    # sleeping task must not hold up the others (nor this test's server).
    sims = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.cli",
            "volunteer-sim",
            "--server",
            api.url,
            "--prefetch",
            "1",
            "--duration",
            "60",
            "--quiet",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            # not the test's UVM_TEST_* variables: the CLI refuses unknown UVM_* settings
            env={k: v for k, v in os.environ.items() if not k.startswith("UVM_")},
        )  # fmt: skip
        for _ in range(3)
    ]
    try:
        for job in (first, second, third):
            assert (await api.wait(job))["state"] == "failed"  # index 5 failed upstream
    finally:
        for sim in sims:
            sim.kill()
            await sim.wait()
    rows = json.loads(await api.results(third))
    assert [r["result"] for r in rows if r["index"] != 5] == [(x * 10 + 1) * 2 for x in range(40) if x != 5]
    assert rows[5]["state"] == "failed" and "upstream task 5" in rows[5]["error"]
    counts = (await api.job(third))["counts"]
    assert counts["done"] == 39 and counts["failed"] == 1
    async with app[K.storage].engine.connect() as conn:
        last_of_first = (
            await conn.execute(sa.select(sa.func.max(tasks.c.finished_at)).where(tasks.c.job_id == first))
        ).scalar()
        early_second = (
            await conn.execute(
                sa.select(sa.func.count()).where(tasks.c.job_id == second, tasks.c.finished_at < last_of_first)
            )
        ).scalar()
    assert early_second >= 10  # stage 2 ran on stage 1's results while stage 1 was still running


async def test_pipeline_declared_after_source_finished_and_cancel_cascades(serve, volunteers):
    api, _ = await serve()
    first = await api.submit("def main(x):\n    return x + 1\n", [1, 2, 3])
    volunteers(api.url, 1)
    assert (await api.wait(first))["state"] == "done"
    late = await api.submit(STAGE2, {"after": first})
    assert [r["result"]["got"] for r in json.loads(await api.results(await _done(api, late)))] == [2, 3, 4]
    slow = await api.submit("import time\ndef main(x):\n    time.sleep(0.2)\n    return x\n", list(range(100)))
    follower = await api.submit(STAGE2, {"after": slow})
    async with api.session.post(f"{api.url}/api/jobs/{slow}/cancel", headers=api.headers()) as resp:
        assert resp.status == 200
    assert (await api.wait(follower))["state"] == "cancelled"


async def _done(api, job_id: int) -> int:
    assert (await api.wait(job_id))["state"] == "done"
    return job_id


async def test_bad_chains(serve):
    api, app = await serve()
    from tests.conftest import add_researcher

    other = await add_researcher(app, "someone@example.org")
    running = await api.submit("def main(x):\n    return x\n", [1])
    for inputs, needle in [
        ({"after": 99999}, "no job 99999"),
        ({"results_of": 99999}, "no job 99999"),
        ({"after": "one"}, "must be a job id"),
        ({"results_of": running}, "has not finished"),
        ({"after": running, "range": [3]}, "'inputs' must be"),
    ]:
        async with api.session.post(
            f"{api.url}/api/jobs", json={"code": STAGE2, "inputs": inputs}, headers=api.headers()
        ) as resp:
            body = await resp.json()
            assert resp.status in (400, 404) and needle in body["error"], (inputs, body)
    async with api.session.post(
        f"{api.url}/api/jobs", json={"code": STAGE2, "inputs": {"after": running}}, headers=api.headers(other)
    ) as resp:
        assert resp.status == 400 and "no job" in (await resp.json())["error"]  # not theirs

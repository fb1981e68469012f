"""End to end through HTTP and simulated volunteers, on both backends (done-when 1, 2, 3)."""

from __future__ import annotations

import csv
import io
import json

import sqlalchemy as sa

from server.store.tables import attempts, tasks
from server.web import appkeys as K

SQUARE = "def main(x):\n    print('got', x)\n    return {'x': x, 'sq': x * x}\n"


async def test_thousand_inputs_four_volunteers_all_formats(serve, volunteers):
    api, _app = await serve()
    inputs = list(range(1000))
    job_id = await api.submit(SQUARE, inputs, name="squares")
    volunteers(api.url, 4, prefetch=8)
    job = await api.wait(job_id, timeout=90)
    assert job["state"] == "done"
    assert job["counts"]["done"] == 1000 and job["counts"]["failed"] == 0

    expected = [{"x": x, "sq": x * x} for x in inputs]
    rows = json.loads(await api.results(job_id, "json"))
    assert [r["index"] for r in rows] == inputs
    assert [r["result"] for r in rows] == expected
    assert rows[7]["output"] == "got 7\n"

    nd = [json.loads(line) for line in (await api.results(job_id, "ndjson")).splitlines()]
    assert [r["result"] for r in nd] == expected

    txt = (await api.results(job_id, "txt")).splitlines()
    assert [json.loads(line) for line in txt] == expected

    table = list(csv.DictReader(io.StringIO(await api.results(job_id, "csv"))))
    assert [json.loads(r["result"]) for r in table] == expected
    assert [int(r["index"]) for r in table] == inputs
    assert {r["state"] for r in table} == {"done"}


async def test_range_and_none_inputs(serve, volunteers):
    api, _ = await serve()
    sweep = await api.submit("def main(x):\n    return x * 3\n", {"range": [10, 40, 5]})
    single = await api.submit("def main(x):\n    return 'alone' if x is None else 'no'\n", None)
    volunteers(api.url, 2)
    assert (await api.wait(sweep))["state"] == "done"
    assert (await api.wait(single))["state"] == "done"
    rows = json.loads(await api.results(sweep))
    assert [(r["input"], r["result"]) for r in rows] == [(x, x * 3) for x in range(10, 40, 5)]
    assert (await api.results(single, "txt")) == "alone\n"


async def test_volunteer_killed_holding_leases(serve, volunteers):
    api, app = await serve()
    job_id = await api.submit(SQUARE, list(range(60)))
    # This one leases 8 tasks, then vanishes without a result: its socket closes.
    crasher = volunteers(api.url, 1, prefetch=8, crash_after=1)[0]
    for _ in range(100):
        if crasher.leased:
            break
        await __import__("asyncio").sleep(0.05)
    assert crasher.leased == 8
    volunteers(api.url, 2, prefetch=4)
    job = await api.wait(job_id)
    assert job["state"] == "done"
    rows = json.loads(await api.results(job_id))
    assert [r["result"]["sq"] for r in rows] == [x * x for x in range(60)]
    engine = app[K.storage].engine
    async with engine.connect() as conn:
        done = (
            await conn.execute(
                sa.select(attempts.c.task_id, sa.func.count())
                .where(attempts.c.outcome == "done")
                .group_by(attempts.c.task_id)
            )
        ).all()
        abandoned = (await conn.execute(sa.select(sa.func.count()).where(attempts.c.outcome == "abandoned"))).scalar()
    assert len(done) == 60 and all(n == 1 for _, n in done)  # each result recorded once
    assert abandoned == 8
    assert crasher.volunteer not in {r.volunteer for r in await _task_rows(app, job_id)}


async def _task_rows(app, job_id):
    async with app[K.storage].engine.connect() as conn:
        return (await conn.execute(sa.select(tasks).where(tasks.c.job_id == job_id))).all()


async def test_always_raising_task_fails_after_max_attempts(serve, volunteers):
    api, app = await serve()
    code = "def main(x):\n    if x == 3:\n        raise ValueError(f'bad input {x}')\n    return x\n"
    job_id = await api.submit(code, list(range(10)), max_attempts=2)
    volunteers(api.url, 3)
    job = await api.wait(job_id)
    assert job["state"] == "failed"
    assert job["counts"] == {"queued": 0, "running": 0, "leased": 0, "done": 9, "failed": 1, "cancelled": 0}
    async with api.session.get(f"{api.url}/api/jobs/{job_id}/errors", headers=api.headers()) as resp:
        errors = await resp.json()
    (err,) = errors["errors"]
    assert err["index"] == 3 and err["attempts"] == 2 and err["state"] == "failed"
    assert "Traceback" in err["error"] and "ValueError: bad input 3" in err["error"]
    assert "line 3, in main" in err["error"]
    assert errors["groups"][0]["message"] == "ValueError: bad input <n>"
    assert errors["groups"][0]["example"] == "ValueError: bad input 3"
    rows = json.loads(await api.results(job_id))
    assert [r["result"] for r in rows if r["index"] != 3] == [x for x in range(10) if x != 3]
    assert "ValueError: bad input 3" in rows[3]["error"]
    assert (await api.results(job_id, "txt")).splitlines()[3] == "ERROR: ValueError: bad input 3"
    async with app[K.storage].engine.connect() as conn:
        n = (
            await conn.execute(
                sa.select(sa.func.count()).where(attempts.c.job_id == job_id, attempts.c.outcome == "error")
            )
        ).scalar()
    assert n == 2


async def test_cancel_stops_hand_out(serve, volunteers):
    api, _ = await serve()
    job_id = await api.submit("import time\ndef main(x):\n    time.sleep(0.05)\n    return x\n", list(range(400)))
    volunteers(api.url, 2)
    async with api.session.post(f"{api.url}/api/jobs/{job_id}/cancel", headers=api.headers()) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["cancelled"] is True
    job = await api.wait(job_id)
    assert job["state"] == "cancelled"
    assert job["counts"]["cancelled"] > 0
    assert job["counts"]["done"] + job["counts"]["cancelled"] == 400
    again = await api.submit("def main(x):\n    return x + 1\n", [1, 2])  # other work still flows
    assert (await api.wait(again))["state"] == "done"
    final = await api.job(job_id)
    assert final["counts"]["done"] == job["counts"]["done"]  # nothing ran after the cancel


async def test_retry_failed_tasks(serve, volunteers):
    api, _ = await serve()
    code = (
        "import os\ndef main(x):\n    if x == 1 and not os.environ.get('UVM_RETRY_OK'):\n"
        "        raise RuntimeError('flaky')\n    return x\n"
    )
    job_id = await api.submit(code, [0, 1, 2], max_attempts=1)
    volunteers(api.url, 1)
    assert (await api.wait(job_id))["state"] == "failed"
    import os

    os.environ["UVM_RETRY_OK"] = "1"
    try:
        async with api.session.post(f"{api.url}/api/jobs/{job_id}/retry", headers=api.headers()) as resp:
            assert (await resp.json())["retried"] == 1
        job = await api.wait(job_id)
    finally:
        del os.environ["UVM_RETRY_OK"]
    assert job["state"] == "done"
    assert [r["result"] for r in json.loads(await api.results(job_id))] == [0, 1, 2]


async def test_retry_clears_the_errors_of_the_tasks_it_queues_again(serve):
    """After Retry, the job's errors and error groups list only what fails from then on: a retried
    task waiting for a volunteer is not an error, and failing again counts it once."""
    from server import protocol as P

    api, _ = await serve()
    job_id = await api.submit("def main(x):\n    return x\n", [0, 1, 2], max_attempts=1)
    url = api.url.replace("http", "ws") + "/ws/volunteer"

    async def errors() -> dict:
        async with api.session.get(f"{api.url}/api/jobs/{job_id}/errors", headers=api.headers()) as resp:
            return await resp.json()

    async def fail_all(ws, n: int) -> None:
        await ws.send_str(P.encode(P.Ready(n)))
        leased = json.loads((await ws.receive(timeout=10)).data)["tasks"]
        assert len(leased) == n
        bad = [P.Outcome(t["attempt"], t["task"], error=f"ValueError: bad value {t['input']}") for t in leased]
        await ws.send_str(P.encode(P.Results(bad)))
        assert json.loads((await ws.receive(timeout=10)).data)["type"] == "ack"

    async with api.session.ws_connect(url) as ws:
        await ws.send_str(P.encode(P.Hello("", {"cores": 2, "workers": 4})))
        assert json.loads((await ws.receive(timeout=10)).data)["type"] == "welcome"
        await fail_all(ws, 3)
        assert (await api.wait(job_id))["counts"]["failed"] == 3
        (group,) = (await errors())["groups"]
        assert group["count"] == 3
        async with api.session.post(f"{api.url}/api/jobs/{job_id}/retry", headers=api.headers()) as resp:
            assert (await resp.json())["retried"] == 3
        job = await api.job(job_id)
        assert job["state"] == "running" and job["counts"]["failed"] == 0
        assert await errors() == {"errors": [], "groups": []}  # queued again: not errors any more
        rows = json.loads(await api.results(job_id))
        assert [(r["state"], r["error"]) for r in rows] == [("open", None)] * 3
        await fail_all(ws, 3)  # they fail again: counted once each
        assert (await api.wait(job_id))["counts"]["failed"] == 3
        (group,) = (await errors())["groups"]
        assert group["count"] == 3 and group["message"] == "ValueError: bad value <n>"


async def test_results_paging_and_list_throughput(serve, volunteers):
    api, _ = await serve()
    job_id = await api.submit("def main(x):\n    return x * 2\n", list(range(30)))
    volunteers(api.url, 2)
    await api.wait(job_id)
    async with api.session.get(
        f"{api.url}/api/jobs/{job_id}/results", params={"start": "10", "limit": "5"}, headers=api.headers()
    ) as resp:
        page = await resp.json()
    assert [(r["index"], r["result"]) for r in page] == [(i, i * 2) for i in range(10, 15)]
    async with api.session.get(
        f"{api.url}/api/jobs/{job_id}/results", params={"limit": "-1"}, headers=api.headers()
    ) as resp:
        assert resp.status == 400 and "whole number" in (await resp.json())["error"]
    async with api.session.get(f"{api.url}/api/jobs", headers=api.headers()) as resp:
        (listed,) = (await resp.json())["jobs"]
    assert "throughput" in listed and listed["counts"]["done"] == 30
    after = await api.submit("def main(x):\n    return x\n", {"after": job_id})
    async with api.session.get(f"{api.url}/api/jobs/{after}", headers=api.headers()) as resp:
        assert (await resp.json())["n_tasks"] == 30

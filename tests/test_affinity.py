"""Job affinity over the websocket: ``ready.jobs`` names the jobs a volunteer's workers have loaded,
the server prefers their tasks within fair share, and bad values are refused. The queue's side of it
is in ``test_queue_contract.py`` (both queues), the page's in ``test_supervisor.py``."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from server import protocol as P
from tests.conftest import Api, _run_until, add_researcher
from tests.test_metrics import TOKEN, scrape, total
from tests.test_trust import abandoned, ask, hello, ws_url
from workers.sim import SimVolunteer

CODE = "def main(x):\n    return x\n"


async def submit_as(api, token: str, n: int) -> int:  # noqa: ANN001
    async with api.session.post(
        f"{api.url}/api/jobs", json={"code": CODE, "inputs": list(range(n))}, headers=api.headers(token)
    ) as resp:
        assert resp.status == 201, await resp.text()
        return (await resp.json())["id"]


def jobs_of(reply: dict) -> list[int]:
    assert reply["type"] == "tasks", reply
    return [t["job"] for t in reply["tasks"]]


async def test_a_volunteer_gets_its_loaded_jobs_tasks_and_only_jobs_it_was_handed_count(serve):
    api, app = await serve(affinity_slack=4.0, metrics_token=TOKEN)
    other = await add_researcher(app, "other@example.org")
    first = await submit_as(api, api.token, 20)
    second = await submit_as(api, other, 20)
    async with api.session.ws_connect(ws_url(api)) as ws, api.session.ws_connect(ws_url(api)) as ws2:
        await hello(ws, workers=4, prefetch=4)
        assert sorted(jobs_of(await ask(ws, P.Ready(2)))) == [first, second]  # fair share: one each
        # its workers have the second job loaded: that job's tasks, up to 4 ahead of the first's
        assert jobs_of(await ask(ws, P.Ready(4, jobs=[second]))) == [second] * 4
        # another volunteer names the second job too, but it was never handed one of its tasks: the
        # claim is ignored (honoured, it would get the second job's fifth: 5 <= 1 + 4)
        await hello(ws2, workers=4, prefetch=4)
        assert jobs_of(await ask(ws2, P.Ready(1, jobs=[second]))) == [first]
        # unknown and cancelled jobs are ignored too
        assert jobs_of(await ask(ws2, P.Ready(1, jobs=[first + second + 1000]))) == [first]
    samples = await scrape(api)
    assert total(samples, "uvm_tasks_handed_out_to_loaded_jobs_total") == 4  # of 8 handed out
    assert total(samples, "uvm_tasks_handed_out_total") == 8
    await abandoned(app, 8)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_ready_jobs_bad_values_are_refused_and_the_connection_stays(serve):
    api, _ = await serve()
    async with api.session.ws_connect(ws_url(api)) as ws:
        await hello(ws)
        cases = [
            ('{"type": "ready", "n": 1, "jobs": "3"}', "field 'jobs' must be a list, not str"),
            ('{"type": "ready", "n": 1, "jobs": null}', "field 'jobs' must be a list"),
            ('{"type": "ready", "n": 1, "jobs": {"3": 1}}', "field 'jobs' must be a list"),
            ('{"type": "ready", "n": 1, "jobs": ["3"]}', "job ids"),
            ('{"type": "ready", "n": 1, "jobs": [true]}', "job ids"),
            ('{"type": "ready", "n": 1, "jobs": [1.5]}', "job ids"),
            ('{"type": "ready", "n": 1, "jobs": [[1]]}', "job ids"),
            ('{"type": "ready", "n": 1, "jobs": [-1]}', "job ids"),
            ('{"type": "ready", "n": 1, "jobs": [0]}', "job ids"),
            ('{"type": "ready", "n": 1, "jobs": [18446744073709551616]}', "job ids"),  # 2**64
            ('{"type": "ready", "n": 1, "jobs": [1e400]}', "job ids"),  # infinity
            (json.dumps({"type": "ready", "n": 1, "jobs": list(range(1, P.MAX_READY_JOBS + 2))}), "at most 16 jobs"),
        ]
        for text, needle in cases:
            reply = await ask(ws, text)
            assert reply["type"] == "error" and needle in reply["message"], (text, reply)
        # still usable; the most and the largest accepted, duplicates dropped
        most = list(range(1, P.MAX_READY_JOBS + 1)) + [P.MAX_JOB_ID, 1]
        assert (await ask(ws, P.Ready(1, jobs=most[-P.MAX_READY_JOBS :])))["type"] == "wait"  # nothing to do now
        assert P.decode(json.dumps({"type": "ready", "n": 1, "jobs": [3, 3, 2, 3]})).jobs == [3, 2]
        assert P.decode('{"type": "ready", "n": 1}').jobs == []  # a `ready` without it still works


async def _switches(api, tokens: list[str], affinity: bool) -> tuple[int, int]:  # noqa: ANN001
    """Three researchers' jobs of 40 tasks, run by four one-worker simulated volunteers; their job
    switches (a task of another job than the one its worker ran last) and tasks done. Protocol 4: one
    task at a time, as affinity alone hands them out (chunks keep a volunteer on its job too)."""
    jobs = [await submit_as(api, token, 40) for token in tokens]
    sims = [SimVolunteer(api.url, prefetch=2, affinity=affinity, protocol=4) for _ in range(4)]
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        runs = [asyncio.create_task(_run_until(sim, session, stop)) for sim in sims]
        try:
            for job, token in zip(jobs, tokens, strict=True):
                assert (await Api(api.url, api.session, token).wait(job, timeout=120))["state"] == "done"
        finally:
            stop.set()
            await asyncio.gather(*runs, return_exceptions=True)
    return sum(s.switches for s in sims), sum(s.done for s in sims)


async def test_affinity_makes_job_switches_rare(serve):
    """The same work, with and without the volunteers naming their loaded job: with it, far fewer
    tasks need a worker switch (counted by the volunteers, as the page counts them)."""
    api, app = await serve()
    tokens = [api.token] + [await add_researcher(app, f"r{i}@example.org") for i in range(2)]
    with_affinity, done = await _switches(api, tokens, affinity=True)
    without, done_without = await _switches(api, tokens, affinity=False)
    assert done >= 120 and done_without >= 120
    assert with_affinity * 3 < without, (with_affinity, without)

"""Lazy hand-out (server/jobs/feeder.py): a job's tasks are made ready window by window as hand-out
reaches them, on both backends. Windows of 100 here (2,000 in the server), so that a job of a few
hundred tasks goes through several."""

from __future__ import annotations

import asyncio
import json

import pytest
import sqlalchemy as sa

from server.jobs import feeder
from server.jobs.dispatch import VolunteerSocket
from server.protocol import Capabilities
from server.store import storage
from server.store.tables import jobs, tasks
from server.web import appkeys as K

CODE = "def main(x):\n    return x\n"
W = 100


@pytest.fixture(autouse=True)
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "WINDOW", W)
    monkeypatch.setattr(feeder, "LOW", W)


async def _rows(app, job: int) -> int:
    async with app[K.storage].engine.connect() as conn:
        return await conn.scalar(sa.select(sa.func.count()).select_from(tasks).where(tasks.c.job_id == job))


async def _materialised(app, job: int) -> int:
    async with app[K.storage].engine.connect() as conn:
        return await conn.scalar(sa.select(jobs.c.materialised).where(jobs.c.id == job))


async def test_a_range_job_is_made_ready_window_by_window(serve, volunteers):
    api, app = await serve()
    store, dispatcher = app[K.storage], app[K.dispatcher]
    job = await api.submit(CODE, {"range": [0, 700, 2]})
    status = await api.job(job)
    assert (status["n_tasks"], status["materialised"], status["handed_out"]) == (350, W, 0)
    assert await _rows(app, job) == W and await dispatcher.queue.ready_count() == W

    # the export of an unfinished job lists every index in order, made ready or not
    rows = [json.loads(line) for line in (await api.results(job, "ndjson")).splitlines()]
    assert [(r["index"], r["input"], r["state"]) for r in rows] == [(i, 2 * i, "open") for i in range(350)]
    assert [json.loads(line)["index"] for line in (await _part(api, job, 95, 10)).splitlines()] == list(range(95, 105))

    # two servers deciding on the same value: one makes the window, the other finds it made
    made = await asyncio.gather(store.materialise(job, W), store.materialise(job, W))
    windows = [m for m in made if m is not None]
    assert len(windows) == 1 and windows[0][:2] == (2 * W, 350)
    assert [item.index for item in windows[0][2]] == list(range(W, 2 * W))
    assert await store.materialise(job, W) is None  # a stale view: nothing made twice
    assert await _rows(app, job) == 2 * W and await _materialised(app, job) == 2 * W
    await dispatcher.make_ready(windows[0][2])  # what the feeder does with a window it made

    stage = await api.submit("def main(x):\n    return x + 1\n", {"after": job})  # a pipeline stage on it
    volunteers(api.url, 2)
    assert (await api.wait(job))["state"] == "done"
    assert (await api.wait(stage))["state"] == "done"
    status = await api.job(job)
    assert (status["materialised"], status["handed_out"], status["counts"]["done"]) == (350, 350, 350)
    assert await _rows(app, job) == 350
    rows = [json.loads(line) for line in (await api.results(job, "ndjson")).splitlines()]
    assert [(r["index"], r["result"]) for r in rows] == [(i, 2 * i) for i in range(350)]
    rows = [json.loads(line) for line in (await api.results(stage, "ndjson")).splitlines()]
    assert [r["result"] for r in rows] == [2 * i + 1 for i in range(350)]


async def _part(api, job: int, start: int, limit: int) -> str:
    async with api.session.get(
        f"{api.url}/api/jobs/{job}/results",
        params={"format": "ndjson", "start": str(start), "limit": str(limit)},
        headers=api.headers(),
    ) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_a_list_job_keeps_its_inputs_and_is_queued_window_by_window(serve, volunteers):
    api, app = await serve()
    job = await api.submit(CODE, [{"n": i} for i in range(250)])
    assert await _rows(app, job) == 250  # the inputs are stored at submit
    assert await _materialised(app, job) == W and await app[K.dispatcher].queue.ready_count() == W
    volunteers(api.url, 2)
    assert (await api.wait(job))["state"] == "done"
    rows = [json.loads(line) for line in (await api.results(job, "ndjson")).splitlines()]
    assert [r["result"] for r in rows] == [{"n": i} for i in range(250)]


async def test_the_feeder_makes_the_next_window_when_ready_tasks_run_low(serve):
    api, app = await serve(reaper_interval=3600.0)  # the feeder's own look: once at start, then ours
    dispatcher = app[K.dispatcher]
    job = await api.submit(CODE, {"range": [0, 350]})
    assert await dispatcher.feeder.look() == 0  # nothing handed out: no new window
    leases = await dispatcher.queue.lease("v1", ["a1"], now=0.0)  # not through dispatch: no trigger on lease
    assert len(leases) == 1
    assert await dispatcher.feeder.look() == W  # 100 open of which 1 leased: under a window ready
    assert await _materialised(app, job) == 2 * W and await dispatcher.queue.ready_count() == 2 * W - 1
    assert await dispatcher.feeder.look() == 0  # 199 ready: enough
    assert await _materialised(app, job) == 2 * W


async def test_a_lease_near_the_end_of_the_window_brings_the_next_one(serve):
    api, app = await serve(reaper_interval=3600.0)  # no periodic look: only the lease can ask
    dispatcher = app[K.dispatcher]
    job = await api.submit(CODE, {"range": [0, 350]})
    sock = VolunteerSocket("v1", send=None, capabilities=Capabilities(workers=4, prefetch=0))
    dispatcher.connect(sock)
    assert len(await dispatcher.lease(sock, 4)) == 4
    for _ in range(200):  # the feeder's loop wakes on the lease
        if await _materialised(app, job) == 2 * W:
            break
        await asyncio.sleep(0.05)
    assert await _materialised(app, job) == 2 * W and await dispatcher.queue.ready_count() == 2 * W - 4


async def test_cancelling_frees_what_was_made_ready_and_no_window_follows(serve, backend, redis_client):
    api, app = await serve(researcher_max_queued_tasks=400)
    store, dispatcher = app[K.storage], app[K.dispatcher]
    job = await api.submit(CODE, {"range": [0, 350]})
    async with api.session.post(
        f"{api.url}/api/jobs", json={"code": CODE, "inputs": {"range": [51]}}, headers=api.headers()
    ) as resp:  # the queued-tasks quota counts the whole job, not the window made ready
        assert resp.status == 429
    if backend == "mariadb":  # Redis flushed: the rebuild brings back the window made ready, no more
        await redis_client.flushdb()
        await dispatcher.rebuild_if_needed()
    assert await dispatcher.queue.ready_count() == W
    async with api.session.post(f"{api.url}/api/jobs/{job}/cancel", headers=api.headers()) as resp:
        assert resp.status == 200
    assert await dispatcher.queue.ready_count() == 0
    assert await store.materialise(job, W) is None and await dispatcher.feeder.look() == 0
    assert await _rows(app, job) == W and await _materialised(app, job) == W
    status = await api.job(job)
    assert status["state"] == "cancelled" and status["counts"]["cancelled"] == 350
    rows = [json.loads(line) for line in (await api.results(job, "ndjson")).splitlines()]
    assert [(r["index"], r["state"]) for r in rows] == [(i, "cancelled") for i in range(350)]


async def test_the_feeder_makes_what_the_waiting_volunteers_ask_for_ready_in_one_look(serve):
    """When more volunteers wait than a window serves, one look makes windows back to back until all
    they ask for is ready (a window of 100 here, 450 tasks asked for: four more windows), not one
    window per lease that reaches the end of the last; cancelling then frees all of them."""
    api, app = await serve(reaper_interval=3600.0)
    dispatcher = app[K.dispatcher]
    dispatcher.feeder.wanted = lambda: 450  # what Waiters.wanted says while 225 volunteers wait for 2 each
    job = await api.submit(CODE, {"range": [0, 1000]})
    assert (await dispatcher.queue.lease("v1", ["a1"], now=0.0))[0].index == 0
    windows = dispatcher.feeder.windows
    assert await dispatcher.feeder.look() == 4 * W  # 99 ready, 450 wanted: 4 windows in this one look
    assert dispatcher.feeder.windows - windows == 4
    assert await _materialised(app, job) == 5 * W and await dispatcher.queue.ready_count() == 5 * W - 1
    assert await dispatcher.feeder.look() == 0  # enough ready for everyone waiting
    async with api.session.post(f"{api.url}/api/jobs/{job}/cancel", headers=api.headers()) as resp:
        assert resp.status == 200
    assert await dispatcher.queue.ready_count() == 0  # every window made ahead is taken out


async def test_what_is_made_ready_ahead_for_waiters_is_bounded(serve, monkeypatch: pytest.MonkeyPatch):
    """However many ask, a job is made ready at most AHEAD_MOST tasks ahead of hand-out: a million
    waiting volunteers do not expand a 1M-task range job."""
    monkeypatch.setattr(feeder, "AHEAD_MOST", 3 * W)
    api, app = await serve(reaper_interval=3600.0)
    dispatcher = app[K.dispatcher]
    dispatcher.feeder.wanted = lambda: 2_000_000
    job = await api.submit(CODE, {"range": [1_000_000]})
    await dispatcher.queue.lease("v1", ["a1"], now=0.0)
    assert await dispatcher.feeder.look() == 3 * W  # 99 ready: 199, 299, then 399 >= 300
    assert await _materialised(app, job) == 4 * W
    assert await dispatcher.feeder.look() == 0

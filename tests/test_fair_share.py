"""Fair share and quotas over HTTP: operators set a researcher's share and limits, the queue hands
out by share (also after a Redis flush), and each quota answers 429 with a message. Both backends."""

from __future__ import annotations

import json
import os
import time

import pytest
import sqlalchemy as sa

from server.protocol import MAX_CHUNK_TASKS
from server.store.storage import WINDOW
from server.store.tables import tasks
from server.web import appkeys as K
from tests.conftest import Api, add_researcher
from tests.test_dashboard_api import REDIS_URL, browser_session, redis_url, sign_in  # noqa: F401

CODE = "def main(x):\n    return x\n"
JSON = {"Content-Type": "application/json"}


async def operator_session(serve, browser_session, **overrides):  # noqa: F811
    api, app = await serve(**overrides)
    await add_researcher(app, "op@example.org", operator=True)
    op = browser_session(api.url)
    await sign_in(op, api.url, "op@example.org")
    async with api.session.get(f"{api.url}/api/jobs", headers=api.headers()) as resp:
        assert resp.status == 200
    me = await app[K.storage].researcher_by_token(__import__("server.crypto").crypto.hash_token(api.token))
    return api, app, op, me.id


async def test_operator_sets_limits_and_bad_input_is_refused(serve, browser_session):  # noqa: F811
    api, app, op, rid = await operator_session(serve, browser_session, max_body_bytes=4096)
    url = f"{api.url}/api/admin/researchers/{rid}/limits"
    async with op.get(url) as resp:
        assert await resp.json() == {
            "id": rid,
            "share": None,
            "max_queued_tasks": None,
            "max_stored_bytes": None,
            "max_requests_per_second": None,
        }
    async with op.post(url, json={"share": 3, "max_queued_tasks": 100}) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["share"] == 3.0 and body["max_queued_tasks"] == 100
    async with op.post(url, json={"share": None}) as resp:  # null: back to the default, the rest stays
        body = await resp.json()
        assert body["share"] is None and body["max_queued_tasks"] == 100
    bad = [
        ("not json", "malformed JSON"),
        ("[1]", "send a JSON object"),
        ("{}", "send a JSON object"),
        ('{"sharez": 1}', "unknown field 'sharez'"),
        ('{"share": "2"}', "share: expected a number"),
        ('{"share": true}', "share: expected a number"),
        ('{"share": 0}', "share: must be > 0"),
        ('{"share": -1}', "share: must be > 0"),
        ('{"share": 1e300}', "at most"),
        ('{"max_queued_tasks": 1.5}', "max_queued_tasks: expected an integer"),
        ('{"max_queued_tasks": -1}', "must be >= 0"),
        ('{"max_requests_per_second": 0}', "must be > 0"),
    ]
    for raw, message in bad:
        async with op.post(url, data=raw, headers=JSON) as resp:
            assert resp.status == 400 and message in (await resp.json())["error"], raw
    async with op.post(url, data=json.dumps({"share": 1, "pad": "x" * 5000}), headers=JSON) as resp:
        assert resp.status == 413  # oversized
    for path in ("999999", "abc"):  # unknown researcher
        async with op.post(f"{api.url}/api/admin/researchers/{path}/limits", json={"share": 2}) as resp:
            assert resp.status == 404
        async with op.get(f"{api.url}/api/admin/researchers/{path}/limits") as resp:
            assert resp.status == 404
    async with api.session.post(url, json={"share": 2}, headers=api.headers()) as resp:
        assert resp.status == 403  # not an operator


async def test_shares_weight_hand_out_and_survive_a_rebuild(serve, browser_session, backend, redis_client):  # noqa: F811
    api, app, op, rid = await operator_session(serve, browser_session)
    other_token = await add_researcher(app, "other@example.org")
    async with op.post(f"{api.url}/api/admin/researchers/{rid}/limits", json={"share": 3}) as resp:
        assert resp.status == 200
    heavy = await api.submit(CODE, list(range(40)))
    async with api.session.post(
        f"{api.url}/api/jobs", json={"code": CODE, "inputs": list(range(40))}, headers=api.headers(other_token)
    ) as resp:
        light = (await resp.json())["id"]
    dispatcher = app[K.dispatcher]

    async def lease_jobs(n: int, who: str) -> list[int]:
        return [le.job for le in await dispatcher.queue.lease(who, [f"{who}{i}" for i in range(n)], now=0.0)]

    got = await lease_jobs(20, "a")
    assert (got.count(heavy), got.count(light)) == (15, 5)
    if backend == "mariadb":  # Redis flushed: the rebuild brings back the tasks, owners and shares
        await redis_client.flushdb()
        await dispatcher.rebuild_if_needed()  # (or the reaper's pass did it first)
        assert await dispatcher.queue.ready_count() == 80
        got = await lease_jobs(20, "b")
        assert (got.count(heavy), got.count(light)) == (15, 5)


async def test_quotas_answer_429(serve, browser_session):  # noqa: F811
    api, app, op, rid = await operator_session(serve, browser_session)
    url = f"{api.url}/api/admin/researchers/{rid}/limits"
    async with op.post(url, json={"max_queued_tasks": 10}) as resp:
        assert resp.status == 200
    await api.submit(CODE, list(range(8)))
    async with api.session.post(
        f"{api.url}/api/jobs", json={"code": CODE, "inputs": list(range(5))}, headers=api.headers()
    ) as resp:
        error = (await resp.json())["error"]
        assert resp.status == 429 and "queued-tasks quota" in error and "the limit is 10" in error
    await api.submit(CODE, list(range(2)))  # exactly up to the limit is fine

    async with op.post(url, json={"max_queued_tasks": None, "max_stored_bytes": 0}) as resp:
        assert resp.status == 200
    async with api.session.post(
        f"{api.url}/api/jobs", json={"code": CODE, "inputs": [1]}, headers=api.headers()
    ) as resp:
        assert resp.status == 429 and "stored-results quota" in (await resp.json())["error"]

    async with op.post(url, json={"max_requests_per_second": 0.01}) as resp:  # one request per 100 s
        assert resp.status == 200
    async with api.session.get(f"{api.url}/api/jobs", headers=api.headers()) as resp:
        assert resp.status == 200
    async with api.session.get(f"{api.url}/api/jobs", headers=api.headers()) as resp:
        assert resp.status == 429 and "request-rate quota" in (await resp.json())["error"]
        assert int(resp.headers["Retry-After"]) >= 50


@pytest.mark.parametrize("rate", [5.0])
def test_request_budget_refills(rate):
    from server.store.models import QuotaExceeded
    from server.web.quotas import RequestBudget

    budget = RequestBudget()
    for _ in range(10):  # a burst of twice the rate
        budget.take(1, rate, now=100.0)
    with pytest.raises(QuotaExceeded, match="try again in 0.20 s"):
        budget.take(1, rate, now=100.0)
    budget.take(2, rate, now=100.0)  # per researcher
    budget.take(1, rate, now=100.2)  # refilled one


def _rss_mib() -> float:
    """This process's resident memory: the server under test runs in it (and no volunteer yet)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def test_a_small_job_is_not_held_up_by_a_huge_one(serve, volunteers, backend):
    """Done-when 1 of the scale issue: a 1,000,000-task range job is submitted; its POST makes one
    window of tasks ready (not a million), and the server's memory grows by < 50 MB. While it is
    queued, another researcher's 200-task job is accepted at once and, with 4 simulated volunteers,
    is handed out in turns with the huge one (before fair share it waited behind every task of it)."""
    api, app = await serve()
    small_token = await add_researcher(app, "small@example.org")
    big_n = 1_000_000
    rss = _rss_mib()
    started = time.perf_counter()
    big = await api.submit(CODE, {"range": [0, big_n]})
    took = time.perf_counter() - started
    growth = _rss_mib() - rss
    print(f"{backend}: the {big_n:,}-task POST returned after {took:.3f} s; server RSS grew {growth:.1f} MiB")
    status = await api.job(big)
    assert status["n_tasks"] == big_n and status["counts"]["queued"] == big_n
    assert status["materialised"] == WINDOW  # one window made ready at submit, not a million tasks
    async with app[K.storage].engine.connect() as conn:
        rows = await conn.scalar(sa.select(sa.func.count()).select_from(tasks).where(tasks.c.job_id == big))
    assert rows == WINDOW
    assert await app[K.dispatcher].queue.ready_count() == WINDOW
    assert growth < 50

    async with api.session.post(
        f"{api.url}/api/jobs", json={"code": CODE, "inputs": list(range(200))}, headers=api.headers(small_token)
    ) as resp:
        assert resp.status == 201
        small = (await resp.json())["id"]
    volunteers(api.url, 4, prefetch=2)
    small_api = Api(api.url, api.session, small_token)
    assert (await small_api.wait(small, timeout=120))["state"] == "done"
    finished = (await small_api.job(small))["finished_at"]
    async with app[K.storage].engine.connect() as conn:
        before = await conn.scalar(
            sa.select(sa.func.count()).where(tasks.c.job_id == big, tasks.c.finished_at <= finished)
        )
    print(f"{backend}: the huge job's tasks finished before the small job was done: {before}")
    # turns: about as many of the huge job's tasks as the small one's 200 (volunteers hold a few
    # each), not the million queued before them -- plus, since both jobs' tasks are tiny and go out in
    # chunks (issue 9), at most one chunk of the huge job per volunteer finishing beside the small
    # job's last results (a chunk is about UVM_CHUNK_TARGET = 1 s of work: its own time, not a wait)
    assert before < 400 + 4 * MAX_CHUNK_TASKS

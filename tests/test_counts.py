"""Honest counts (issue 11): ``volunteers`` and ``running`` count work being computed, not leases.

A volunteer that prefetches holds more leases than it has workers; only the attempts its workers
compute now (protocol 2's ``running`` in ``ready``/``heartbeat``) are running, the rest ``leased``.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from server import protocol as P
from server.web import appkeys as K

CODE = "def main(x):\n    return x\n"


async def _hello(ws, workers: int = 1, prefetch: int = 3) -> None:
    await ws.send_str(P.encode(P.Hello("", {"cores": 2, "workers": workers, "prefetch": prefetch})))
    assert json.loads((await ws.receive(timeout=10)).data)["type"] == "welcome"


async def _lease(ws, n: int, running: list[str] | None = None) -> list[dict]:
    await ws.send_str(P.encode(P.Ready(n, running)))
    return json.loads((await ws.receive(timeout=10)).data)["tasks"]


async def _counts(api, job: int) -> tuple[dict, int]:
    status = await api.job(job)
    return status["counts"], status["volunteers"]


async def _until(api, job: int, expected: tuple, keys: tuple[str, ...] = ("running", "leased")) -> tuple:
    """The counts named by ``keys`` and the volunteers, once they are ``expected`` (a connection's
    report is written within COMPUTING_EVERY of a change), or as they are after 3 s."""
    for _ in range(60):
        counts, volunteers = await _counts(api, job)
        got = (*(counts[k] for k in keys), volunteers)
        if got == expected:
            break
        await asyncio.sleep(0.05)
    return got


async def test_one_prefetching_volunteer_counts_once(serve):
    api, _ = await serve()
    job = await api.submit(CODE, list(range(10)))
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    async with api.session.ws_connect(url) as ws:
        await _hello(ws)
        tasks = await _lease(ws, 4, [])
        assert len(tasks) == 4
        held = [t["attempt"] for t in tasks]
        await ws.send_str(P.encode(P.Heartbeat(held, held[:1])))  # one worker computes, three wait
        await ws.send_str(P.encode(P.Heartbeat(held, held[:1])))  # handled in order: the first is in
        assert await _until(api, job, (1, 3, 6, 1), ("running", "leased", "queued")) == (1, 3, 6, 1)
        # the list says the same
        async with api.session.get(f"{api.url}/api/jobs", headers=api.headers()) as resp:
            (listed,) = [j for j in (await resp.json())["jobs"] if j["id"] == job]
        assert listed["counts"]["running"] == 1 and listed["volunteers"] == 1
        # a second volunteer computing two: 2 volunteers, 3 running
        async with api.session.ws_connect(url) as other:
            await _hello(other, workers=2)
            more = [t["attempt"] for t in await _lease(other, 3, [])]
            await other.send_str(P.encode(P.Heartbeat(more, more[:2])))
            await other.send_str(P.encode(P.Heartbeat(more, more[:2])))
            assert await _until(api, job, (3, 4, 2)) == (3, 4, 2)
        # it left: its leases go back (in a task of their own), it computes nothing
        for _ in range(100):
            await ws.send_str(P.encode(P.Heartbeat(held, held[:1])))
            counts, volunteers = await _counts(api, job)
            if counts["queued"] == 6:
                break
        assert await _until(api, job, (1, 3, 1)) == (1, 3, 1)
        # an attempt it does not hold is not counted
        await ws.send_str(P.encode(P.Heartbeat(held, ["f" * 16])))
        await ws.send_str(P.encode(P.Heartbeat(held, ["f" * 16])))
        assert await _until(api, job, (0, 4, 0)) == (0, 4, 0)


async def test_a_busy_volunteers_changes_are_written_together(serve, monkeypatch):
    """Twenty changes of what a volunteer computes within COMPUTING_EVERY cost two writes (the first
    at once, the rest together), and the count ends right."""
    api, app = await serve()
    queue = app[K.dispatcher].queue
    writes = []
    original = queue.computing_many

    async def counted(entries, ttl):  # noqa: ANN001, ANN202
        writes.append(len(entries))
        await original(entries, ttl)

    monkeypatch.setattr(queue, "computing_many", counted)
    job = await api.submit(CODE, list(range(10)))
    async with api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        await _hello(ws, workers=2, prefetch=2)
        held = [t["attempt"] for t in await _lease(ws, 4, [])]
        writes.clear()
        for i in range(20):
            await ws.send_str(P.encode(P.Heartbeat(held, held[: 1 + i % 2])))
        await ws.send_str(P.encode(P.Heartbeat(held, held[:2])))
        assert await _until(api, job, (2, 2, 1)) == (2, 2, 1)
    assert 1 <= len(writes) <= 3, writes


async def test_protocol_1_volunteer_is_estimated_by_its_workers(serve):
    """A volunteer that does not say what runs: as many as its declared workers count as running."""
    api, _ = await serve()
    job = await api.submit(CODE, list(range(10)))
    async with api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        await _hello(ws, workers=2, prefetch=4)
        assert len(await _lease(ws, 6)) == 6
        await ws.send_str(P.encode(P.Heartbeat([])))
        assert await _until(api, job, (2, 4, 1)) == (2, 4, 1)


async def test_sim_volunteers_report_running(serve, volunteers):
    """``volunteer-sim`` speaks protocol 2: its prefetched tasks are not counted as running."""
    api, _ = await serve()
    job = await api.submit("import time\ndef main(x):\n    time.sleep(0.01)\n    return x\n", list(range(300)))
    volunteers(api.url, 1, prefetch=8)
    seen = []
    for _ in range(50):
        counts, n = await _counts(api, job)
        seen.append((counts["running"], n))
        if counts["done"] == 300:
            break
    assert max(r for r, _ in seen) <= 1 and max(n for _, n in seen) <= 1


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"type": "heartbeat", "attempts": [], "running": "abc"}, "field 'running' must be a list"),
        ({"type": "heartbeat", "attempts": [], "running": [1]}, "'running' must be a list of attempt ids"),
        ({"type": "ready", "n": 1, "running": ["x" * 65]}, "'running' must be a list of attempt ids"),
        ({"type": "ready", "n": 1, "running": ["a"] * (P.MAX_WORKERS + 1)}, "at most 64 attempts in 'running'"),
        ({"type": "ready", "n": 1, "running": {"a": 1}}, "field 'running' must be a list"),
    ],
)
def test_running_is_typed_and_capped(message, error):
    with pytest.raises(P.ProtocolError, match=error):
        P.from_dict(message)


def test_running_round_trips():
    assert P.decode(P.encode(P.Heartbeat(["a", "b"], ["a"]))).running == ["a"]
    assert P.decode(P.encode(P.Ready(2))).running is None
    assert P.PROTOCOL_VERSION >= 3  # `running` came with version 3


async def test_throughput_has_one_definition(serve, volunteers):
    """Once finished: tasks / (last finish - first start), in the job view and the list alike (a
    100-task job done in a second is not 100 / 30 s); while running: over the last 30 s."""
    api, _ = await serve()
    job = await api.submit("def main(x):\n    return x\n", list(range(100)), description="squares for science")
    volunteers(api.url, 2, prefetch=8)
    status = await api.wait(job)
    assert status["state"] == "done" and status["description"] == "squares for science"
    ran = status["finished_at"] - status["started_at"]
    assert 0 < ran < status["finished_at"] - status["created_at"] + 1e-6
    assert status["throughput"] == round(100 / max(ran, 1e-3), 3)
    async with api.session.get(f"{api.url}/api/jobs", headers=api.headers()) as resp:
        (listed,) = [j for j in (await resp.json())["jobs"] if j["id"] == job]
    assert listed["throughput"] == status["throughput"]


def test_throughput_of_a_running_job_is_over_its_last_30_s():
    from server.store.storage import throughput

    running = {"state": "running", "started_at": 1000.0, "counts": {"done": 50, "failed": 0}}
    assert throughput(running, 60, now=1100.0) == 2.0  # 60 tasks in the last 30 s
    assert throughput(running, 60, now=1010.0) == 6.0  # started 10 s ago: over those 10 s
    assert throughput({**running, "started_at": None}, 0, now=1010.0) == 0.0
    ended = {"state": "failed", "started_at": 1000.0, "finished_at": 1000.5, "counts": {"done": 90, "failed": 10}}
    assert throughput(ended, 0, now=2000.0) == 200.0
    assert throughput({**ended, "started_at": None}, 0, now=2000.0) == 0.0

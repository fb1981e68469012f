"""Leases over the real websocket: heartbeats extend them, silence expires them, and live events."""

from __future__ import annotations

import asyncio
import json

from server import protocol as P

CODE = "def main(x):\n    return x\n"


async def _hello(ws, volunteer: str = "", workers: int = 4) -> str:
    """Say hello (presenting ``volunteer``); returns the signed id the server issued or kept."""
    await ws.send_str(P.encode(P.Hello(volunteer, {"cores": 2, "workers": workers})))
    welcome = json.loads((await ws.receive()).data)
    assert welcome["type"] == "welcome"
    return welcome["volunteer"]


async def _lease(ws, n: int) -> list[dict]:
    """The tasks leased for a ``ready {n}``; [] when the server held it (``wait``: nothing for us now)."""
    await ws.send_str(P.encode(P.Ready(n)))
    reply = json.loads((await ws.receive(timeout=10)).data)
    assert reply["type"] in ("tasks", "wait"), reply
    return reply.get("tasks", [])


async def test_heartbeat_keeps_a_lease_and_silence_expires_it(serve):
    api, _ = await serve(lease_grace=0.2, reaper_interval=0.1)
    job = await api.submit(CODE, [1, 2], timeout=1.0, max_attempts=2)
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    async with api.session.ws_connect(url) as ws:
        await _hello(ws)
        a, b = await _lease(ws, 2)
        assert a["deadline"] > 0
        # 1.6 s: past the 1.2 s deadline, within the 2.2 s limit (start + 2 x timeout + grace):
        # only `a` is kept alive
        for _ in range(16):
            await ws.send_str(P.encode(P.Heartbeat([a["attempt"]])))
            await asyncio.sleep(0.1)
        status = await api.job(job)
        assert status["counts"]["running"] == 1 and status["counts"]["queued"] == 1  # b expired, requeued
        ack = P.Outcome(a["attempt"], a["task"], result=a["input"])
        await ws.send_str(P.encode(P.Results([ack])))
        assert json.loads((await ws.receive()).data)["attempts"] == [a["attempt"]]
        # b's task never goes back to the volunteer that let it expire: another one leases it
        # (attempt 2 of 2) and lets it expire too -> failed
        assert await _lease(ws, 1) == []
        async with api.session.ws_connect(url) as other:
            await _hello(other, "second")
            (again,) = await _lease(other, 1)
            assert again["task"] == b["task"] and again["attempt"] != b["attempt"]
            final = await api.wait(job, timeout=10)
    assert final["state"] == "failed" and final["counts"]["done"] == 1 and final["counts"]["failed"] == 1
    async with api.session.get(f"{api.url}/api/jobs/{job}/errors", headers=api.headers()) as resp:
        (err,) = (await resp.json())["errors"]
    assert "lease expired" in err["error"] and err["attempts"] == 2


async def test_late_result_after_expiry_is_accepted_once(serve):
    api, _ = await serve(lease_grace=0.2, reaper_interval=0.1)
    job = await api.submit(CODE, [5], timeout=0.2, max_attempts=3)
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    async with api.session.ws_connect(url) as ws:
        await _hello(ws)
        (t,) = await _lease(ws, 1)
        await asyncio.sleep(0.8)  # the lease expires; the task is ready again
        late = P.Outcome(t["attempt"], t["task"], result=99)
        await ws.send_str(P.encode(P.Results([late])))
        assert json.loads((await ws.receive()).data)["attempts"] == [t["attempt"]]  # still useful work
        await ws.send_str(P.encode(P.Results([late])))
        assert json.loads((await ws.receive()).data)["ignored"] == [t["attempt"]]  # but only once
        assert await _lease(ws, 1) == []  # and the task is no longer handed out
    assert (await api.wait(job))["state"] == "done"
    assert json.loads(await api.results(job))[0]["result"] == 99


async def test_throttle_and_capabilities_are_recorded(serve):
    api, _ = await serve()
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    async with api.session.ws_connect(url) as ws:
        me = await _hello(ws)
        sent = {"battery": {"level": 0.5, "charging": True}, "workers": 1, "reasons": ["battery"], "extra": 1}
        await ws.send_str(P.encode(P.Throttle(sent)))
        await ws.send_str(P.encode(P.Ready(0)))  # answered after the throttle was handled
        assert json.loads((await ws.receive()).data) == {"type": "tasks", "tasks": []}
    async with api.session.get(f"{api.url}/api/volunteers/{me}") as resp:  # a volunteer sees itself
        stats = await resp.json()
    assert stats["throttle"] == P.ThrottleState.from_wire(sent).to_wire()
    assert stats["throttle"]["battery"] == {"level": 0.5, "charging": True} and "extra" not in stats["throttle"]
    async with api.session.get(f"{api.url}/api/volunteers/{me.split('-')[0]}") as resp:
        assert resp.status == 401  # the public id alone shows nothing without a session
    async with api.session.get(f"{api.url}/api/volunteers/{me.split('-')[0]}", headers=api.headers()) as resp:
        assert (await resp.json())["tasks_done"] == 0  # a signed-in researcher may look
    async with api.session.get(f"{api.url}/api/volunteers/{me[:-1]}x", headers=api.headers()) as resp:
        assert resp.status == 404  # a forged signature is nobody
    async with api.session.get(f"{api.url}/api/volunteers/nobody", headers=api.headers()) as resp:
        assert resp.status == 404


async def test_events_websocket_streams_my_jobs_only(serve, volunteers):
    api, app = await serve()
    from tests.conftest import add_researcher

    other = await add_researcher(app, "watcher@example.org")
    events_url = api.url.replace("http", "ws") + "/api/events"
    async with (
        api.session.ws_connect(events_url, headers=api.headers()) as mine,
        api.session.ws_connect(events_url, headers=api.headers(other)) as theirs,
    ):
        job = await api.submit(CODE, list(range(50)))
        volunteers(api.url, 2)
        seen = []
        while not seen or seen[-1]["state"] != "done":
            event = json.loads((await mine.receive(timeout=20)).data)
            assert event["type"] == "job" and event["id"] == job
            seen.append(event)
        assert seen[-1]["counts"]["done"] == 50
        done_counts = [e["counts"]["done"] for e in seen]
        assert done_counts == sorted(done_counts)
        try:
            leaked = await theirs.receive(timeout=0.5)
        except TimeoutError:
            leaked = None
        assert leaked is None  # another researcher hears nothing of my job
    async with api.session.get(events_url.replace("ws", "http", 1)) as resp:  # no credentials
        assert resp.status == 401


async def test_reconnecting_volunteer_resumes_the_tasks_it_holds(serve):
    api, app = await serve()
    job = await api.submit(CODE, [10, 20, 30, 40])
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    async with api.session.ws_connect(url) as ws:
        me = await _hello(ws)
        held = await _lease(ws, 3)
    # the socket closed (a refresh): the leases went back to the queue... and come back on hello
    async with api.session.ws_connect(url) as ws:
        resume = {"workers": 4, "resume": [t["attempt"] for t in held] + ["bogus"]}
        await ws.send_str(P.encode(P.Hello(me, resume)))
        assert json.loads((await ws.receive()).data)["volunteer"] == me
        async with api.session.ws_connect(url) as other:
            await _hello(other)
            got = await _lease(other, 4)
        assert [t["input"] for t in got] == [40]  # only the task nobody holds
        results = [P.Outcome(t["attempt"], t["task"], result=t["input"] + 1) for t in held]
        await ws.send_str(P.encode(P.Results(results)))
        ack = json.loads((await ws.receive()).data)
        assert sorted(ack["attempts"]) == sorted(t["attempt"] for t in held) and ack["ignored"] == []
    status = await api.job(job)
    assert status["counts"]["done"] == 3 and status["counts"]["running"] == 0
    import sqlalchemy as sa

    from server.store.tables import attempts
    from server.web import appkeys as K

    public = me.split("-")[0]
    async with app[K.storage].engine.connect() as conn:
        rows = (
            await conn.execute(sa.select(attempts.c.id, attempts.c.outcome).where(attempts.c.volunteer == public))
        ).all()
    assert sorted(o for _, o in rows) == ["done", "done", "done"]  # the abandoned rows became done

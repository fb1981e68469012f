"""Leases over the real websocket: heartbeats extend them, silence expires them, and live events."""

from __future__ import annotations

import asyncio
import json

from server import protocol as P
from server.web import appkeys as K

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
        for _ in range(20):  # what a connection computes is written within COMPUTING_EVERY of a change
            status = await api.job(job)
            if status["counts"]["running"] == 1:
                break
            await asyncio.sleep(0.05)
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


async def _the_resumed_keep_their_tasks(api, url: str, ws, held: list[dict]) -> None:  # noqa: ANN001
    """Another volunteer gets only the task nobody holds; the resumed ones' results are acknowledged."""
    async with api.session.ws_connect(url) as other:
        await _hello(other)
        got = await _lease(other, 4)
    assert [t["input"] for t in got] == [40]  # only the task nobody holds
    results = [P.Outcome(t["attempt"], t["task"], result=t["input"] + 1) for t in held]
    await ws.send_str(P.encode(P.Results(results)))
    ack = json.loads((await ws.receive()).data)
    assert sorted(ack["attempts"]) == sorted(t["attempt"] for t in held) and ack["ignored"] == []


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
        await _the_resumed_keep_their_tasks(api, url, ws, held)
    status = await api.job(job)
    assert status["counts"]["done"] == 3 and status["counts"]["running"] == 0
    import sqlalchemy as sa

    from server.store.tables import attempts

    public = me.split("-")[0]
    async with app[K.storage].engine.connect() as conn:
        rows = (
            await conn.execute(sa.select(attempts.c.id, attempts.c.outcome).where(attempts.c.volunteer == public))
        ).all()
    assert sorted(o for _, o in rows) == ["done", "done", "done"]  # the abandoned rows became done


async def test_resume_while_the_old_socket_is_still_open_keeps_the_leases(serve):
    """A refresh whose old socket's close the server notices only after the new socket resumed
    (a half-open connection): the resumed attempts stay with the new socket; the old one's close
    must not put them back in the queue for someone else."""
    api, app = await serve()
    await api.submit(CODE, [10, 20, 30, 40])
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    old = await api.session.ws_connect(url)
    me = await _hello(old)
    held = await _lease(old, 3)
    async with api.session.ws_connect(url) as ws:
        await ws.send_str(P.encode(P.Hello(me, {"workers": 4, "resume": [t["attempt"] for t in held]})))
        assert json.loads((await ws.receive()).data)["volunteer"] == me
        await old.close()  # noticed now, after the resume
        dispatcher = app[K.dispatcher]
        for _ in range(100):  # the old socket's handler ends and gives back what it still held
            if len(dispatcher.sockets) == 1 and not dispatcher._leaving:
                break
            await asyncio.sleep(0.05)
        await _the_resumed_keep_their_tasks(api, url, ws, held)


async def test_a_resumed_attempt_that_expires_is_recorded_once(serve):
    """Abandoned (the socket closed), resumed with the same id, then silent past its deadline: the
    attempt's row becomes "expired" and counts as one attempt; the reaper does not fail on it."""
    api, app = await serve(lease_grace=0.2, reaper_interval=0.1)
    job = await api.submit(CODE, [7], timeout=0.5, max_attempts=2)
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    dispatcher = app[K.dispatcher]
    async with api.session.ws_connect(url) as ws:
        me = await _hello(ws)
        (task,) = await _lease(ws, 1)
    for _ in range(100):  # the close is handled: the attempt is recorded as abandoned
        if not dispatcher._leaving and not dispatcher.sockets:
            break
        await asyncio.sleep(0.05)
    async with api.session.ws_connect(url) as ws:
        await ws.send_str(P.encode(P.Hello(me, {"workers": 4, "resume": [task["attempt"]]})))
        assert json.loads((await ws.receive()).data)["volunteer"] == me
        (sock,) = dispatcher.sockets
        assert list(sock.held) == [task["attempt"]]  # resumed under its own id
        import sqlalchemy as sa

        from server.store.tables import attempts, tasks

        for _ in range(100):  # silence: the lease expires
            async with app[K.storage].engine.connect() as conn:
                row = (await conn.execute(sa.select(attempts.c.outcome).where(attempts.c.id == task["attempt"]))).one()
                tries = (await conn.execute(sa.select(tasks.c.attempts).where(tasks.c.id == task["task"]))).scalar()
            if row.outcome == "expired":
                break
            await asyncio.sleep(0.1)
    assert (row.outcome, tries) == ("expired", 1)
    assert dispatcher.loops["reaper"].restarts == 0
    status = await api.job(job)
    assert status["state"] == "running" and status["counts"]["failed"] == 0  # one more attempt is allowed


async def test_open_tasks_the_queue_lost_go_back_and_the_job_ends(serve, volunteers, caplog):
    """The safety net under every queue write: tasks taken out of the ready queue behind the
    dispatcher's back (as a lost write would) are found by the reaper once nothing is ready, and the
    job still ends, each task done once. Without the net this job never ends."""
    from server.queue import ReadyItem
    from server.web import appkeys as K

    api, app = await serve(reaper_interval=0.1)
    dispatcher = app[K.dispatcher]
    job = await api.submit(CODE, list(range(12)))
    storage, queue = dispatcher.storage, dispatcher.queue
    items: list[ReadyItem] = []
    for _ in range(200):  # the submission is pushed by the intake loop: wait until all 12 are ready
        items = [i for chunk in [c async for c in storage.ready_items([job])] for i in chunk]
        if len(items) == 12 and await queue.ready_count() == 12:
            break
        await asyncio.sleep(0.05)
    assert len(items) == 12
    await queue.drop(items[3:8])  # five open tasks now neither ready nor leased
    assert await queue.ready_count() == 7
    volunteers(api.url, 2, prefetch=2)
    status = await api.wait(job, timeout=60)
    assert status["state"] == "done" and status["counts"]["done"] == 12
    assert [r["result"] for r in json.loads(await api.results(job, "json"))] == list(range(12))
    assert dispatcher.metrics.strays._value.get() >= 5  # (a lease released at the same moment may count too)
    assert any("neither ready nor leased" in r.getMessage() for r in caplog.records)


async def test_the_safety_net_reads_only_jobs_with_more_open_tasks_than_leases(serve, monkeypatch):
    """Nothing ready and every open task of a job leased (10,000 volunteers on a job): the sweep reads
    none of its tasks. A job with open tasks neither ready nor leased is read, alone, and they go back."""
    import time

    api, app = await serve(reaper_interval=3600.0)  # the sweeps are ours
    dispatcher = app[K.dispatcher]
    storage, queue = dispatcher.storage, dispatcher.queue
    busy = await api.submit(CODE, list(range(6)))
    assert len(await queue.lease("v1", [f"a{i}" for i in range(6)], now=time.time())) == 6
    assert await queue.ready_count() == 0
    read: list = []
    ready_items = storage.ready_items
    monkeypatch.setattr(storage, "ready_items", lambda job_ids=None: read.append(job_ids) or ready_items(job_ids))
    assert await dispatcher.restore_strays() == 0 and read == []  # every open task leased: nothing read
    lost = await api.submit(CODE, [1, 2, 3])
    await queue.drop([item async for chunk in ready_items([lost]) for item in chunk])  # as a lost write would
    assert await queue.ready_count() == 0
    read.clear()  # (the submit read its own tasks to push them)
    assert await dispatcher.restore_strays() == 3 and read == [[lost]] and busy != lost
    assert await queue.ready_count() == 3

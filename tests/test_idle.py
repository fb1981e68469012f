"""Idle volunteers wait (issue 9, protocol 4): held readies, pushes on any instance, idle heartbeats
that grow apart, and a handler's error that never drops the socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from server import protocol as P
from server.jobs.dispatch import VolunteerSocket
from server.jobs.waiting import Waiters
from server.queue import redis_keys
from server.web import appkeys as K
from workers.sim import SimVolunteer, run_volunteers

CODE = "def main(x):\n    return x * 3\n"
# Done-when 2 of issue 9: 2,000 (UVM_TEST_IDLE_VOLUNTEERS sets another number for a run by hand).
N = int(os.environ.get("UVM_TEST_IDLE_VOLUNTEERS", "2000"))


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not check():
        if loop.time() > end:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.1)


def ws_url(api) -> str:  # noqa: ANN001
    return api.url.replace("http", "ws") + "/ws/volunteer"


async def hello(ws, protocol: int = P.PROTOCOL_VERSION, **capabilities: object) -> dict:  # noqa: ANN001
    await ws.send_str(P.encode(P.Hello("", capabilities, protocol=protocol)))
    welcome = json.loads((await ws.receive(timeout=10)).data)
    assert welcome["type"] == "welcome"
    return welcome


async def ask(ws, msg: object) -> dict:  # noqa: ANN001
    await ws.send_str(P.encode(msg))
    return json.loads((await ws.receive(timeout=10)).data)


# ------------------------------------------------------------------------- done-when 2 of issue 9
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["mariadb"])
async def test_2000_idle_volunteers_hear_only_heartbeats_then_get_work_pushed(serve):
    """2,000 simulated volunteers in this one process connect (spread over 8 s) and wait. While there
    is no work, the server sends each nothing but its `welcome` and one `wait` (the ready's: each
    idle heartbeat after it, each longer than the last, goes unanswered); then a 4,000-task job is
    pushed to every one of them: no volunteer asks twice, none ever gets an empty `tasks`. (Each
    does one batch and leaves.)
    The wake leases for many waiters at once: their checkpoint reads are a few queries, not one each."""
    api, app = await serve(heartbeat=1.0, idle_heartbeat=4.0)
    dispatcher, storage = app[K.dispatcher], app[K.storage]
    sims = [SimVolunteer(api.url, prefetch=2, leave_after=1, trace=True) for _ in range(N)]
    stop = asyncio.Event()
    # connects spread over N / 250 seconds (8 s for 2,000), as their jitter does in real life
    run = asyncio.create_task(run_volunteers(api.url, 0, stop=stop, ramp=N / 250, sims=sims, quiet=True))
    try:
        await until(lambda: len(dispatcher.waiters) == N, 300, f"{N} volunteers waiting")
        # idle long enough for three heartbeats each, 1 to 4 s apart (each doubles the last, up to 4 s)
        await until(lambda: all(len(s.beats) >= 3 for s in sims), 300, "three beats each")
        idle = [list(s.trace or []) for s in sims]
        reads = storage.checkpoint_reads.batches
        job = await api.submit(CODE, {"range": [2 * N]})
        await until(lambda: all(s.pushed for s in sims), 300, "the job reached every volunteer")
        reads = storage.checkpoint_reads.batches - reads
    finally:
        stop.set()
        await run
    assert (await api.job(job))["counts"]["done"] > 0
    for sim, before in zip(sims, idle, strict=True):
        assert set(before) == {">hello", "<welcome", ">ready", "<wait", ">heartbeat"}, before
        assert before[:4] == [">hello", "<welcome", ">ready", "<wait"] and before.count(">ready") == 1
        # one `wait`, the ready's: the volunteer grows its interval itself, no heartbeat is answered
        assert before.count("<wait") == 1 and before.count(">heartbeat") >= 3
        assert 1.0 <= sim.waits[0] <= 4.0 and sim.beats[:3] == [sim.waits[0], *(min(4.0, 2 * b) for b in sim.beats[:2])]
        trace = sim.trace or []
        first = trace.index("<tasks")  # the job reached it: pushed, not asked for
        assert trace[:first].count(">ready") == 1 and "<tasks:0" not in trace
        assert set(trace[4:first]) <= {">heartbeat", "<wait"}
        assert len(sim.pushed) == 1 and sim.latencies == []
    assert dispatcher.waiters.woken >= N
    assert reads <= N / 20, f"{reads} checkpoint reads for {N} volunteers woken"  # 2,000 one by one


async def test_a_3_task_job_wakes_2_of_20_waiting_volunteers_and_tries_no_others(serve):
    """No thundering herd: 20 volunteers wait, each asking for 2; a job of 3 tasks is pushed to the 2
    oldest (2 tasks and 1), the wake leases for those 2 only, and the 18 others hear nothing."""
    api, app = await serve()
    waiters = app[K.dispatcher].waiters
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(api.session.ws_connect(ws_url(api))) for _ in range(20)]
        for ws in sockets:  # one after the other: the first is the oldest waiter
            await hello(ws, workers=1, prefetch=1)
            assert (await ask(ws, P.Ready(2)))["type"] == "wait"
        await api.submit(CODE, [1, 2, 3])
        await until(lambda: waiters.woken == 2, 30, "two volunteers woken")
        pushed = [json.loads((await ws.receive(timeout=10)).data) for ws in sockets[:2]]
        assert [(p["type"], len(p["tasks"])) for p in pushed] == [("tasks", 2), ("tasks", 1)]
        for ws in sockets[2:]:
            with pytest.raises(asyncio.TimeoutError):
                await ws.receive(timeout=0.05)  # still waiting: nothing pushed, nothing empty
        assert waiters.tried == 2 and len(waiters) == 18


# ------------------------------------------------------------------------------ other instances
@pytest.mark.parametrize("backend", ["mariadb"])
async def test_work_submitted_on_one_instance_wakes_waiters_on_another(serve):
    """Two server instances on one MariaDB + Redis: volunteers wait on B, a job is submitted on A;
    B hears of it on the bus and pushes the tasks to its waiters."""
    api_a, _ = await serve()
    api_b, app_b = await serve()
    sims = [SimVolunteer(api_b.url, prefetch=2, trace=True) for _ in range(10)]
    stop = asyncio.Event()
    run = asyncio.create_task(run_volunteers(api_b.url, 0, stop=stop, ramp=0.2, sims=sims, quiet=True))
    try:
        await until(lambda: len(app_b[K.dispatcher].waiters) == 10, 30, "ten waiting on B")
        job = await api_a.submit(CODE, list(range(50)))
        final = await api_a.wait(job, timeout=60)
    finally:
        stop.set()
        await run
    assert final["state"] == "done" and final["counts"]["done"] == 50
    assert all(len(s.pushed) >= 1 for s in sims)  # each was woken by B's push, not by asking
    assert all("<tasks:0" not in (s.trace or []) for s in sims)


# --------------------------------------------------------------------------- held readies, v3 clients
async def test_a_ready_at_its_cap_is_held_and_filled_when_results_are_acknowledged(serve):
    api, _ = await serve()
    job = await api.submit(CODE, list(range(5)))
    async with api.session.ws_connect(ws_url(api)) as ws:
        await hello(ws, workers=1, prefetch=0)  # a cap of one task
        (task,) = (await ask(ws, P.Ready(4)))["tasks"]
        wait = await ask(ws, P.Ready(4))
        assert wait["type"] == "wait" and 0 < wait["heartbeat"] <= 60.0  # at its cap: held
        await ask(ws, P.NeedCode(job, task["code_hash"]))
        ack = await ask(ws, P.Results([P.Outcome(task["attempt"], task["task"], result=task["input"] * 3)]))
        assert ack["type"] == "ack" and ack["attempts"] == [task["attempt"]]
        pushed = json.loads((await ws.receive(timeout=10)).data)  # room again: the held ready is filled
        assert pushed["type"] == "tasks" and len(pushed["tasks"]) == 1


async def test_a_protocol_3_volunteer_still_gets_an_empty_tasks(serve):
    """A page of version 3 still open during an upgrade polls as before: never held, never pushed."""
    api, app = await serve()
    async with api.session.ws_connect(ws_url(api)) as ws:
        await hello(ws, protocol=3)
        assert await ask(ws, P.Ready(2)) == {"type": "tasks", "tasks": []}
        assert len(app[K.dispatcher].waiters) == 0
        await api.submit(CODE, [1])
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=1.0)  # nothing pushed to a poller
        assert len((await ask(ws, P.Ready(2)))["tasks"]) == 1


async def test_ready_0_withdraws_a_held_ready_and_idle_heartbeats_grow_until_unanswered(serve):
    """A volunteer of protocol 5 (a page open during an upgrade) is told each longer interval."""
    api, app = await serve(heartbeat=2.0, idle_heartbeat=5.0)
    async with api.session.ws_connect(ws_url(api)) as ws:
        await hello(ws, protocol=5)
        beats = [(await ask(ws, P.Ready(1)))["heartbeat"]]
        assert 2.0 <= beats[0] <= 5.0  # the first: at random in [UVM_HEARTBEAT, UVM_IDLE_HEARTBEAT]
        while True:  # then each heartbeat gets a longer one (doubling up to 5, less up to a fifth)...
            await ws.send_str(P.encode(P.Heartbeat([])))
            try:
                reply = json.loads((await ws.receive(timeout=0.5)).data)
            except TimeoutError:
                break  # ...until the longest: not answered, the volunteer keeps the interval it has
            assert reply["type"] == "wait" and 0.8 * min(5.0, 2 * beats[-1]) - 0.01 <= reply["heartbeat"] <= 5.0
            beats.append(reply["heartbeat"])
            assert len(beats) <= 3
        assert len(beats) >= 2 and beats[-1] >= 4.0
        assert len(app[K.dispatcher].waiters) == 1  # still held: an unanswered heartbeat changes nothing
        assert await ask(ws, P.Ready(0)) == {"type": "tasks", "tasks": []}  # withdrawn
        assert len(app[K.dispatcher].waiters) == 0
        await ws.send_str(P.encode(P.Heartbeat([])))  # not waiting: a heartbeat is not answered
        await api.submit(CODE, [1])
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=1.0)


async def test_a_protocol_6_volunteer_grows_its_idle_interval_itself_and_hears_nothing_until_work(serve):
    """Its `wait` says the longest interval; none of its idle heartbeats is answered; it is still held,
    and work is pushed to it."""
    api, app = await serve(heartbeat=2.0, idle_heartbeat=5.0)
    async with api.session.ws_connect(ws_url(api)) as ws:
        await hello(ws)
        wait = await ask(ws, P.Ready(1))
        assert wait["type"] == "wait" and 2.0 <= wait["heartbeat"] <= 5.0 and wait["longest"] == 5.0
        for _ in range(3):
            await ws.send_str(P.encode(P.Heartbeat([])))
            with pytest.raises(TimeoutError):
                await ws.receive(timeout=0.3)
        assert len(app[K.dispatcher].waiters) == 1
        await api.submit(CODE, [1])
        pushed = json.loads((await ws.receive(timeout=10)).data)
        assert pushed["type"] == "tasks" and len(pushed["tasks"]) == 1


def test_idle_intervals_start_spread_over_a_whole_period_then_double_to_the_longest() -> None:
    """10,000 volunteers that connect together must not beat in step: their first idle intervals are
    spread over [UVM_IDLE_HEARTBEAT / 4, UVM_IDLE_HEARTBEAT] (never below UVM_HEARTBEAT), then each
    doubles up to UVM_IDLE_HEARTBEAT, less up to a fifth; none is ever longer."""
    socks = [VolunteerSocket(f"v{i}", send=None, capabilities=P.Capabilities()) for i in range(2000)]
    first = [Waiters.interval(sock, 10.0, 60.0) for sock in socks]
    assert 15.0 <= min(first) < 17.0 and 58.0 < max(first) <= 60.0
    assert 0.2 < sum(f < 30.0 for f in first) / len(first) < 0.47  # a third of [15, 60]: spread, not in step
    second = [Waiters.interval(sock, 10.0, 60.0) for sock in socks]
    doubled = [min(60.0, 2 * a) for a in first]
    assert all(0.8 * d - 0.01 <= b <= d + 0.01 for d, b in zip(doubled, second, strict=True))
    later = [Waiters.interval(sock, 10.0, 60.0) for sock in socks for _ in range(3)]
    assert min(later) >= 48.0 and max(later) <= 60.0
    sock = VolunteerSocket("short", send=None, capabilities=P.Capabilities())
    assert all(10.0 <= Waiters.interval(sock, 10.0, 20.0) <= 20.0 for _ in range(5))  # never below UVM_HEARTBEAT
    sock.beat = 0.0  # tasks came: the next idle stretch starts over
    assert Waiters.interval(sock, 10.0, 20.0) <= 20.0


# ------------------------------------------------------------------- an error never drops the socket
@pytest.mark.parametrize("backend", ["mariadb"])
async def test_an_error_in_a_handler_is_logged_and_told_and_the_socket_stays(serve, redis_url, caplog):
    """A real fault inside the `ready` handler (Redis answers the lease script with WRONGTYPE: a key
    of the queue holds a string): the volunteer gets `error` naming its `ready`, the traceback is
    logged, and the same socket gets its tasks once the fault is gone."""
    api, app = await serve()
    broken = aioredis.from_url(redis_url)
    async with api.session.ws_connect(ws_url(api)) as ws:
        await hello(ws, workers=2)
        await broken.set(redis_keys.ACTIVE, "not a sorted set")
        with caplog.at_level(logging.ERROR, logger="server.web.ws"):
            reply = await ask(ws, P.Ready(2))
        assert reply["type"] == "error" and reply["ref"] == "ready" and "failed to handle" in reply["message"]
        assert any("'ready' message failed" in r.getMessage() and r.exc_info for r in caplog.records)
        await broken.delete(redis_keys.ACTIVE)
        assert not ws.closed
        await api.submit(CODE, [1, 2])
        got = await ask(ws, P.Ready(2))
        assert got["type"] == "tasks" and len(got["tasks"]) == 2
    await broken.aclose()
    assert app[K.dispatcher].metrics.registry.get_sample_value("uvm_volunteer_message_errors_total") == 1

"""Chunked hand-out (protocol 5): tiny tasks go out several at a time as one chunk, one slot of the
lease cap, run in one call of the runner; results, errors, replicas and requeues stay per task."""

from __future__ import annotations

import asyncio
import json

import pytest
import sqlalchemy as sa

from server import protocol as P
from server.store.tables import attempts
from server.web import appkeys as K

TINY = "def main(x):\n    return x * x + 1\n"
TWO_MS = "import time\n\ndef main(x):\n    time.sleep(0.002)\n    return x * 3\n"


def _url(api) -> str:  # noqa: ANN001
    return api.url.replace("http", "ws") + "/ws/volunteer"


async def _hello(ws, protocol: int = P.PROTOCOL_VERSION, workers: int = 1, prefetch: int = 0) -> str:  # noqa: ANN001
    caps = {"cores": 1, "workers": workers, "prefetch": prefetch}
    await ws.send_str(P.encode(P.Hello("", caps, protocol=protocol)))
    welcome = json.loads((await ws.receive(timeout=10)).data)
    assert welcome["type"] == "welcome"
    return welcome["volunteer"]


async def _next(ws, *kinds: str) -> dict:  # noqa: ANN001
    while True:
        msg = json.loads((await ws.receive(timeout=10)).data)
        if msg["type"] in kinds:
            return msg


async def _lease(ws, n: int) -> list[P.TaskSpec]:  # noqa: ANN001
    """The specs a ``ready {n}`` gets (decoded as a volunteer decodes them); [] when held (``wait``)."""
    await ws.send_str(P.encode(P.Ready(n)))
    msg = await _next(ws, "tasks", "wait")
    return P.from_dict(msg).tasks if msg["type"] == "tasks" else []


async def _report(ws, specs: list[P.TaskSpec], elapsed: float = 0.001) -> dict:  # noqa: ANN001
    outcomes = [
        P.Outcome(item.attempt, item.task, result=item.input * item.input + 1, elapsed=elapsed)
        for spec in specs
        for item in spec.items()
    ]
    await ws.send_str(P.encode(P.Results(outcomes)))
    return await _next(ws, "ack")


async def _warm(ws, rounds: int = 4) -> int:  # noqa: ANN001
    """Lease and answer (single tasks at first) until the job's run times are known and this volunteer
    has delivered a few results: its next lease is a chunk. Returns the tasks done."""
    done = 0
    for _ in range(rounds):
        specs = await _lease(ws, 1)
        assert specs
        done += len((await _report(ws, specs))["attempts"])
    return done


async def _done_attempts(app, job: int, outcomes: tuple[str, ...] = ("done",)) -> list[tuple[int, str]]:  # noqa: ANN001
    async with app[K.storage].engine.connect() as conn:
        rows = await conn.execute(
            sa.select(attempts.c.task_id, attempts.c.volunteer).where(
                attempts.c.job_id == job, attempts.c.outcome.in_(outcomes)
            )
        )
        return [(r.task_id, r.volunteer) for r in rows]


async def test_tiny_tasks_go_out_in_chunks_that_grow_toward_the_target(serve, volunteers):
    """2 ms tasks, a target of 0.05 s: chunks start at one task and grow to about 25; every result
    is right and recorded once."""
    api, app = await serve(chunk_target=0.05)
    n = 1500
    job = await api.submit(TWO_MS, list(range(n)), timeout=30)
    sims = volunteers(api.url, 2, prefetch=2)
    final = await api.wait(job, timeout=120)
    assert final["state"] == "done" and final["counts"]["done"] == n
    rows = json.loads(await api.results(job))
    assert [r["result"] for r in rows] == [3 * x for x in range(n)]
    done = await _done_attempts(app, job)
    assert len(done) == n and len({task for task, _ in done}) == n  # one result recorded per task
    sizes = [size for sim in sims for size in sim.sizes]
    assert sizes[0] == 1 and all(sim.sizes[0] == 1 for sim in sims if sim.sizes)  # unmeasured: one at a time
    assert sum(sim.chunks for sim in sims) > 0
    assert 8 <= max(sizes) <= 60, sizes  # about 0.05 s / 2 ms = 25 (the sleep takes a little longer)
    assert len(sizes) < n / 4, len(sizes)  # far fewer hand-outs than tasks


async def test_a_chunk_tasks_error_fails_that_task_only(serve, volunteers):
    code = "def main(x):\n    if x == 37:\n        raise ValueError('bad input 37')\n    return x + 1\n"
    api, _ = await serve(chunk_target=1.0)
    job = await api.submit(code, list(range(300)), timeout=30, max_attempts=2)
    sims = volunteers(api.url, 2, prefetch=2)  # two volunteers: errors need corroboration
    final = await api.wait(job, timeout=120)
    assert final["state"] == "failed" and final["counts"]["done"] == 299 and final["counts"]["failed"] == 1
    rows = json.loads(await api.results(job))
    assert rows[37]["state"] == "failed" and "bad input 37" in rows[37]["error"]
    assert all(r["result"] == r["index"] + 1 for r in rows if r["index"] != 37)
    assert sum(sim.chunks for sim in sims) > 0


async def test_replication_2_in_chunks_goes_to_distinct_volunteers_and_the_quorum_decides(serve, volunteers):
    api, app = await serve(chunk_target=1.0)
    n = 400
    job = await api.submit(TINY, list(range(n)), timeout=30, replication=2, max_replicas=5)
    honest = volunteers(api.url, 3, prefetch=2)
    liar = volunteers(api.url, 1, prefetch=2, lie_rate=1.0, seed=7)
    final = await api.wait(job, timeout=180)
    assert final["state"] == "done"
    rows = json.loads(await api.results(job))
    assert [r["result"] for r in rows] == [x * x + 1 for x in range(n)]  # the liar never decided a task
    per_task: dict[int, list[str]] = {}
    for task, volunteer in await _done_attempts(app, job, ("done", "error", "late")):
        per_task.setdefault(task, []).append(volunteer)
    assert all(len(v) == len(set(v)) for v in per_task.values())  # never handed twice to one volunteer
    assert sum(sim.chunks for sim in honest + liar) > 0
    assert liar[0].lies  # it did lie, in chunks too


async def test_a_closed_socket_requeues_its_whole_chunk(serve):
    api, _ = await serve(chunk_target=1.0)
    job = await api.submit(TINY, list(range(200)), timeout=30)
    async with api.session.ws_connect(_url(api)) as ws:
        await _hello(ws)
        warm = await _warm(ws)
        (chunk,) = await _lease(ws, 1)
        held = 1 + len(chunk.more)
        assert held > 1 and len({item.task for item in chunk.items()}) == held
        indices = [item.index for item in chunk.items()]
        assert indices == list(range(indices[0], indices[0] + held))  # consecutive tasks of the job
        status = await api.job(job)
        assert status["counts"]["running"] + status["counts"]["leased"] == held
    for _ in range(50):  # closed: the whole chunk is ready again at once
        status = await api.job(job)
        if status["counts"]["running"] + status["counts"]["leased"] == 0:
            break
        await asyncio.sleep(0.1)
    assert status["counts"]["queued"] == 200 - warm, status["counts"]
    async with api.session.ws_connect(_url(api)) as ws:  # another volunteer finishes all of it
        await _hello(ws, workers=4, prefetch=4)
        while (await api.job(job))["state"] != "done":
            specs = await _lease(ws, 8)
            if specs:
                await _report(ws, specs)
    rows = json.loads(await api.results(job))
    assert [r["result"] for r in rows] == [x * x + 1 for x in range(200)]


async def _chunk_of(ws) -> list[P.ChunkItem]:  # noqa: ANN001
    """The tasks of the chunk the next ``ready {1}`` gets (the volunteer is warm: it is a chunk)."""
    (chunk,) = await _lease(ws, 1)
    items = chunk.items()
    assert len(items) > 1
    return items


async def _expect_given_back(ws, api, app, job: int, outcomes: list[P.Outcome], queued: int) -> None:  # noqa: ANN001
    """Report a chunk's ``outcomes``: none is acknowledged or charged, all are back in the queue
    (``queued`` open tasks), their attempts recorded as abandoned."""
    await ws.send_str(P.encode(P.Results(outcomes)))
    ack = await _next(ws, "ack")
    assert ack["attempts"] == [] and sorted(ack["ignored"]) == sorted(o.attempt for o in outcomes)
    status = await api.job(job)
    assert status["counts"]["failed"] == 0 and status["counts"]["queued"] == queued, status["counts"]
    rows = await _done_attempts(app, job, ("abandoned",))
    assert sorted(task for task, _ in rows) == sorted(o.task for o in outcomes)


async def test_a_chunk_stopped_as_a_whole_charges_none_of_its_tasks(serve, backend):
    """The page stops a chunk's worker once the whole chunk could have timed out; every task then
    reports that timeout. None is charged an attempt (most ran fine): even with max_attempts=1 they
    go back to the queue and are done later. A task that timed out alone in a chunk is charged."""
    api, app = await serve(chunk_target=1.0)
    job = await api.submit(TINY, list(range(60)), timeout=30, max_attempts=1)
    async with api.session.ws_connect(_url(api)) as ws:
        await _hello(ws)
        warm = await _warm(ws)
        items = await _chunk_of(ws)
        error = f"timed out after {30 * len(items)} s: the worker running its chunk of {len(items)} tasks was stopped"
        stopped = [P.Outcome(i.attempt, i.task, error=error, timeout=True, elapsed=30) for i in items]
        await _expect_given_back(ws, api, app, job, stopped, queued=60 - warm)
        # back to single tasks (a timeout was measured); warm again, then a chunk where one task timed
        # out in the runner and the others returned: that one alone is charged (and fails: 1 attempt)
        await _warm(ws, rounds=4)
        items = await _chunk_of(ws)
        mixed = [P.Outcome(items[0].attempt, items[0].task, error="timed out after 30 s", timeout=True, elapsed=30)]
        mixed += [P.Outcome(i.attempt, i.task, result=i.input * i.input + 1, elapsed=0.001) for i in items[1:]]
        await ws.send_str(P.encode(P.Results(mixed)))
        ack = await _next(ws, "ack")
        assert sorted(ack["attempts"]) == sorted(i.attempt for i in items)
        assert (await api.job(job))["counts"]["failed"] == 1
        while (await api.job(job))["state"] not in ("done", "failed"):  # the rest, answered honestly
            specs = await _lease(ws, 1)
            if specs:
                await _report(ws, specs)
    rows = json.loads(await api.results(job))
    assert [r["index"] for r in rows if r["state"] == "failed"] == [items[0].index]
    assert [r["result"] for r in rows if r["state"] == "done"] == [x * x + 1 for x in range(60) if x != items[0].index]


async def test_a_chunk_whose_worker_crashed_charges_none_of_its_tasks(serve, backend):
    """The page's worker crashed while it ran a chunk: no task's own outcome is known, and the page
    reports each as ``lost``. None is charged (even with max_attempts=1 they are done later), the
    job goes back to single tasks, and there a task that crashes its worker alone is charged. A
    chunk whose every task raised on its own (not lost) is charged task by task."""
    api, app = await serve(chunk_target=1.0)
    job = await api.submit(TINY, list(range(80)), timeout=30, max_attempts=1)
    async with api.session.ws_connect(_url(api)) as ws:
        await _hello(ws)
        warm = await _warm(ws)
        items = await _chunk_of(ws)
        crashed = "worker error: Exit: Program terminated with exit(1)"
        lost = [P.Outcome(i.attempt, i.task, error=crashed, elapsed=0.0, lost=True) for i in items]
        assert all('"lost":true' in P.encode(P.Results([o])) for o in lost)
        await _expect_given_back(ws, api, app, job, lost, queued=80 - warm)
        (single,) = await _lease(ws, 1)  # back to single tasks: the one that crashes is found alone
        assert not single.more
        alone = P.Outcome(single.attempt, single.task, error=crashed, lost=True)  # lost, but no chunk
        await ws.send_str(P.encode(P.Results([alone])))
        assert (await _next(ws, "ack"))["attempts"] == [single.attempt]  # charged: it fails (1 attempt)
        assert (await api.job(job))["counts"]["failed"] == 1
        # warm again; a chunk whose every task raised on its own: each is charged, and fails
        await _warm(ws, rounds=4)
        raised = await _chunk_of(ws)
        own = [P.Outcome(i.attempt, i.task, error="ValueError: bad input", elapsed=0.001) for i in raised]
        await ws.send_str(P.encode(P.Results(own)))
        assert sorted((await _next(ws, "ack"))["attempts"]) == sorted(i.attempt for i in raised)
        assert (await api.job(job))["counts"]["failed"] == 1 + len(raised)
        while (await api.job(job))["state"] not in ("done", "failed"):  # the rest, answered honestly
            specs = await _lease(ws, 1)
            if specs:
                await _report(ws, specs)
    rows = json.loads(await api.results(job))
    failed = sorted(r["index"] for r in rows if r["state"] == "failed")
    assert failed == sorted([single.index] + [i.index for i in raised])
    assert all(r["result"] == r["index"] ** 2 + 1 for r in rows if r["state"] == "done")
    others = {i.index for i in items} - {single.index}  # the crashed chunk's tasks, but the one charged alone
    assert others and others.isdisjoint(failed)  # done later, by honest answers


async def test_caps_bound_a_hoarder_asking_for_chunks(serve):
    """A chunk is one slot of the lease cap; its size is bounded by MAX_CHUNK_TASKS and by the
    results the connection delivered; more asks get nothing while the slot is taken."""
    api, _ = await serve(chunk_target=1.0)
    job = await api.submit(TINY, list(range(3000)), timeout=30)
    async with api.session.ws_connect(_url(api)) as ws:
        await _hello(ws, workers=1, prefetch=0)  # a cap of one slot
        warm = await _warm(ws)
        specs = await _lease(ws, P.MAX_TASKS_PER_MESSAGE)
        assert len(specs) == 1 and 1 < 1 + len(specs[0].more) <= 1 + warm  # one chunk, at most 1 + delivered
        assert await _lease(ws, P.MAX_TASKS_PER_MESSAGE) == []  # the slot is taken: held, nothing more
        # a heartbeat naming the chunk's first attempt keeps every task of it
        await ws.send_str(P.encode(P.Heartbeat([specs[0].attempt])))
        await _report(ws, specs)
        for _ in range(8):  # chunks grow with what it delivers, never past the hard bound
            specs = await _lease(ws, P.MAX_TASKS_PER_MESSAGE)
            assert len(specs) == 1 and 1 + len(specs[0].more) <= P.MAX_CHUNK_TASKS
            await _report(ws, specs)
        assert 1 + len(specs[0].more) == P.MAX_CHUNK_TASKS
        async with api.session.ws_connect(_url(api)) as fresh:  # a newcomer starts with single tasks
            await _hello(fresh, workers=1, prefetch=0)
            (one,) = await _lease(fresh, P.MAX_TASKS_PER_MESSAGE)
            assert one.more == []
    assert (await api.job(job))["counts"]["done"] > P.MAX_CHUNK_TASKS


async def test_a_protocol_4_page_never_gets_chunks(serve):
    api, _ = await serve(chunk_target=1.0)
    job = await api.submit(TINY, list(range(60)), timeout=30)
    async with api.session.ws_connect(_url(api)) as ws:
        await _hello(ws, protocol=4, workers=4, prefetch=4)
        while (await api.job(job))["state"] != "done":
            await ws.send_str(P.encode(P.Ready(8)))
            msg = await _next(ws, "tasks", "wait")
            assert all("more" not in t for t in msg.get("tasks", []))  # the wire a version-4 page reads
            specs = P.from_dict(msg).tasks if msg["type"] == "tasks" else []
            if specs:
                await _report(ws, specs)


async def test_a_chunks_results_twice_and_results_for_unknown_attempts_are_ignored(serve):
    api, _ = await serve(chunk_target=1.0)
    job = await api.submit(TINY, list(range(100)), timeout=30)
    async with api.session.ws_connect(_url(api)) as ws:
        await _hello(ws)
        warm = await _warm(ws)
        specs = await _lease(ws, 1)
        first = await _report(ws, specs)
        assert len(first["attempts"]) == len(specs[0].attempts())
        again = await _report(ws, specs)  # duplicate: acknowledged as ignored, recorded once
        assert again["attempts"] == [] and sorted(again["ignored"]) == sorted(specs[0].attempts())
        forged = P.Outcome("0123456789abcdef", specs[0].task, result=1)  # an attempt it never held
        await ws.send_str(P.encode(P.Results([forged])))
        assert (await _next(ws, "ack"))["ignored"] == ["0123456789abcdef"]
    assert (await api.job(job))["counts"]["done"] == warm + len(specs[0].attempts())


@pytest.mark.parametrize(
    ("more", "needle"),
    [
        ("3", "field 'more' must be a list"),
        ('[["a", 1, 2, 3]]', "each entry is [attempt, task, index, input, restore]"),
        ('[["a", 1, 2, 3, null, 9]]', "each entry is [attempt, task, index, input, restore]"),
        ("[[1, 1, 2, 3, null]]", "field 'attempt' must be a string"),
        ('[["a", "1", 2, 3, null]]', "field 'task' must be an integer"),
        ('[["a", 1, true, 3, null]]', "field 'index' must be an integer, not a boolean"),
        ('[["a", 1, 2, 3, 5]]', "field 'restore' must be a string or null"),
        ('[{"attempt": "a", "task": 1, "index": 2, "evil": 1}]', "unknown field(s) evil"),
        ('["a"]', "each list entry must be a JSON object"),
        (json.dumps([["a", i, i, i, None] for i in range(P.MAX_CHUNK_TASKS)]), "at most 500 tasks in a chunk"),
    ],
)
def test_bad_chunks_are_refused_by_the_volunteers_decoder(more: str, needle: str) -> None:
    spec = '{"attempt": "x", "task": 1, "job": 1, "index": 0, "code_hash": "h", "timeout": 1, "deadline": 2'
    with pytest.raises(P.ProtocolError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        P.decode(f'{{"type": "tasks", "tasks": [{spec}, "more": {more}}}]}}')


async def test_results_beyond_the_per_message_cap_are_refused(serve):
    api, _ = await serve()
    async with api.session.ws_connect(_url(api)) as ws:
        await _hello(ws)
        too_many = [P.Outcome(f"{i:016x}", i, result=i) for i in range(P.MAX_RESULTS_PER_MESSAGE + 1)]
        await ws.send_str(P.encode(P.Results(too_many)))
        reply = await _next(ws, "error")
        assert f"at most {P.MAX_RESULTS_PER_MESSAGE} per message" in reply["message"]
        await ws.send_str(P.encode(P.Heartbeat(["not-a-chunk", "0" * 40])))  # unknown ids: nothing extended
        await ws.send_str(P.encode(P.Ready(0)))
        assert (await _next(ws, "tasks"))["tasks"] == []  # the socket stays usable


def test_split_results_keeps_messages_under_their_caps() -> None:
    small = [P.Outcome(f"{i:016x}", i, result=i) for i in range(1200)]
    groups = P.split_results(small)
    assert [len(g) for g in groups] == [500, 500, 200]
    big = [P.Outcome(f"{i:016x}", i, output="x" * 600_000) for i in range(8)]
    groups = P.split_results(big)
    assert all(len(P.encode(P.Results(g))) < P.MAX_MESSAGE_BYTES for g in groups) and sum(map(len, groups)) == 8

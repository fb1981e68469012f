"""Long tasks (issue 10): the ``uvm`` module, checkpoints that survive a lost volunteer, progress
and partial results seen by the researcher, and bad input refused without stopping the task."""

from __future__ import annotations

import asyncio
import json

import pytest
import sqlalchemy as sa

from server import protocol as P
from server.store.tables import checkpoints, partials
from server.web import appkeys as K
from workers.runner import MAX_CHECKPOINT_BYTES, Runner, TaskContext, handle

# 24 steps, a checkpoint at each; the result says at which step each attempt started.
STEPS = """
import time
import uvm

def main(x):
    state = uvm.restore() or {"step": 0, "total": 0, "starts": []}
    state["starts"].append(state["step"])
    for step in range(state["step"], 24):
        state["total"] += step * x
        state["step"] = step + 1
        uvm.checkpoint(state)  # before progress: an update then carries this step's state
        uvm.progress(state["step"] / 24)
        if state["step"] % 6 == 0:
            uvm.partial({"step": state["step"], "total": state["total"]})
        time.sleep(0.05)
    return {"total": state["total"], "starts": state["starts"]}
"""


def _run(source: str, value: object = None, context: TaskContext | None = None) -> dict:
    runner = Runner()
    runner.load("h", source, job=1)
    return runner.run("h", value, 1, context)


# ----------------------------------------------------------------------------- the uvm module
def test_uvm_calls_become_throttled_updates_latest_wins() -> None:
    sent: list[dict] = []
    code = (
        "import uvm\n"
        "def main(x):\n"
        "    for i in range(5):\n"
        "        uvm.progress((i + 1) / 5)\n"
        "        uvm.checkpoint({'i': i})\n"
        "        uvm.partial(i)\n"
        "    return uvm.restore()\n"
    )
    out = _run(code, None, TaskContext(None, lambda text: sent.append(json.loads(text)), every=3600.0))
    assert out["error"] is None and out["result"] == {"i": 4}  # restore() sees this attempt's latest
    # The first call goes out at once; the rest wait for the throttle, and the task's end sends
    # only the partials still waiting (its state no longer matters).
    assert sent[0] == {"state": None, "progress": 0.2, "partials": []}
    assert sent[-1] == {"state": None, "progress": None, "partials": [0, 1, 2, 3, 4]}
    assert len(sent) == 2

    sent.clear()
    _run(code, None, TaskContext(None, lambda text: sent.append(json.loads(text)), every=0.0))
    states = [json.loads(u["state"]) for u in sent if u["state"] is not None]
    assert states == [{"i": i} for i in range(5)]  # unthrottled: every checkpoint goes out


def test_restore_gives_the_saved_state_and_uvm_is_the_tasks_own() -> None:
    code = "import uvm\ndef main(x):\n    return uvm.restore()\n"
    assert _run(code, None, TaskContext('{"step": 7}'))["result"] == {"step": 7}
    assert _run(code)["result"] is None
    answer = json.loads(handle(json.dumps({"code_hash": "r", "source": code, "restore": '{"step": 3}'})))
    assert answer["result"] == {"step": 3}
    # The module exists only while a task runs: nothing of one task is left for the next.
    import sys

    assert "uvm" not in sys.modules


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        ("uvm.checkpoint('x' * (MAX + 1))", f"the limit is {MAX_CHECKPOINT_BYTES}"),
        ("uvm.checkpoint({1, 2})", "uvm.checkpoint: the value is not JSON-serialisable"),
        ("uvm.checkpoint(float('nan'))", "uvm.checkpoint: the value is not JSON-serialisable"),
        ("uvm.progress(1.5)", "uvm.progress: the fraction must be a number in [0, 1]"),
        ("uvm.progress(-0.1)", "uvm.progress: the fraction must be a number in [0, 1]"),
        ("uvm.progress('half')", "uvm.progress: the fraction must be a number in [0, 1]"),
        ("uvm.partial(object())", "uvm.partial: the value is not JSON-serialisable"),
    ],
)
def test_bad_uvm_calls_say_why_and_do_not_stop_the_task(call: str, needle: str) -> None:
    sent: list[str] = []
    code = f"import uvm\nMAX = uvm.MAX_CHECKPOINT_BYTES\ndef main(x):\n    ok = {call}\n    return ['went on', ok]\n"
    out = _run(code, None, TaskContext(None, sent.append, every=0.0))
    assert out["error"] is None and out["result"] == ["went on", False]
    assert needle in out["output"]
    assert sent == []  # nothing refused leaves the worker


# ------------------------------------------------------------------ resume after a lost volunteer
async def _wait(predicate, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.05)


async def test_killed_volunteer_resumes_elsewhere_from_last_checkpoint(serve, volunteers) -> None:
    api, app = await serve(checkpoint_every=0.1)
    job_id = await api.submit(STEPS, [2], timeout=600)
    crasher = volunteers(api.url, 1, prefetch=1, crash_after_checkpoints=5)[0]

    async def crashed() -> bool:
        return crasher.crashed

    await _wait(crashed)
    # Live feedback before the task finishes: its progress in the job view, its partials in the export.
    status = await api.job(job_id)
    assert status["state"] == "running"
    # The checkpoint the server kept is the crasher's last; the next attempt starts there.
    async with app[K.storage].engine.connect() as conn:
        saved = (await conn.execute(sa.select(checkpoints.c.progress))).scalars().all()
    assert len(saved) == 1 and 0 < saved[0] < 1
    before = json.loads(await api.results(job_id, "json"))[0]
    assert before["state"] == "open" and before["result"] is None
    last = json.loads(crasher.last_state)
    sent = [{"step": s, "total": 2 * sum(range(s))} for s in range(6, last["step"] + 1, 6)]
    assert before["partials"] and before["partials"] == sent[: len(before["partials"])]

    other = volunteers(api.url, 1, prefetch=1)[0]
    job = await api.wait(job_id, timeout=120)
    assert job["state"] == "done"
    row = json.loads(await api.results(job_id, "json"))[0]
    assert row["result"] == {"total": 2 * sum(range(24)), "starts": [0, last["step"]]}
    assert 0 < last["step"] < 24
    assert other.volunteer != crasher.volunteer and other.done == 1
    # Partials of both attempts, in order; none twice (the second attempt began after step 6k).
    steps = [p["step"] for p in row["partials"]]
    assert steps == sorted(set(steps)) and steps[-1] == 24
    nd = json.loads((await api.results(job_id, "ndjson")).splitlines()[0])
    assert nd["partials"] == row["partials"]
    async with app[K.storage].engine.connect() as conn:
        blobs = (await conn.execute(sa.select(checkpoints.c.state_ct))).scalars().all()
        values = (await conn.execute(sa.select(partials.c.value_ct))).scalars().all()
    assert blobs and all(b"step" not in b for b in blobs + values)  # encrypted at rest


async def test_job_view_shows_a_running_tasks_progress(serve, volunteers) -> None:
    api, _ = await serve(checkpoint_every=0.1)
    job_id = await api.submit(STEPS.replace("0.05", "0.2"), [1], timeout=600)
    volunteers(api.url, 1, prefetch=1)

    async def reported() -> bool:
        return bool((await api.job(job_id))["progress"])

    await _wait(reported)
    [entry] = (await api.job(job_id))["progress"]
    assert entry["index"] == 0 and 0 < entry["progress"] < 1
    assert (await api.wait(job_id, timeout=120))["progress"] == []  # finished: nothing running


async def test_replicas_do_not_share_checkpoints(serve, volunteers) -> None:
    """Under replication a checkpoint belongs to the volunteer that wrote it: a replica resumes only
    from its own, so the two results that agree were computed independently from step 0."""
    api, app = await serve(checkpoint_every=0.1)
    job_id = await api.submit(STEPS, [3], timeout=600, replication=2)
    crasher = volunteers(api.url, 1, prefetch=1, crash_after_checkpoints=3)[0]

    async def crashed() -> bool:
        return crasher.crashed

    await _wait(crashed)
    volunteers(api.url, 2, prefetch=1)
    job = await api.wait(job_id, timeout=120)
    assert job["state"] == "done"
    row = json.loads(await api.results(job_id, "json"))[0]
    assert row["result"] == {"total": 3 * sum(range(24)), "starts": [0]}
    async with app[K.storage].engine.connect() as conn:
        owners = (await conn.execute(sa.select(checkpoints.c.owner))).scalars().all()
    assert crasher.volunteer in owners and "" not in owners


# ------------------------------------------------------------------------------- bad updates
@pytest.mark.parametrize("backend", ["sqlite"])
async def test_bad_updates_get_clear_errors(serve) -> None:
    api, _ = await serve(checkpoint_every=5.0)
    await api.submit("def main(x):\n    return x\n", [1])
    async with api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        await ws.send_str(P.encode(P.Hello("", {"cores": 1, "workers": 1})))
        welcome = json.loads((await ws.receive()).data)
        assert welcome["every"] == 5.0
        await ws.send_str(P.encode(P.Ready(1)))
        [spec] = json.loads((await ws.receive(timeout=10)).data)["tasks"]
        assert spec["restore"] is None
        attempt = spec["attempt"]

        async def ask(message: dict) -> dict:
            await ws.send_str(json.dumps({"type": "update", **message}))
            return json.loads((await ws.receive(timeout=10)).data)

        cases = [
            ({"attempt": "f" * 16, "progress": 0.5}, "you hold no attempt"),
            ({"attempt": "x" * 33}, "at most 32 characters"),
            ({"attempt": attempt, "progress": 1.5}, "progress must be a number in [0, 1]"),
            ({"attempt": attempt, "progress": -1}, "progress must be a number in [0, 1]"),
            ({"attempt": attempt, "progress": True}, "not a boolean"),
            ({"attempt": attempt, "state": "x" * (P.MAX_CHECKPOINT_BYTES + 1)}, "checkpoint is over"),
            ({"attempt": attempt, "state": "{not json"}, "must be JSON text"),
            ({"attempt": attempt, "state": "NaN"}, "must be JSON text"),
            ({"attempt": attempt, "state": {"step": 1}}, "field 'state' must be a string"),
            ({"attempt": attempt, "partials": [0] * (P.MAX_PARTIALS_PER_UPDATE + 1)}, "at most 64 partials"),
            ({"attempt": attempt, "partials": ["x" * P.MAX_PARTIAL_BYTES]}, "partial result is over"),
            ({"attempt": attempt, "partials": "all"}, "field 'partials' must be a list"),
            ({"attempt": attempt, "colour": 1}, "unknown field(s) colour"),
        ]
        for message, needle in cases:
            reply = await ask(message)
            assert reply["type"] == "error" and needle in reply["message"], (message, reply)
        await ws.send_str(P.encode(P.Update(attempt, '{"step": 1}', 0.5, [1])))  # accepted: no answer
        reply = await ask({"attempt": attempt, "state": '{"step": 2}'})
        assert "at most one every 5 s per task" in reply["message"]  # a duplicate too soon
        # The connection is still good: its result is taken.
        await ws.send_str(P.encode(P.Results([P.Outcome(attempt, spec["task"], result=1)])))
        assert json.loads((await ws.receive(timeout=10)).data)["type"] == "ack"


def _simulate(steps):
    import time

    import uvm

    for step in range(steps):
        uvm.progress((step + 1) / steps)
        uvm.partial(step)
        time.sleep(0.2)
    return steps


@pytest.mark.filterwarnings("ignore::uvm_compute.client.NoVolunteersWarning")  # a loaded machine: slow to start
async def test_client_exposes_progress_and_partials(serve, volunteers) -> None:
    from uvm_compute import Client

    api, _ = await serve(checkpoint_every=0.1)
    client = Client(api.url, api.token)
    job = await asyncio.to_thread(client.map, _simulate, [20], timeout=600)
    volunteers(api.url, 1, prefetch=1)

    async def reported() -> bool:
        return bool(await asyncio.to_thread(job.progress))

    await _wait(reported)
    progress = await asyncio.to_thread(job.progress)
    assert list(progress) == [0] and 0 < progress[0] < 1
    assert (await asyncio.to_thread(job.results, progress=False)) == [20]
    assert await asyncio.to_thread(job.partials) == {0: list(range(20))}
    assert await asyncio.to_thread(job.progress) == {}


def test_readme_monte_carlo_example_resumes_where_it_stopped() -> None:
    """The README's worked example, shortened: stopped part way, then resumed from its checkpoint,
    it gives the same estimate as a run that was never stopped."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Long tasks", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("DRAWS = 10_000_000", "DRAWS = 2_000").replace("EVERY = 100_000", "EVERY = 100")
    whole = _run(code, 7, TaskContext(None, None))["result"]
    states: list[str] = []

    def stop_after_five(text: str) -> None:
        update = json.loads(text)
        if update["state"] is not None:
            states.append(update["state"])
            if len(states) == 5:
                raise KeyboardInterrupt  # the tab closes

    stopped = _run(code, 7, TaskContext(None, stop_after_five, every=0.0))
    assert "KeyboardInterrupt" in stopped["error"]
    resumed = _run(code, 7, TaskContext(states[-1], None))["result"]
    assert resumed["pi"] == whole["pi"] and 3.0 < whole["pi"] < 3.3
    assert whole["starts"] == [0] and resumed["starts"] == [0, 500]


async def test_events_socket_carries_progress_and_partials(serve, volunteers) -> None:
    api, _ = await serve(checkpoint_every=0.1)
    job_id = await api.submit(STEPS, [1], timeout=600)
    async with api.session.ws_connect(f"{api.url}/api/events?job={job_id}", headers=api.headers()) as ws:
        volunteers(api.url, 1, prefetch=1)
        partial_events, progress_seen = [], []
        while not partial_events:
            event = await ws.receive_json(timeout=60)
            if event["type"] == "partials":
                partial_events.append(event)
            elif event.get("progress"):
                progress_seen.append(event["progress"][0]["progress"])
        assert partial_events[0]["job"] == job_id
        assert partial_events[0]["partials"]["0"][0] == {"step": 6, "total": sum(range(6))}
        assert progress_seen and all(0 < p <= 1 for p in progress_seen)
    assert (await api.wait(job_id, timeout=120))["state"] == "done"


def test_runner_caps_are_the_protocols() -> None:
    import workers.runner as R

    assert R.MAX_CHECKPOINT_BYTES == P.MAX_CHECKPOINT_BYTES
    assert R.MAX_PARTIAL_BYTES == P.MAX_PARTIAL_BYTES
    assert R.MAX_PARTIALS_PER_TASK == P.MAX_PARTIALS_PER_TASK
    assert P.Welcome.every == R.CHECKPOINT_EVERY

"""Volunteers see what they help and get credit (issue 11): job name and description in ``code``,
validated results and their CPU time, opt-in nicknames and the public leaderboard."""

from __future__ import annotations

import json

import pytest

from server import protocol as P
from server.store.credit import InvalidNickname, clean_nickname

CODE = "def main(x):\n    return x * 2\n"


async def _volunteer(api, ws) -> str:
    await ws.send_str(P.encode(P.Hello("", {"cores": 2, "workers": 2})))
    return json.loads((await ws.receive(timeout=10)).data)["volunteer"]


async def _lease(ws, n: int) -> list[dict]:
    """Lease n tasks, asking again while the queue has fewer ready (tasks are pushed as they become
    ready: a job's first, or a task's next replica after the previous result's commit)."""
    tasks: list[dict] = []
    for _ in range(200):
        await ws.send_str(P.encode(P.Ready(n - len(tasks), [])))
        tasks += json.loads((await ws.receive(timeout=10)).data)["tasks"]
        if len(tasks) == n:
            break
    return tasks


async def _compute(ws, n: int, elapsed: float = 1.5, lie: bool = False) -> int:
    """Lease n tasks and answer them (correctly, unless ``lie``), claiming ``elapsed`` seconds each;
    returns how many."""
    tasks = await _lease(ws, n)
    outcomes = [P.Outcome(t["attempt"], t["task"], result=t["input"] * 2 + lie, elapsed=elapsed) for t in tasks]
    if outcomes:
        await ws.send_str(P.encode(P.Results(outcomes)))
        assert json.loads((await ws.receive(timeout=10)).data)["type"] == "ack"
    return len(tasks)


async def _put(api, volunteer: str, body: object, raw: bytes | None = None) -> tuple[int, dict]:
    url = f"{api.url}/api/volunteers/{volunteer}/nickname"
    async with api.session.put(url, data=raw if raw is not None else json.dumps(body)) as resp:
        return resp.status, await resp.json()


async def _board(api) -> list[dict]:
    async with api.session.get(f"{api.url}/api/leaderboard") as resp:  # public: no credentials
        assert resp.status == 200
        return (await resp.json())["volunteers"]


async def test_code_message_names_and_describes_the_job(serve):
    api, _ = await serve()
    job = await api.submit(CODE, [1], name="doubling", description="Twice <b>everything</b>", replication=1)
    async with api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        await _volunteer(api, ws)
        (task,) = await _lease(ws, 1)
        await ws.send_str(P.encode(P.NeedCode(job, task["code_hash"])))
        code = P.decode((await ws.receive(timeout=10)).data)
    assert (code.name, code.description) == ("doubling", "Twice <b>everything</b>")
    long = P.from_dict({"type": "code", "job": 1, "code_hash": "h", "source": "", "description": "d" * 9000})
    assert len(long.description) == P.MAX_DESCRIPTION_CHARS
    with pytest.raises(P.ProtocolError, match="'name' must be a string"):
        P.from_dict({"type": "code", "job": 1, "code_hash": "h", "source": "", "name": 5})


async def test_validated_credit_nickname_and_leaderboard(serve):
    api, _ = await serve()
    job = await api.submit(CODE, list(range(4)), replication=2, quorum=2)
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    async with api.session.ws_connect(url) as a, api.session.ws_connect(url) as b:
        me, other = await _volunteer(api, a), await _volunteer(api, b)
        assert await _compute(a, 4) == 4
        assert await _board(api) == []  # nobody named, and nothing validated yet
        assert await _compute(b, 4) == 4  # the second replicas: both volunteers' results validated
        await api.wait(job)
    async with api.session.get(f"{api.url}/api/volunteers/{me}") as resp:
        mine = await resp.json()
    assert (mine["validated"], mine["validated_seconds"], mine["nickname"]) == (4, 6.0, None)
    assert await _board(api) == []  # no nickname: not listed
    assert await _put(api, me, {"nickname": "  Ada <script>  "}) == (
        400,
        {"error": "'nickname' may hold letters, digits, spaces, '.', '-' and '_' only", "field": "nickname"},
    )
    assert await _put(api, me, {"nickname": " Ada L. "}) == (200, {"nickname": "Ada L.", "listed": True})
    (row,) = await _board(api)
    assert row == {"rank": 1, "nickname": "Ada L.", "validated_seconds": 6.0, "validated": 4}
    status, body = await _put(api, other, {"nickname": "Ada L."})  # duplicate
    assert status == 409 and "taken" in body["error"]
    assert (await _put(api, other, {"nickname": "Grace"}))[0] == 200
    assert [r["nickname"] for r in await _board(api)] == ["Ada L.", "Grace"]  # equal CPU: by name
    assert await _put(api, me, {"nickname": None}) == (200, {"nickname": None, "listed": False})
    assert [r["nickname"] for r in await _board(api)] == ["Grace"]


async def test_credit_rewards_no_liar_and_no_inflated_claim(serve):
    """A liar's results are out-voted: no credit, not on the leaderboard even with a nickname.
    The quorum's members are credited the least CPU time any of them claimed, so claiming more
    than the work took gains nothing; a result waiting for its replica earns nothing yet."""
    api, _ = await serve()
    job = await api.submit(CODE, list(range(3)), replication=2, timeout=60)
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    async with (
        api.session.ws_connect(url) as liar_ws,
        api.session.ws_connect(url) as boaster_ws,
        api.session.ws_connect(url) as honest_ws,
    ):
        liar, boaster, honest = [await _volunteer(api, ws) for ws in (liar_ws, boaster_ws, honest_ws)]
        assert await _compute(liar_ws, 3, elapsed=1e6, lie=True) == 3  # claims far past the timeout
        assert await _compute(boaster_ws, 3, elapsed=50.0) == 3  # right, but claims 50 s a task
        for who in (liar, boaster):  # 1 against 1: nothing decided, nothing credited
            async with api.session.get(f"{api.url}/api/volunteers/{who}") as resp:
                body = await resp.json()
            assert (body["validated"], body["validated_seconds"]) == (0, 0.0)
        assert await _compute(honest_ws, 3, elapsed=0.5) == 3  # the third replica decides: 2 against 1
        status = await api.wait(job)
    assert status["state"] == "done" and status["counts"]["done"] == 3
    credit = {}
    for name, who in (("liar", liar), ("boaster", boaster), ("honest", honest)):
        async with api.session.get(f"{api.url}/api/volunteers/{who}") as resp:
            body = await resp.json()
        credit[name] = (body["validated"], body["validated_seconds"], body["tasks_done"])
    # tasks_done is the work each reported; credit only what was validated, at the least claim
    assert credit == {"liar": (0, 0.0, 3), "boaster": (3, 1.5, 3), "honest": (3, 1.5, 3)}
    for who, nickname in ((liar, "Mallory"), (boaster, "Bob"), (honest, "Alice")):
        assert (await _put(api, who, {"nickname": nickname}))[0] == 200
    assert [(r["nickname"], r["validated_seconds"]) for r in await _board(api)] == [("Alice", 1.5), ("Bob", 1.5)]


async def test_nickname_bad_input(serve):
    api, _ = await serve()
    async with api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        me = await _volunteer(api, ws)
    public = me.split("-")[0]
    assert (await _put(api, public, {"nickname": "x"}))[0] == 404  # the public id is not a credential
    assert (await _put(api, me[:-1] + ("x" if me[-1] != "x" else "y"), {"nickname": "x"}))[0] == 404  # forged
    assert (await _put(api, "nobody", {"nickname": "x"}))[0] == 404
    assert (await _put(api, me, None, raw=b"{not json"))[0] == 400  # malformed
    assert (await _put(api, me, ["x"]))[0] == 400  # wrong shape
    assert (await _put(api, me, {"nickname": "x", "admin": True}))[0] == 400  # unknown field
    status, body = await _put(api, me, {"nickname": 5})  # wrong type
    assert status == 400 and "string or null" in body["error"]
    status, body = await _put(api, me, {"nickname": "n" * 33})  # too long
    assert status == 400 and "at most 32" in body["error"]
    assert (await _put(api, me, None, raw=json.dumps({"nickname": "n" * 2000}).encode()))[0] == 413  # oversized


def test_clean_nickname():
    assert clean_nickname(None) is None and clean_nickname("   ") is None
    assert clean_nickname("Zoë_42") == "Zoë_42"
    for bad in ("<b>", "a\nb", "-lead", "x" * 33, 7):
        with pytest.raises(InvalidNickname):
            clean_nickname(bad)

"""Bad input gets a clear error and loses nothing (done-when 7), over HTTP and the websocket."""

from __future__ import annotations

import json

import aiohttp
import pytest

from server import protocol as P

OK_CODE = "def main(x):\n    return x + 1\n"


async def _post(api, body, raw: bytes | None = None, token: str | None = None):
    kwargs = {"data": raw} if raw is not None else {"json": body}
    async with api.session.post(f"{api.url}/api/jobs", headers=api.headers(token), **kwargs) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("body", "needle", "field"),
    [
        ({"code": "def main(x):\n    return (x\n", "inputs": [1]}, "SyntaxError", "code"),
        ({"code": "def helper(x):\n    return x\n", "inputs": [1]}, "main(x)", "code"),
        ({"code": "", "inputs": [1]}, "non-empty", "code"),
        ({"code": 42, "inputs": [1]}, "'code' must be", "code"),
        ({"inputs": [1]}, "'code' must be", "code"),
        ({"code": OK_CODE, "inputs": "1,2,3"}, "'inputs' must be", "inputs"),
        ({"code": OK_CODE, "inputs": 7}, "'inputs' must be", "inputs"),
        ({"code": OK_CODE, "inputs": {"start": 1}}, "'inputs' must be", "inputs"),
        ({"code": OK_CODE, "inputs": {"range": ["a", 3]}}, "integers", "inputs"),
        ({"code": OK_CODE, "inputs": {"range": [0, 10, 0]}}, "zero", "inputs"),
        ({"code": OK_CODE, "inputs": {"range": [5, 1]}}, "empty", "inputs"),
        ({"code": OK_CODE, "inputs": []}, "empty list", "inputs"),
        ({"code": OK_CODE, "inputs": [1], "timeout": "soon"}, "'timeout' must be", "timeout"),
        ({"code": OK_CODE, "inputs": [1], "timeout": -1}, "'timeout' must be", "timeout"),
        ({"code": OK_CODE, "inputs": [1], "max_attempts": True}, "'max_attempts' must be", "max_attempts"),
        ({"code": OK_CODE, "inputs": [1], "max_attempts": 0}, "between", "max_attempts"),
        ({"code": OK_CODE, "inputs": [1], "priority": 1000}, "between", "priority"),
        ({"code": OK_CODE, "inputs": [1], "description": 5}, "'description' must be a string", "description"),
        ({"code": OK_CODE, "inputs": [1], "description": "x" * 501}, "at most 500 characters", "description"),
        ({"code": OK_CODE, "inputs": [1], "description": "bell\x07"}, "no control characters", "description"),
        ({"code": OK_CODE, "inputs": [1], "requirements": "numpy"}, "'requirements' must be", "requirements"),
        ({"code": OK_CODE, "inputs": [1], "requirements": ["num py; rm -rf"]}, "package names", "requirements"),
        ({"code": OK_CODE, "inputs": [1], "replication": 99}, "between", "replication"),
        ({"code": OK_CODE, "inputs": [1], "replication": 0}, "between 1 and 10", "replication"),
        ({"code": OK_CODE, "inputs": [1], "replication": "always"}, '"adaptive"', "replication"),
        ({"code": OK_CODE, "inputs": [1], "replication": True}, "integer", "replication"),
        ({"code": OK_CODE, "inputs": [1], "replication": 3, "quorum": 1}, "between 2 (a majority", "quorum"),
        ({"code": OK_CODE, "inputs": [1], "replication": 3, "quorum": 4}, "and 3 (all", "quorum"),
        ({"code": OK_CODE, "inputs": [1], "replication": "adaptive", "quorum": 2}, "fixed replication", "quorum"),
        ({"code": OK_CODE, "inputs": [1], "replication": 3, "quorum": "2"}, "integer", "quorum"),
        ({"code": OK_CODE, "inputs": [1], "replication": 3, "max_replicas": 2}, "between 3", "max_replicas"),
        ({"code": OK_CODE, "inputs": [1], "replication": 3, "max_replicas": 21}, "and 20", "max_replicas"),
        ({"code": OK_CODE, "inputs": [1], "tolerance": 0.1}, "'tolerance' must be", "tolerance"),
        ({"code": OK_CODE, "inputs": [1], "tolerance": {}}, "'tolerance' must be", "tolerance"),
        ({"code": OK_CODE, "inputs": [1], "tolerance": {"eps": 1}}, "'tolerance' must be", "tolerance"),
        ({"code": OK_CODE, "inputs": [1], "tolerance": {"rtol": -1}}, "non-negative", "tolerance"),
        ({"code": OK_CODE, "inputs": [1], "tolerance": {"atol": "1e-9"}}, "non-negative", "tolerance"),
        ({"code": OK_CODE, "inputs": [1], "colour": "red"}, "unknown field", "colour"),
    ],
)
async def test_bad_submissions(serve, body, needle, field):
    api, _ = await serve()
    status, answer = await _post(api, body)
    assert status == 400, answer
    assert needle in answer["error"]
    assert answer.get("field") == field


async def test_syntax_error_points_at_its_line(serve):
    api, _ = await serve()
    code = "import math\n\ndef main(x):\n    y = = x\n    return y\n"
    status, answer = await _post(api, {"code": code, "inputs": [1]})
    assert status == 400
    assert answer["line"] == 4
    assert "line 4" in answer["error"]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_malformed_and_oversized_bodies(serve, volunteers):
    api, _ = await serve(max_body_bytes=4096)
    assert await _post(api, None, raw=b'{"code": "def main(x)') == (
        400,
        {"error": "malformed JSON: Unterminated string starting at: line 1 column 10 (char 9)"},
    )
    status, answer = await _post(api, None, raw=b"[1, 2]")
    assert status == 400 and "JSON object" in answer["error"]
    status, answer = await _post(api, {"code": OK_CODE, "inputs": list(range(5000))})
    assert status == 413 and "too large" in answer["error"]
    status, answer = await _post(api, None, raw=b'{"code": "def main(x): return x", "inputs": [NaN]}')
    assert status == 400 and "input 0" in answer["error"]
    # the server is still up and works
    job = await api.submit(OK_CODE, [1, 2])
    volunteers(api.url, 1)
    assert (await api.wait(job))["state"] == "done"


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_auth_and_ids(serve):
    api, app = await serve()
    from tests.conftest import add_researcher

    other = await add_researcher(app, "other@example.org")
    job = await api.submit(OK_CODE, [1])
    status, answer = await _post(api, {"code": OK_CODE}, token="uvm_wrong")
    assert status == 401 and "token" in answer["error"]
    async with api.session.get(f"{api.url}/api/jobs") as resp:
        assert resp.status == 401
    async with api.session.get(f"{api.url}/api/jobs", headers={"Authorization": "Basic abc"}) as resp:
        assert resp.status == 401 and "Bearer" in (await resp.json())["error"]
    for path in ("", "/results", "/errors", "/finished"):
        for jid in (job, 999999, "abc"):
            token = other if jid == job else api.token
            async with api.session.get(f"{api.url}/api/jobs/{jid}{path}", headers=api.headers(token)) as resp:
                assert resp.status == 404, (path, jid)
                assert "no job" in (await resp.json())["error"]
    for action in ("cancel", "retry"):
        async with api.session.post(f"{api.url}/api/jobs/{job}/{action}", headers=api.headers(other)) as resp:
            assert resp.status == 404
    async with api.session.get(f"{api.url}/api/jobs", headers=api.headers(other)) as resp:
        assert (await resp.json())["jobs"] == []
    async with api.session.get(f"{api.url}/api/jobs/{job}/results?format=xml", headers=api.headers()) as resp:
        assert resp.status == 400 and "unknown format" in (await resp.json())["error"]
    for start in ("-1", "x", "1e3", "9" * 12):
        async with api.session.get(f"{api.url}/api/jobs/{job}/finished?start={start}", headers=api.headers()) as resp:
            assert resp.status == 400 and "'start' must be a whole number" in (await resp.json())["error"], start
    async with api.session.get(f"{api.url}/api/jobs/{job}/finished", headers=api.headers()) as resp:
        assert await resp.json() == {"start": 0, "runs": [], "next": None}
    assert (await api.job(job))["state"] == "running"  # untouched by all of the above


# ------------------------------------------------------------------------------- websocket
async def _hello(ws, volunteer=""):
    await ws.send_str(P.encode(P.Hello(volunteer, {"cores": 2, "workers": 4})))
    return json.loads((await ws.receive()).data)


async def _ask(ws, text: str) -> dict:
    await ws.send_str(text)
    return json.loads((await ws.receive(timeout=10)).data)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_websocket_bad_messages_keep_the_connection(serve):
    api, _ = await serve()
    async with api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        reply = await _ask(ws, P.encode(P.Ready(1)))
        assert reply == {"type": "error", "message": "send 'hello' first", "ref": "ready"}
        assert (await _hello(ws))["type"] == "welcome"
        cases = [
            ("{not json", "malformed JSON"),
            ("[1, 2]", "JSON object"),
            ('{"type": "teleport"}', "unknown message type 'teleport'"),
            ('{"type": "ready", "n": "three"}', "field 'n' must be an integer, not str"),
            ('{"type": "ready", "n": true}', "not a boolean"),
            ('{"type": "ready", "n": 100000}', "between 0 and"),
            ('{"type": "ready"}', "missing field 'n'"),
            ('{"type": "ready", "n": 1, "extra": 1}', "unknown field(s) extra"),
            ('{"type": "tasks", "tasks": []}', "not a message a volunteer sends"),
            ('{"type": "wait", "heartbeat": 5}', "not a message a volunteer sends"),
            ('{"type": "wait", "heartbeat": -1}', "heartbeat must be a number of seconds"),
            ('{"type": "wait"}', "missing field 'heartbeat'"),
            ('{"type": "heartbeat", "attempts": [1]}', "list of strings"),
            ('{"type": "results", "results": [1]}', "JSON object"),
            ('{"type": "results", "results": [{"attempt": "a"}]}', "missing field 'task'"),
            ('{"type": "need_code", "job": 12345, "code_hash": "x"}', "no task of job 12345"),
            ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
            (P.encode(P.Hello("vol-1")), "already sent"),
        ]
        for text, needle in cases:
            reply = await _ask(ws, text)
            assert reply["type"] == "error" and needle in reply["message"], (text, reply)
        await ws.send_bytes(b"\x00\x01")
        assert "binary" in json.loads((await ws.receive()).data)["message"]
        # still usable: nothing to do, so the ready is held
        assert (await _ask(ws, P.encode(P.Ready(1))))["type"] == "wait"
    async with api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        reply = await _hello(ws, "bad|id")
        assert reply["type"] == "welcome" and reply["volunteer"].startswith("v")  # a fresh id, not an error


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_websocket_oversized_message_closes_1009(serve):
    api, _ = await serve(max_ws_message_bytes=64 * 1024)
    async with api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        await _hello(ws)
        await ws.send_str('{"type": "throttle", "state": {"x": "' + "a" * (80 * 1024) + '"}}')
        msg = await ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert ws.close_code == 1009


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_websocket_foreign_origin_refused(serve):
    api, _ = await serve(allowed_origins=("https://partner.example",))
    url = api.url.replace("http", "ws") + "/ws/volunteer"
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        async with api.session.ws_connect(url, headers={"Origin": "https://evil.example"}):
            pass
    assert err.value.status == 403
    async with api.session.ws_connect(url, headers={"Origin": "https://partner.example"}) as ws:
        assert (await _hello(ws))["type"] == "welcome"
    async with api.session.ws_connect(url, headers={"Origin": api.url}) as ws:
        assert (await _hello(ws))["type"] == "welcome"


async def test_results_unknown_duplicate_late_and_unserialisable(serve):
    api, _ = await serve()
    job = await api.submit(OK_CODE, [10, 20, 30])
    async with api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        await _hello(ws, "vol-a")
        tasks = (await _ask(ws, P.encode(P.Ready(3))))["tasks"]
        assert sorted(t["input"] for t in tasks) == [10, 20, 30]
        t0, t1, t2 = tasks
        code = await _ask(ws, P.encode(P.NeedCode(job, t0["code_hash"])))
        assert code["source"] == OK_CODE
        good = P.Outcome(attempt=t0["attempt"], task=t0["task"], result=t0["input"] + 1)
        assert await _ask(ws, P.encode(P.Results([good]))) == {
            "type": "ack",
            "attempts": [t0["attempt"]],
            "ignored": [],
        }
        # a duplicate result: idempotent, acknowledged as ignored, recorded once
        assert (await _ask(ws, P.encode(P.Results([good]))))["ignored"] == [t0["attempt"]]
        # unknown attempt / unknown task
        fake = P.Outcome(attempt="deadbeef", task=t1["task"], result=1)
        wrong_task = P.Outcome(attempt=t1["attempt"], task=999999, result=1)
        reply = await _ask(ws, P.encode(P.Results([fake, wrong_task])))
        assert reply["attempts"] == [] and sorted(reply["ignored"]) == sorted(["deadbeef", t1["attempt"]])
        # NaN is not JSON: the attempt becomes an error the researcher sees (max_attempts=3 -> requeued)
        nan = json.dumps({"type": "results", "results": [{"attempt": t1["attempt"], "task": t1["task"]}]})
        nan = nan.replace("}]}", ', "result": NaN}]}')
        assert (await _ask(ws, nan))["attempts"] == [t1["attempt"]]
        big = P.Outcome(attempt=t2["attempt"], task=t2["task"], result="x" * (1024 * 1024 + 1))
        assert (await _ask(ws, P.encode(P.Results([big]))))["attempts"] == [t2["attempt"]]
    async with api.session.get(f"{api.url}/api/jobs/{job}/errors", headers=api.headers()) as resp:
        errors = {e["index"]: e["error"] for e in (await resp.json())["errors"]}
    assert "not JSON-serialisable" in errors[1]
    assert "the limit is" in errors[2]
    job_state = await api.job(job)
    assert job_state["counts"]["done"] == 1 and job_state["counts"]["failed"] == 0

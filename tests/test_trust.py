"""Trust I, the server side: each defence tried the way an attacker would, over the websocket or HTTP.

Hostile volunteers are scripted websocket clients; honest ones are ``workers/sim.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import threading

import aiohttp
import pytest

from server import protocol as P
from server.crypto import hash_token
from server.jobs import dispatch
from server.web import appkeys as K
from tests.conftest import add_researcher

SQUARE = "def main(x):\n    return x * x\n"


def ws_url(api) -> str:  # noqa: ANN001
    return api.url.replace("http", "ws") + "/ws/volunteer"


async def hello(ws, volunteer: str = "", **capabilities: object) -> dict:  # noqa: ANN001
    await ws.send_str(P.encode(P.Hello(volunteer, capabilities)))
    welcome = json.loads((await ws.receive(timeout=10)).data)
    assert welcome["type"] == "welcome", welcome
    return welcome


async def ask(ws, msg: object) -> dict:  # noqa: ANN001
    await ws.send_str(msg if isinstance(msg, str) else P.encode(msg))
    return json.loads((await ws.receive(timeout=10)).data)


async def close_code(ws, within: float = 10) -> int:  # noqa: ANN001
    """Read until the server closes the socket; the code of its close frame."""
    while True:
        msg = await ws.receive(timeout=within)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return msg.data
        if msg.type != aiohttp.WSMsgType.TEXT:
            return ws.close_code


async def abandoned(app, expected: int) -> None:  # noqa: ANN001
    """Wait until the server has recorded the leases of closed sockets as abandoned (so that no
    transaction is still open when the test's database is dropped)."""
    import sqlalchemy as sa

    from server.store.tables import attempts

    for _ in range(200):
        async with app[K.storage].engine.connect() as sock:
            query = sa.select(sa.func.count()).where(attempts.c.outcome == "abandoned")
            if (await sock.execute(query)).scalar() >= expected:
                return
        await asyncio.sleep(0.05)


def socket_of(app, signed: str) -> dispatch.VolunteerSocket:  # noqa: ANN001
    public = signed.split("-")[0]
    return next(c for c in app[K.dispatcher].sockets if c.volunteer == public)


# ------------------------------------------------------------------------------- leases capped
async def test_hoarder_never_holds_more_than_its_cap_and_the_job_finishes(serve, volunteers):
    """A socket that keeps asking for 64 tasks, heartbeats them and never answers, beside two
    honest volunteers: the 400-task job ends done, every result correct, and the hoarder never
    holds more than its cap (64), gets nothing more once its leases expired unanswered, and
    cannot keep its leases with heartbeats past start + 2 x timeout + grace."""
    api, app = await serve(lease_grace=0.5, reaper_interval=0.1)
    job = await api.submit(SQUARE, list(range(400)), timeout=1.0)
    most, received = 0, 0
    async with api.session.ws_connect(ws_url(api)) as ws:
        me = (await hello(ws, workers=64, prefetch=512))["volunteer"]
        sock = socket_of(app, me)
        volunteers(api.url, 2)
        held: list[str] = []
        for _ in range(400):
            reply = await ask(ws, P.Ready(64))  # `wait` when it may not lease (its ready held)
            held += [t["attempt"] for t in reply.get("tasks", [])]
            received += len(reply.get("tasks", []))
            most = max(most, len(sock.held))
            await ws.send_str(P.encode(P.Heartbeat(held[-64:])))  # keep them, as long as allowed
            if (await api.job(job))["state"] == "done":
                break
            await asyncio.sleep(0.02)
        final = await api.wait(job, timeout=30)
    assert final["state"] == "done" and final["counts"]["done"] == 400
    assert [r["result"] for r in json.loads(await api.results(job))] == [x * x for x in range(400)]
    assert 0 < most <= dispatch.HARD_CAP
    assert received <= dispatch.HARD_CAP + 1  # its first 64 expired unanswered: then (almost) nothing


async def test_a_saboteur_and_a_hoarder_beside_two_honest_volunteers(serve, volunteers):
    """Issue 7, done-when 2, as one attack: a socket that answers every task with an error and
    another that keeps asking for 64 tasks and never answers, beside two honest simulated
    volunteers. The 400-task job ends done with every result correct; the hoarder never holds
    more than its cap."""
    api, app = await serve(lease_grace=0.5, reaper_interval=0.1)
    job = await api.submit(SQUARE, list(range(400)), timeout=1.0, replication=1)
    sabotaged, most = 0, 0
    async with api.session.ws_connect(ws_url(api)) as saboteur, api.session.ws_connect(ws_url(api)) as hoarder:
        await hello(saboteur, workers=4, prefetch=12)
        hoarder_conn = socket_of(app, (await hello(hoarder, workers=64, prefetch=512))["volunteer"])

        async def sabotage() -> None:
            nonlocal sabotaged
            while True:
                tasks = (await ask(saboteur, P.Ready(16)))["tasks"]
                if tasks:
                    errors = [P.Outcome(t["attempt"], t["task"], error="Traceback\nValueError: no") for t in tasks]
                    await saboteur.send_str(P.encode(P.Results(errors)))
                    sabotaged += len(tasks)
                await asyncio.sleep(0.01)

        async def hoard() -> None:
            nonlocal most
            held: list[str] = []
            while True:
                held += [t["attempt"] for t in (await ask(hoarder, P.Ready(64)))["tasks"]]
                most = max(most, len(hoarder_conn.held))
                await hoarder.send_str(P.encode(P.Heartbeat(held[-64:])))
                await asyncio.sleep(0.02)

        attackers = [asyncio.create_task(sabotage()), asyncio.create_task(hoard())]
        await asyncio.sleep(0.3)  # the attackers take the first tasks before anyone honest is there
        volunteers(api.url, 2)
        final = await api.wait(job, timeout=90)
        for attacker in attackers:
            attacker.cancel()
        await asyncio.gather(*attackers, return_exceptions=True)
    assert sabotaged > 0 and 0 < most <= dispatch.HARD_CAP
    assert final["state"] == "done" and final["counts"]["done"] == 400
    assert [r["result"] for r in json.loads(await api.results(job))] == [x * x for x in range(400)]


async def test_a_connection_gets_what_its_declared_workers_justify(serve):
    api, app = await serve()
    await api.submit(SQUARE, list(range(300)))
    async with api.session.ws_connect(ws_url(api)) as ws:
        await hello(ws, workers=1)  # no prefetch declared: one running + one waiting
        assert len((await ask(ws, P.Ready(64)))["tasks"]) == 2
        assert (await ask(ws, P.Ready(64)))["type"] == "wait"  # at its cap: held
        assert await ask(ws, P.Ready(0)) == {"type": "tasks", "tasks": []}  # withdrawn
        await ws.send_str(P.encode(P.Throttle({"workers": 2, "prefetch": 4})))  # the plan changed
        assert len((await ask(ws, P.Ready(64)))["tasks"]) == 4
        # lies are capped: 64 workers with 10,000 prefetch still holds at most 64
        await ws.send_str(P.encode(P.Throttle({"workers": 10**6, "prefetch": 10**6})))
        assert len((await ask(ws, P.Ready(64)))["tasks"]) == 64 - 6
    # one volunteer id over several connections: HARD_CAP in all
    async with api.session.ws_connect(ws_url(api)) as one, api.session.ws_connect(ws_url(api)) as two:
        signed = (await hello(one, workers=64))["volunteer"]
        assert (await hello(two, signed, workers=64))["volunteer"] == signed
        got = len((await ask(one, P.Ready(40)))["tasks"]) + len((await ask(two, P.Ready(64)))["tasks"])
        assert got == dispatch.HARD_CAP
    await abandoned(app, 2 * dispatch.HARD_CAP)


async def test_results_for_attempts_never_held_get_the_socket_closed(serve):
    api, _ = await serve()
    job = await api.submit(SQUARE, [3])
    async with api.session.ws_connect(ws_url(api)) as ws:
        await hello(ws)
        fakes = [P.Outcome(secrets.token_hex(8), 1, result=0) for _ in range(64)]
        for _ in range(2):
            assert sorted((await ask(ws, P.Results(fakes)))["ignored"]) == sorted(o.attempt for o in fakes)
            fakes = [P.Outcome(secrets.token_hex(8), 1, result=0) for _ in range(64)]
        reply = await ask(ws, P.Results(fakes))
        assert reply["type"] == "error" and "does not hold" in reply["message"]
        assert await close_code(ws) == 1008
    assert (await api.job(job))["counts"]["done"] == 0


async def test_elapsed_is_clamped_to_the_tasks_timeout(serve):
    api, _ = await serve()
    await api.submit(SQUARE, [4], timeout=2.0)
    async with api.session.ws_connect(ws_url(api)) as ws:
        me = (await hello(ws))["volunteer"]
        (task,) = (await ask(ws, P.Ready(1)))["tasks"]
        claim = P.Outcome(task["attempt"], task["task"], result=16, elapsed=1e9)
        assert (await ask(ws, P.Results([claim])))["attempts"] == [task["attempt"]]
    async with api.session.get(f"{api.url}/api/volunteers/{me}") as resp:
        stats = await resp.json()
    assert stats["tasks_done"] == 1 and stats["task_seconds"] == 2.0


# --------------------------------------------------------------------------- server-issued ids
async def test_forged_or_missing_id_gets_a_fresh_one_and_a_genuine_one_survives_a_restart(serve):
    api, app = await serve()
    async with api.session.ws_connect(ws_url(api)) as ws:
        issued = (await hello(ws, ""))["volunteer"]
    public, mac = issued.split("-")
    assert public.startswith("v") and len(mac) == 32
    forged = [
        "someone-else",
        public + "-" + "0" * 32,  # the public part of a real id, a made-up signature
        public,
        "v" + "1" * 20 + "-" + mac,  # a real signature on another id
    ]
    for attempt in forged:
        async with api.session.ws_connect(ws_url(api)) as ws:
            got = (await hello(ws, attempt))["volunteer"]
            assert got != attempt and got.split("-")[0] != public
            assert socket_of(app, got).volunteer == got.split("-")[0]  # VolunteerSocket holds the verified id
    # a second server on the same data key (a restart, or another instance) accepts it
    other, _ = await serve()
    async with other.session.ws_connect(ws_url(other)) as ws:
        assert (await hello(ws, issued))["volunteer"] == issued


async def test_sim_keeps_and_presents_its_welcome_id(serve, volunteers):
    api, _ = await serve()
    (sim,) = volunteers(api.url, 1)
    job = await api.submit(SQUARE, list(range(5)))
    await api.wait(job)
    first = sim.token
    assert first.startswith(sim.volunteer + "-")
    async with api.session.ws_connect(ws_url(api)) as ws:  # what the sim will present next time
        assert (await hello(ws, first))["volunteer"] == first


# ----------------------------------------------------------------------------- small cases
async def test_need_code_only_for_a_job_the_socket_holds(serve):
    api, _ = await serve()
    job = await api.submit(SQUARE, [1, 2])
    async with api.session.ws_connect(ws_url(api)) as thief, api.session.ws_connect(ws_url(api)) as worker:
        await hello(thief)
        await hello(worker)
        (task, _) = (await ask(worker, P.Ready(2)))["tasks"]
        refused = await ask(thief, P.NeedCode(job, task["code_hash"]))  # knows the id and the hash
        assert refused["type"] == "error" and "no task of job" in refused["message"]
        assert (await ask(worker, P.NeedCode(job, task["code_hash"])))["source"] == SQUARE


async def test_oversized_capabilities_are_cut_over_the_socket(serve, browser_session_op):
    api, app, op = browser_session_op
    huge = "x" * 300_000  # all of it within one 4 MiB message
    async with api.session.ws_connect(ws_url(api)) as ws:
        caps = {"cores": 8, "workers": 2, "user_agent": huge, "junk": {"a": huge}, "resume": [huge] * 3}
        me = (await hello(ws, "", **caps))["volunteer"]
        state = {"battery": {"level": 42}, "reasons": ["r" * 20_000] * 100, "more": huge}
        await ws.send_str(P.encode(P.Throttle(state)))
        await ask(ws, P.Ready(0))  # the throttle was handled before this answer
        sock = socket_of(app, me)
        assert len(json.dumps(sock.capabilities.to_wire())) < 2000 and len(json.dumps(sock.throttle.to_wire())) < 2000
        async with op.get(f"{api.url}/api/admin/volunteers") as resp:
            body = await resp.text()
    assert resp.status == 200 and len(body) < 20_000 and "junk" not in body and "more" not in body


@pytest.fixture
async def browser_session_op(serve):
    """(api, app, an operator's signed-in session)."""
    api, app = await serve()
    await add_researcher(app, "op@example.org", operator=True)
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    await _sign_in(session, api.url, "op@example.org")
    yield api, app, session
    await session.close()


async def _sign_in(
    session: aiohttp.ClientSession, url: str, email: str, password: str = "correct horse", origin: str | None = None
) -> int:
    """POST /api/login as the page at ``origin`` (default: the server's own) would; the status."""
    async with session.post(
        f"{url}/api/login", json={"email": email, "password": password}, headers={"Origin": origin or url}
    ) as resp:
        session.last_cookie = resp.headers.get("Set-Cookie", "")  # type: ignore[attr-defined]
        return resp.status


# ------------------------------------------------------------------------- per-address limits
async def test_connections_per_address_are_limited(serve):
    api, _ = await serve(limit_loopback=True, max_connections_per_address=3)
    async with (
        api.session.ws_connect(ws_url(api)) as a,
        api.session.ws_connect(ws_url(api)) as b,
        api.session.ws_connect(ws_url(api)) as c,
    ):
        for ws in (a, b, c):
            await hello(ws)
        async with api.session.ws_connect(ws_url(api)) as fourth:
            refused = json.loads((await fourth.receive(timeout=10)).data)
            assert refused["type"] == "error" and "too many connections" in refused["message"]
            assert await close_code(fourth) == 1008
    async with api.session.ws_connect(ws_url(api)) as again:  # the others closed: room again
        await hello(again)


async def test_loopback_is_exempt_unless_configured(serve):
    api, _ = await serve(max_connections_per_address=1, max_messages_per_second=1)
    async with api.session.ws_connect(ws_url(api)) as a, api.session.ws_connect(ws_url(api)) as b:
        for ws in (a, b):
            await hello(ws)
            for _ in range(5):
                assert (await ask(ws, P.Ready(0)))["type"] == "tasks"


async def test_a_flood_of_messages_gets_an_error_then_close(serve):
    api, _ = await serve(limit_loopback=True, max_messages_per_second=20)
    async with api.session.ws_connect(ws_url(api)) as ws:
        await hello(ws)
        for _ in range(200):  # far beyond a burst of 40
            await ws.send_str(P.encode(P.Ready(0)))
        kinds = []
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            kinds.append(json.loads(msg.data))
        assert kinds[-1]["type"] == "error" and "too many messages" in kinds[-1]["message"]
        assert len(kinds) <= 42 and msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008


# -------------------------------------------------------------------------------- revoke
async def test_revoke_cancels_running_jobs_and_closes_the_events_socket(serve, browser_session_op):
    api, app, op = browser_session_op
    victim_token = await add_researcher(app, "gone@example.org")
    victim = app[K.storage]
    bearer = {"Authorization": f"Bearer {victim_token}"}
    async with api.session.post(
        f"{api.url}/api/jobs", json={"code": SQUARE, "inputs": list(range(50))}, headers=bearer
    ) as resp:
        job = (await resp.json())["id"]
    events = api.url.replace("http", "ws") + "/api/events"
    async with api.session.ws_connect(events, headers=bearer) as stream, api.session.ws_connect(ws_url(api)) as vol:
        await hello(vol)
        tasks = (await ask(vol, P.Ready(2)))["tasks"]
        assert {t["job"] for t in tasks} == {job}
        researcher_id = (await victim.researcher_by_token(hash_token(victim_token))).id
        async with op.post(
            f"{api.url}/api/admin/researchers/{researcher_id}/revoke", json={}, headers={"Origin": api.url}
        ) as resp:
            assert resp.status == 200 and (await resp.json())["jobs_cancelled"] == 1
        cancel = json.loads((await vol.receive(timeout=5)).data)  # the volunteer is told to drop them
        assert cancel["type"] == "cancel" and cancel["job"] == job
        assert await close_code(stream, within=5) == 1008  # the events socket closes within seconds
    async with api.session.get(f"{api.url}/api/jobs/{job}", headers=bearer) as resp:
        assert resp.status == 403  # the token stops working
    assert (await app[K.dispatcher].job_status(None, job))["state"] == "cancelled"


async def test_an_operator_cancels_another_researchers_job(serve, browser_session_op):
    api, app, op = browser_session_op
    job = await api.submit(SQUARE, list(range(10)))
    async with api.session.post(f"{api.url}/api/admin/jobs/{job}/cancel", headers=api.headers()) as resp:
        assert resp.status == 403  # not an operator
    async with op.post(f"{api.url}/api/admin/jobs/{job}/cancel", json={}, headers={"Origin": api.url}) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["cancelled"] is True and body["state"] == "cancelled"
    async with op.post(f"{api.url}/api/admin/jobs/999999/cancel", json={}, headers={"Origin": api.url}) as resp:
        assert resp.status == 404
    assert (await api.job(job))["state"] == "cancelled"


# ------------------------------------------------------------------------ researchers' side
@pytest.mark.parametrize("backend", ["sqlite"])
async def test_cookie_posts_need_json_and_our_origin(serve, browser_session_op):
    api, app, op = browser_session_op
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": api.url}
    async with op.post(f"{api.url}/api/jobs", data="code=x", headers=form) as resp:
        assert resp.status == 403 and "Content-Type" in (await resp.json())["error"]
    for origin in ("https://evil.example", None):
        headers = {"Origin": origin} if origin else {}
        async with op.post(f"{api.url}/api/jobs", json={"code": SQUARE, "inputs": [1]}, headers=headers) as resp:
            assert resp.status == 403 and "Origin" in (await resp.json())["error"]
    async with op.post(f"{api.url}/api/jobs", json={"code": SQUARE, "inputs": [1]}, headers={"Origin": api.url}) as r:
        assert r.status == 201
    # a bearer token is not sent by browsers on their own: scripts need neither header
    async with api.session.post(f"{api.url}/api/jobs", data=json.dumps({"code": SQUARE}), headers=api.headers()) as r:
        assert r.status == 201
    # sign-in from another site (login CSRF) is refused too
    async with aiohttp.ClientSession() as fresh:
        assert await _sign_in(fresh, api.url, "op@example.org", origin="https://evil.example") == 403


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sign_in_hashes_unknown_emails_too_off_the_event_loop(serve, monkeypatch):
    """An unknown email costs the same scrypt as a known one, and scrypt runs in a thread."""
    from server.web import dashboard

    api, app = await serve()
    await add_researcher(app, "known@example.org")
    calls: list[tuple[str, bool]] = []
    real = dashboard.check_password

    def spy(password: str, stored: str) -> bool:
        calls.append((stored, threading.current_thread() is threading.main_thread()))
        return real(password, stored)

    monkeypatch.setattr(dashboard, "check_password", spy)
    async with aiohttp.ClientSession() as s:
        assert await _sign_in(s, api.url, "nobody@example.org", "guess") == 401
        assert await _sign_in(s, api.url, "known@example.org", "guess") == 401
    (unknown, in_loop_1), (known, in_loop_2) = calls
    assert unknown == dashboard.DUMMY_PASSWORD_HASH and known.startswith("scrypt$") and known != unknown
    assert not in_loop_1 and not in_loop_2


def test_login_limiter_per_address_and_never_cleared_wholesale():
    from server.web.dashboard import LoginLimiter

    limiter = LoginLimiter(limit=3, window=60.0, per_address=5, kept=100)
    assert [limiter.allow("a@x", "1.1.1.1", now=0.0) for _ in range(4)] == [True, True, True, False]
    # other emails from the same address: the address budget (5) runs out
    assert [limiter.allow(f"{i}@x", "1.1.1.1", now=1.0) for i in range(3)] == [True, True, False]
    assert limiter.allow("a@x", "2.2.2.2", now=1.0)  # another address is not affected
    for i in range(500):  # a spray of addresses fills the memory bound...
        limiter.allow(f"{i}@x", f"10.0.{i // 250}.{i % 250}", now=2.0)
        if i % 20 == 0:
            assert not limiter.allow("a@x", "1.1.1.1", now=2.0)  # ...while a guesser keeps trying
    assert len(limiter._hits) <= 100
    # only the least recently used keys were forgotten: the guesser did not get a fresh budget
    assert not limiter.allow("a@x", "1.1.1.1", now=3.0)
    assert limiter.allow("a@x", "1.1.1.1", now=61.0)  # the window passes


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_session_cookie_is_secure_when_public_url_is_https(serve):
    api, app = await serve(public_url="https://compute.example.edu")
    await add_researcher(app, "sec@example.org")
    async with aiohttp.ClientSession() as s:
        assert await _sign_in(s, api.url, "sec@example.org", origin="https://compute.example.edu") == 200
        cookie = s.last_cookie
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_session_cookie_is_secure_behind_a_trusted_tls_proxy(serve):
    """No UVM_PUBLIC_URL: a trusted proxy's ``X-Forwarded-Proto: https`` makes the cookie Secure;
    plain HTTP, or the header from anyone else, does not."""

    async def sign_in(url: str, origin: str, **headers: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{url}/api/login",
                json={"email": "proxied@example.org", "password": "correct horse"},
                headers={"Origin": origin, **headers},
            ) as resp,
        ):
            return resp.status, resp.headers.get("Set-Cookie", "")

    proxied, app = await serve(trusted_proxies=("127.0.0.1",))
    await add_researcher(app, "proxied@example.org")
    status, cookie = await sign_in(
        proxied.url, proxied.url.replace("http://", "https://"), **{"X-Forwarded-Proto": "https"}
    )
    assert status == 200 and "Secure" in cookie, (status, cookie)
    status, cookie = await sign_in(proxied.url, proxied.url, **{"X-Forwarded-Proto": "http"})
    assert status == 200 and "uvm_session=" in cookie and "Secure" not in cookie, (status, cookie)
    direct, _ = await serve()  # the same database; 127.0.0.1 is no trusted proxy here
    status, cookie = await sign_in(direct.url, direct.url, **{"X-Forwarded-Proto": "https"})
    assert status == 200 and "uvm_session=" in cookie and "Secure" not in cookie, (status, cookie)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_deeply_nested_json_is_a_400_not_a_500(serve):
    api, _ = await serve()
    body = "[" * 200_000 + "]" * 200_000
    async with api.session.post(f"{api.url}/api/jobs", data=body, headers=api.headers()) as resp:
        assert resp.status == 400 and "nested too deeply" in (await resp.json())["error"]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_range_bounds_fit_63_bits_and_timeouts_have_a_minimum(serve):
    api, _ = await serve()
    for inputs in ({"range": [0, 2**64]}, {"range": [10**20, 10**20 + 3]}, {"range": [1e20, 1e20 + 3]}):
        async with api.session.post(
            f"{api.url}/api/jobs", json={"code": SQUARE, "inputs": inputs}, headers=api.headers()
        ) as resp:
            assert resp.status == 400 and (await resp.json())["field"] == "inputs", inputs
    ok = await api.submit(SQUARE, {"range": [2**63 - 3, 2**63 - 1]})
    assert (await api.job(ok))["n_tasks"] == 2
    for timeout in (0.01, 0.0999):
        async with api.session.post(
            f"{api.url}/api/jobs", json={"code": SQUARE, "inputs": [1], "timeout": timeout}, headers=api.headers()
        ) as resp:
            assert resp.status == 400 and "0.1" in (await resp.json())["error"]
    await api.submit(SQUARE, [1], timeout=0.1)


async def test_csv_cells_cannot_be_formulas():
    from server.store.download import ResultRow
    from server.web.export import render

    async def pages():  # JSON values as the download reads them: JSON text
        yield [ResultRow(0, '"x"', "failed", None, 'Traceback\n=HYPERLINK("x")', "", None, 0, ())]
        yield [
            ResultRow(1, "-5", "done", "-2500.0", None, "", None, 0, ()),
            ResultRow(2, '"@SUM(A1)"', "done", '"+1"', None, "", None, 0, ()),
        ]

    text = b"".join([chunk async for chunk in render(pages(), "csv")]).decode()
    lines = text.splitlines()
    assert lines[1].endswith(',\'=HYPERLINK(""x"")"') or "'=HYPERLINK" in lines[1]
    assert lines[2] == "1,-5,done,-2500.0,,,0"  # plain numbers stay numbers (no accepted, 0 replicas)
    assert "'" not in lines[3] or lines[3].count("'") == 0  # JSON strings are quoted: "@SUM(A1)" starts with "
    from server.web.export import csv_cell

    assert [csv_cell(c) for c in ("=1+1", "+cmd", "-x", "@x", "\tx", "-5", "1e5", "ok")] == [
        "'=1+1",
        "'+cmd",
        "'-x",
        "'@x",
        "'\tx",
        "-5",
        "1e5",
        "ok",
    ]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_file_is_private(serve, tmp_path):
    api, app = await serve()
    await api.submit(SQUARE, [1])
    path = app[K.config].sqlite_path
    for name in (path, path.with_name(path.name + "-wal")):
        if name.exists():
            assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name


def test_config_repr_hides_the_key_and_the_database_password():
    from server.config import Config

    config = Config.from_env(
        {
            "UVM_KEY": "ab" * 32,
            "UVM_DATABASE_URL": "mysql+aiomysql://uvm:s3cret-pw@db:3306/uvm",
            "UVM_REDIS_URL": "redis://:r3dis-pw@cache:6379/0",
        }
    )
    for text in (repr(config), str(config), f"{config}"):
        assert "ab" * 32 not in text and "s3cret-pw" not in text and "r3dis-pw" not in text
        assert "uvm:***@db:3306" in text

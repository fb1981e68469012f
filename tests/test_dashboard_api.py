"""The dashboard's HTTP side: sign-in sessions, isolation between researchers, operator endpoints.

Runs on both backends. Redis db 5 (the backend's own tests use 9) via the ``redis_url`` override below.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from server import protocol as P
from server.web import openapi
from server.web.dashboard import codemirror_modules
from tests.conftest import REDIS_PORT, add_researcher

REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/5"
PASSWORD = "correct horse"  # what tests.conftest.add_researcher sets


@pytest.fixture
def redis_url() -> str:
    """Overrides tests.conftest's: this module's Redis database."""
    return REDIS_URL


@pytest.fixture
async def browser_session() -> AsyncIterator[Callable[[str], aiohttp.ClientSession]]:
    """Cookie-keeping sessions, like a browser on the page at ``origin``: it sends that ``Origin``
    with every request, as browsers do with a POST (cookies for 127.0.0.1 need ``unsafe``)."""
    opened: list[aiohttp.ClientSession] = []

    def make(origin: str) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"Origin": origin})
        opened.append(session)
        return session

    yield make
    for session in opened:
        await session.close()


async def sign_in(session: aiohttp.ClientSession, url: str, email: str, password: str = PASSWORD) -> dict:
    async with session.post(f"{url}/api/login", json={"email": email, "password": password}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body


async def test_login_session_cookie_and_logout(serve, browser_session):
    api, app = await serve()
    await add_researcher(app, "ada@example.org")
    web = browser_session(api.url)
    async with web.get(f"{api.url}/api/me") as resp:
        assert resp.status == 401
    async with web.post(f"{api.url}/api/login", json={"email": "Ada@Example.org ", "password": PASSWORD}) as resp:
        assert resp.status == 200
        me = await resp.json()
        cookie = resp.headers["Set-Cookie"]
    assert me["email"] == "ada@example.org" and me["operator"] is False
    assert cookie.startswith("uvm_session=")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute.lower() in cookie.lower(), cookie
    async with web.get(f"{api.url}/api/me") as resp:
        assert (await resp.json())["email"] == "ada@example.org"
    async with web.post(f"{api.url}/api/jobs", json={"code": "def main(x):\n    return x\n", "inputs": [1]}) as resp:
        assert resp.status == 201  # the session cookie works for the job API too
    async with web.post(f"{api.url}/api/logout", json={}) as resp:
        assert resp.status == 200
    async with web.get(f"{api.url}/api/me") as resp:
        assert resp.status == 401


async def test_login_bad_input(serve, browser_session):
    api, app = await serve()
    await add_researcher(app, "bob@example.org")
    web = browser_session(api.url)
    cases = [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"email": "bob@example.org"}).encode(), 400, "required"),
        (json.dumps({"email": 3, "password": "x"}).encode(), 400, "required"),
        (json.dumps({"email": "bob@example.org", "password": "wrong"}).encode(), 401, "wrong email or password"),
        (json.dumps({"email": "nobody@example.org", "password": PASSWORD}).encode(), 401, "wrong email or password"),
    ]
    for body, status, message in cases:
        async with web.post(f"{api.url}/api/login", data=body, headers={"Content-Type": "application/json"}) as resp:
            answer = await resp.json()
            assert resp.status == status, (body, answer)
            assert message in answer["error"], (body, answer)
    assert not web.cookie_jar.filter_cookies(api.url).get("uvm_session")


async def test_login_rate_limited_per_email_and_address(serve, browser_session):
    api, app = await serve()
    await add_researcher(app, "eve@example.org")
    web = browser_session(api.url)
    wrong = {"email": "eve@example.org", "password": "guess"}
    statuses = []
    for _ in range(11):
        async with web.post(f"{api.url}/api/login", json=wrong) as resp:
            statuses.append(resp.status)
            last = await resp.json(), resp.headers.get("Retry-After")
    assert statuses == [401] * 10 + [429]
    assert "too many sign-in attempts" in last[0]["error"] and int(last[1]) >= 1
    async with web.post(f"{api.url}/api/login", json={**wrong, "password": PASSWORD}) as resp:
        assert resp.status == 429  # even the right password waits out the window
    await add_researcher(app, "other@example.org")
    await sign_in(web, api.url, "other@example.org")  # another email from the same address is not blocked


async def test_researchers_cannot_see_each_others_jobs(serve, browser_session):
    api, app = await serve()
    await add_researcher(app, "a@example.org")
    b_token = await add_researcher(app, "b@example.org")
    a, b = browser_session(api.url), browser_session(api.url)
    await sign_in(a, api.url, "a@example.org")
    await sign_in(b, api.url, "b@example.org")
    async with a.post(f"{api.url}/api/jobs", json={"code": "def main(x):\n    return x\n", "inputs": [1, 2]}) as resp:
        job = (await resp.json())["id"]
    async with a.get(f"{api.url}/api/jobs") as resp:
        assert [j["id"] for j in (await resp.json())["jobs"]] == [job]
    for who in (b, None):
        headers = {} if who is b else {"Authorization": f"Bearer {b_token}"}
        client = b if who is b else api.session
        async with client.get(f"{api.url}/api/jobs", headers=headers) as resp:
            assert (await resp.json())["jobs"] == []
        for method, path in [
            ("GET", f"/api/jobs/{job}"),
            ("GET", f"/api/jobs/{job}/results?format=csv"),
            ("GET", f"/api/jobs/{job}/errors"),
            ("POST", f"/api/jobs/{job}/cancel"),
            ("POST", f"/api/jobs/{job}/retry"),
        ]:
            body = {} if method == "POST" else None
            async with client.request(method, api.url + path, headers=headers, json=body) as resp:
                assert resp.status == 404, (method, path)
    # The events socket of B says nothing about A's job.
    async with b.ws_connect(f"{api.url}/api/events?job={job}") as ws:
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive_json(timeout=0.6)
    async with a.ws_connect(f"{api.url}/api/events?job={job}") as ws:
        event = await ws.receive_json(timeout=5)
        assert event["type"] == "job" and event["id"] == job


async def test_operator_endpoints(serve, browser_session):
    api, app = await serve()
    await add_researcher(app, "op@example.org", operator=True)
    plain_token = await add_researcher(app, "plain@example.org")
    op, plain = browser_session(api.url), browser_session(api.url)
    me = await sign_in(op, api.url, "op@example.org")
    assert me["operator"] is True
    await sign_in(plain, api.url, "plain@example.org")
    for path in ("/api/admin/researchers", "/api/admin/volunteers"):
        async with plain.get(api.url + path) as resp:
            assert resp.status == 403 and "operators only" in (await resp.json())["error"]
    async with op.get(f"{api.url}/api/admin/researchers") as resp:
        people = {r["email"]: r for r in (await resp.json())["researchers"]}
    target = people["plain@example.org"]["id"]
    assert people["plain@example.org"]["approved"] is True

    async with op.post(f"{api.url}/api/admin/researchers/{target}/revoke", json={}) as resp:
        assert (await resp.json()) == {"id": target, "approved": False, "jobs_cancelled": 0}
    async with plain.get(f"{api.url}/api/me") as resp:
        assert resp.status == 401  # revoking ends the researcher's sessions
    async with api.session.get(f"{api.url}/api/jobs", headers=api.headers(plain_token)) as resp:
        assert resp.status == 403
    async with plain.post(f"{api.url}/api/login", json={"email": "plain@example.org", "password": PASSWORD}) as resp:
        assert resp.status == 403 and "not approved" in (await resp.json())["error"]
    async with op.post(f"{api.url}/api/admin/researchers/{target}/approve", json={}) as resp:
        assert (await resp.json())["approved"] is True
    await sign_in(plain, api.url, "plain@example.org")  # approved again: a new sign-in works
    async with plain.get(f"{api.url}/api/me") as resp:
        assert resp.status == 200

    async with op.post(f"{api.url}/api/admin/researchers/{me['id']}/revoke", json={}) as resp:
        assert resp.status == 409
    for bad in ("999999", "abc"):
        async with op.post(f"{api.url}/api/admin/researchers/{bad}/approve", json={}) as resp:
            assert resp.status == 404 and "error" in await resp.json()


async def test_operator_sees_volunteers_and_throttle(serve, browser_session, volunteers):
    api, app = await serve()
    await add_researcher(app, "op2@example.org", operator=True)
    op = browser_session(api.url)
    await sign_in(op, api.url, "op2@example.org")
    volunteers(api.url, 2)
    async with aiohttp.ClientSession() as raw, raw.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer") as ws:
        await ws.send_str(P.encode(P.Hello("throttled-one", {"cores": 8, "workers": 3})))
        me = json.loads(await ws.receive_str(timeout=5))["volunteer"].split("-")[0]  # a fresh, server-issued id
        # a bad battery report (not an object) is dropped, not passed on to break the operator's view
        bad = {"battery": 0.15, "paused": True, "reasons": ["battery low"], "reason": "x" * 10_000}
        await ws.send_str(P.encode(P.Throttle(bad)))
        job = await api.submit("def main(x):\n    return x\n", list(range(20)))
        await api.wait(job)
        for _ in range(50):
            async with op.get(f"{api.url}/api/admin/volunteers") as resp:
                body = await resp.json()
            connected = {v["id"]: v for v in body["connected"]}
            recent = {v["id"]: v for v in body["recent"]}
            # the socket's state is set before the row is written: wait for both, decide on what is there
            if connected.get(me, {}).get("throttle") and recent.get(me, {}).get("throttle", {}).get("reasons"):
                break
            await asyncio.sleep(0.1)
    assert len(connected) == 3 and "throttled-one" not in connected
    assert connected[me]["throttle"]["paused"] is True and connected[me]["throttle"]["battery"] is None
    assert connected[me]["capabilities"]["cores"] == 8 and connected[me]["address"] == "127.0.0.1"
    assert recent[me]["throttle"]["reasons"] == ["battery low"] and "reason" not in recent[me]["throttle"]
    assert sum(v["tasks_done"] for v in recent.values()) == 20
    assert connected[me]["reputation"] == {  # operators see each volunteer's reputation
        "consecutive_validated": 0,
        "validated": 0,
        "invalid": 0,
        "last_invalid_at": None,
        "trusted": False,
    }
    assert body["throughput"] > 0 and "ready" in body


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_dashboard_page_and_openapi(serve, browser_session):
    api, app = await serve()
    async with api.session.get(f"{api.url}/dashboard") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        html = await resp.text()
    assert "%" not in re.sub(r"\d+%|%[0-9A-F]{2}", "", html), "a page variable was left unfilled"
    for name in codemirror_modules().values():
        assert name.endswith(".js") and name in html
        async with api.session.get(f"{api.url}{_vendor(html)}{name}") as resp:
            assert resp.status == 200, name
    documented = openapi.document(app)["paths"]
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith("/api/") and route.method != "HEAD":
            assert route.method.lower() in documented.get(path, {}), f"{route.method} {path} is not in OpenAPI"
    async with api.session.get(f"{api.url}/api/openapi.json") as resp:
        assert "/api/login" in (await resp.json())["paths"]


def _vendor(html: str) -> str:
    return re.search(r'(/vendor/pyscript/[^/"]+/)', html).group(1)


async def test_me_says_the_servers_default_replication(serve, browser_session):
    """The new-job form preselects the server's UVM_DEFAULT_REPLICATION: /api/me and /api/login say it."""
    for default in (3, "adaptive"):
        api, app = await serve(default_replication=default)
        email = f"def-{default}@example.org"
        await add_researcher(app, email)
        web = browser_session(api.url)
        assert (await sign_in(web, api.url, email))["default_replication"] == default
        async with web.get(f"{api.url}/api/me") as resp:
            assert (await resp.json())["default_replication"] == default

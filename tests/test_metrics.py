"""/metrics (Prometheus text, one registry per app, token or address access) and client addresses."""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from server import protocol as P
from server.config import Config
from server.web import appkeys as K
from server.web.addresses import client_address, client_scheme
from tests.test_keys import Holder

TOKEN = "metrics-token-0123456789"


async def scrape(api, token: str | None = TOKEN, **headers: str) -> dict[tuple, float]:  # noqa: ANN001
    """{(sample name, sorted label items): value}."""
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with api.session.get(f"{api.url}/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


async def test_counters_move_during_a_job(serve, volunteers):
    api, app = await serve(metrics_token=TOKEN)
    other, _ = await serve(metrics_token=TOKEN)  # a second app in this process: its own registry
    before = await scrape(api)
    assert total(before, "uvm_tasks_handed_out_total") == 0
    assert total(before, "uvm_database_up") == 1

    job = await api.submit("def main(x):\n    return x + 1\n", list(range(120)))
    async with aiohttp.ClientSession() as session:
        holder = Holder(api.url)
        held = await holder.take(session)  # one task stays leased: the job is running while we look
        await holder.ws.send_str(P.encode(P.Throttle({"paused": True, "workers": 0, "max_workers": 2})))
        volunteers(api.url, 2)
        while (await api.job(job))["counts"]["done"] < 119:
            await asyncio.sleep(0.05)
        during = await scrape(api)
        assert total(during, "uvm_tasks_handed_out_total") >= 120
        assert total(during, "uvm_attempts_finished_total", outcome="done") == 119
        assert total(during, "uvm_tasks", job_state="running", task_state="done") == 119
        assert total(during, "uvm_tasks", job_state="running", task_state="pending") == 1
        assert total(during, "uvm_jobs", state="running") == 1
        assert total(during, "uvm_queue_leases") >= 1
        assert total(during, "uvm_volunteers_connected") == 3
        assert total(during, "uvm_volunteers_by_throttle", state="paused") == 1
        assert total(during, "uvm_volunteers_by_throttle", state="unreported") == 2
        assert total(during, "uvm_result_commit_seconds_count") >= 1
        assert total(during, "uvm_http_request_seconds_count", route="/api/jobs/{job_id}", status="200") >= 1
        assert total(during, "uvm_http_request_seconds_count", route="/ws/volunteer") >= 3

        await holder.finish(held.input + 1)
    await api.wait(job)
    after = await scrape(api)
    assert total(after, "uvm_attempts_finished_total", outcome="done") == 120
    assert total(after, "uvm_jobs", state="done") == 1 and total(after, "uvm_jobs", state="running") == 0
    assert total(after, "uvm_tasks", job_state="done", task_state="done") == 120
    assert total(await scrape(other), "uvm_tasks_handed_out_total") == 0  # not counted twice


async def test_loop_restarts_are_exported(serve):
    api, app = await serve(metrics_token=TOKEN)
    app[K.dispatcher].loops["reaper"].restarts = 2  # as the loop supervisor counts them
    samples = await scrape(api)
    assert total(samples, "uvm_loop_restarts_total", loop="reaper") == 2


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_metrics_access(serve):
    api, _ = await serve(metrics_token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": "Basic x"}):
        async with api.session.get(f"{api.url}/metrics", headers=headers) as resp:
            assert resp.status == 403 and "UVM_METRICS_TOKEN" in await resp.text()
    await scrape(api)
    # an allowed network, no token; X-Forwarded-For is believed only from a trusted proxy
    api2, _ = await serve(metrics_allow=("127.0.0.0/8",))
    await scrape(api2, token=None)
    await scrape(api2, token=None, **{"X-Forwarded-For": "203.0.113.9"})  # not a trusted proxy: ignored
    api3, _ = await serve(metrics_allow=("127.0.0.0/8",), trusted_proxies=("127.0.0.1",))
    async with api3.session.get(f"{api3.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9"}) as resp:
        assert resp.status == 403  # the proxy says the client is outside the allowed network
    api4, _ = await serve()
    async with api4.session.get(f"{api4.url}/metrics") as resp:
        assert resp.status == 403  # nothing configured: nobody


def _request(remote: str, headers: dict[str, str], trusted: tuple[str, ...]) -> web.Request:
    app = web.Application()
    app[K.config] = Config(trusted_proxies=trusted)
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (remote, 4711) if name == "peername" else default
    return make_mocked_request("GET", "/", headers=headers, app=app, transport=transport)


@pytest.mark.parametrize(
    ("remote", "xff", "trusted", "expected"),
    [
        ("10.0.0.2", "198.51.100.7", (), "10.0.0.2"),  # no proxy trusted: headers ignored
        ("203.0.113.5", "198.51.100.7", ("10.0.0.0/8",), "203.0.113.5"),  # not from the proxy: ignored
        ("10.0.0.2", "198.51.100.7", ("10.0.0.0/8",), "198.51.100.7"),
        ("10.0.0.2", "1.2.3.4, 198.51.100.7", ("10.0.0.0/8",), "198.51.100.7"),  # a client's forged first hop
        ("10.0.0.2", "198.51.100.7, 10.0.0.9", ("10.0.0.0/8",), "198.51.100.7"),  # two proxies
        ("10.0.0.2", "not-an-ip", ("10.0.0.0/8",), "10.0.0.2"),
        ("10.0.0.2", "", ("10.0.0.0/8",), "10.0.0.2"),
        ("::1", "2001:db8::7", ("::1",), "2001:db8::7"),
    ],
)
def test_client_address(remote, xff, trusted, expected):
    headers = {"X-Forwarded-For": xff} if xff else {}
    assert client_address(_request(remote, headers, trusted)) == expected


def test_client_scheme():
    assert client_scheme(_request("10.0.0.2", {"X-Forwarded-Proto": "https"}, ("10.0.0.0/8",))) == "https"
    assert client_scheme(_request("203.0.113.5", {"X-Forwarded-Proto": "https"}, ("10.0.0.0/8",))) == "http"
    assert client_scheme(_request("10.0.0.2", {"X-Forwarded-Proto": "gopher"}, ("10.0.0.0/8",))) == "http"


def test_proxy_settings_are_checked():
    from server.config import ConfigError

    assert Config.from_env({"UVM_TRUSTED_PROXIES": "10.0.0.1, 192.168.0.0/16"}).trusted_proxies == (
        "10.0.0.1/32",
        "192.168.0.0/16",
    )
    with pytest.raises(ConfigError, match="UVM_TRUSTED_PROXIES"):
        Config.from_env({"UVM_TRUSTED_PROXIES": "proxy.example.org"})
    with pytest.raises(ConfigError, match="at least 16 characters"):
        Config.from_env({"UVM_METRICS_TOKEN": "short"})
    with pytest.raises(ConfigError, match="UVM_METRICS_ALLOW"):
        Config.from_env({"UVM_METRICS_ALLOW": "10.0.0.0/33"})
    with pytest.raises(ConfigError, match="expected text or json"):
        Config.from_env({"UVM_LOG_FORMAT": "xml"})


def test_throttle_labels_come_from_a_fixed_set():
    """A volunteer's throttle state is its own claim: it picks one of our labels, never names a new one."""
    from server.jobs.metrics import THROTTLE_STATES, throttle_state

    cases = {
        "unreported": [{}],
        "paused": [{"paused": True, "reasons": ["battery"]}],
        "throttled": [{"reasons": ["cpu cap"]}, {"workers": 1, "max_workers": 4}],
        "full": [
            {"paused": "yes"},
            {"workers": "1", "max_workers": 4},
            {"x" * 1000: 1},
            {"workers": 2, "max_workers": 2},
        ],
    }
    for label, states in cases.items():
        assert label in THROTTLE_STATES
        for state in states:
            assert throttle_state(state) == label, state

"""Worker count and throttling, with the device faked by init scripts; the server sees the state."""

from __future__ import annotations

import time

import pytest

from e2e.conftest import fake_device, open_volunteer_page, wait_state


@pytest.fixture(scope="module")
def server(live_server):
    return live_server()


def start(page) -> None:  # noqa: ANN001
    page.get_by_role("button", name="Start").click()
    wait_state(page, lambda s: s["running"] and s["welcomed"])


def server_throttle(server, page, predicate, timeout: float = 15.0) -> dict:  # noqa: ANN001
    """Poll the server's record of this page's volunteer until its throttle state matches."""
    volunteer = page.evaluate("localStorage.getItem('uvm.volunteer')")
    end = time.monotonic() + timeout
    while True:
        # 404 until the volunteer's row is written: its hello's row is written in the background
        status, body = server.request("GET", f"/api/volunteers/{volunteer}", auth=False)
        assert status in (200, 404), body
        throttle = body["throttle"] if status == 200 else None
        if throttle and predicate(throttle):
            return throttle
        assert time.monotonic() < end, f"server saw {throttle}"
        page.wait_for_timeout(200)


def n_workers(snap: dict) -> int:
    return len(snap["workers"])


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (4, 3)])  # 2 cores -> 1: every other test
def test_worker_count_follows_hardware_concurrency(browser, server, cores: int, expected: int) -> None:
    context = browser.new_context()
    context.add_init_script(fake_device(cores=cores))
    page = open_volunteer_page(context, server)
    start(page)
    snap = wait_state(page, lambda s: n_workers(s) == expected)
    assert snap["plan"]["max_workers"] == expected
    assert f"{cores} cores" in page.locator("#reasons").inner_text()
    server_throttle(server, page, lambda t: t["workers"] == expected and t["cores"] == cores)
    context.close()


def test_cpu_cap_limits_workers_and_is_remembered(browser, server) -> None:
    context = browser.new_context()
    context.add_init_script(fake_device(cores=8))
    page = open_volunteer_page(context, server)
    start(page)
    wait_state(page, lambda s: n_workers(s) == 7)
    page.locator("#cap").fill("50")
    wait_state(page, lambda s: n_workers(s) == 4 and s["settings"]["cpu_cap"] == 50)
    server_throttle(server, page, lambda t: t["workers"] == 4 and t["cpu_cap"] == 50)
    page.locator("#cap").fill("25")
    wait_state(page, lambda s: n_workers(s) == 2)
    page.reload()
    page.wait_for_function("() => window.uvm_state", timeout=60_000)
    snap = wait_state(page, lambda s: s["running"] and n_workers(s) == 2)  # cap and Start remembered
    assert snap["settings"]["cpu_cap"] == 25
    assert page.locator("#cap").input_value() == "25"
    context.close()


def test_battery_and_network_throttle_workers_and_the_server_sees_it(browser, server) -> None:
    context = browser.new_context()
    context.add_init_script(
        fake_device(cores=4, battery={"charging": True, "level": 0.9}, connection={"effectiveType": "4g"})
    )
    page = open_volunteer_page(context, server)
    start(page)
    wait_state(page, lambda s: n_workers(s) == 3 and s["plan"]["prefetch"] == 3)
    server_throttle(server, page, lambda t: t["workers"] == 3 and t["battery"] == {"charging": True, "level": 0.9})

    page.evaluate("__uvmFake.battery.charging = false; __uvmFake.battery.level = 0.5; __uvmFake.fire()")
    wait_state(page, lambda s: n_workers(s) == 1 and not s["plan"]["paused"])  # on battery: fewer
    server_throttle(server, page, lambda t: t["workers"] == 1 and t["battery"]["charging"] is False)

    page.evaluate("__uvmFake.battery.level = 0.1; __uvmFake.fire()")
    wait_state(page, lambda s: n_workers(s) == 0 and s["plan"]["paused"])  # low: pause
    assert page.locator("body").get_attribute("data-state") == "paused"
    assert "Battery low" in page.locator("#status-detail").inner_text()
    server_throttle(server, page, lambda t: t["paused"] is True and t["workers"] == 0)

    page.evaluate("__uvmFake.battery.charging = true; __uvmFake.connection.effectiveType = '2g'; __uvmFake.fire()")
    snap = wait_state(page, lambda s: n_workers(s) == 3 and s["plan"]["batch_results"])
    assert snap["plan"]["prefetch"] == 0  # slow connection: no prefetch, results in batches
    server_throttle(server, page, lambda t: t["batch_results"] is True and t["prefetch"] == 0)

    page.evaluate("__uvmFake.connection.effectiveType = '4g'; __uvmFake.connection.saveData = true; __uvmFake.fire()")
    wait_state(page, lambda s: s["plan"]["batch_results"] and "data saver" in " ".join(s["plan"]["reasons"]))
    context.close()


def test_missing_apis_are_said_on_the_page(browser, server) -> None:
    context = browser.new_context()
    context.add_init_script(
        fake_device(cores=2)
        + "\ndelete Navigator.prototype.getBattery;"
        + "\nObject.defineProperty(Navigator.prototype, 'connection', {get: () => undefined});"
    )
    page = open_volunteer_page(context, server)
    start(page)
    snap = wait_state(page, lambda s: n_workers(s) == 1)
    assert snap["device"]["battery"] is None and snap["device"]["network"] is None
    chips = page.locator("#device").inner_text()
    assert "work not kept" not in chips  # IndexedDB and WebCrypto are there
    assert "battery: not reported by this browser" in chips
    assert "network: not reported by this browser" in chips
    context.close()


def test_hidden_tab_follows_the_volunteers_choice(browser, server) -> None:
    context = browser.new_context()
    context.add_init_script(
        fake_device(cores=4) + "\nObject.defineProperty(Document.prototype, 'visibilityState',"
        " {get: () => (window.__hidden ? 'hidden' : 'visible')});"
    )
    page = open_volunteer_page(context, server)
    start(page)
    wait_state(page, lambda s: n_workers(s) == 3)
    page.locator("#when-hidden").select_option("one")
    page.evaluate("window.__hidden = true; document.dispatchEvent(new Event('visibilitychange'))")
    wait_state(page, lambda s: n_workers(s) == 1 and s["device"]["hidden"])
    page.locator("#when-hidden").select_option("pause")
    wait_state(page, lambda s: n_workers(s) == 0 and s["plan"]["paused"])
    server_throttle(server, page, lambda t: t["hidden"] is True and t["paused"] is True)
    page.evaluate("window.__hidden = false; document.dispatchEvent(new Event('visibilitychange'))")
    wait_state(page, lambda s: n_workers(s) == 3 and not s["plan"]["paused"])
    context.close()


def test_without_webcrypto_work_still_runs_and_the_page_says_so(browser, server) -> None:
    # As on a page served over plain http to another machine: no crypto.subtle there.
    context = browser.new_context()
    context.add_init_script(
        fake_device(cores=2) + "\nObject.defineProperty(Crypto.prototype, 'subtle', {get: () => undefined});"
    )
    page = open_volunteer_page(context, server)
    start(page)
    job = server.submit("def main(x):\n    return x + 1\n", [1, 2, 3], name="no-webcrypto", timeout=10)
    assert server.wait(job, timeout=60, page=page)["state"] == "done"
    assert "work not kept across reloads: WebCrypto needs https" in page.locator("#device").inner_text()
    context.close()

"""The volunteer page works with the server on both backends: SQLite and MariaDB + Redis."""

from __future__ import annotations

import pytest

from e2e.conftest import fake_device, native_results, open_volunteer_page, wait_state

CODE = """
import hashlib

def main(x):
    return hashlib.sha256(str(x).encode()).hexdigest()[:12]
"""


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"])
def test_page_runs_a_job_on_each_backend(browser, live_server, backend: str) -> None:
    server = live_server(backend)
    inputs = {"range": [0, 40, 1]}
    job = server.submit(CODE, inputs, name=f"hash-{backend}", timeout=10)
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    page.get_by_role("button", name="Start").click()
    done = server.wait(job, timeout=60, page=page)
    assert done["state"] == "done", done
    results = server.results(job)
    assert [r["result"] for r in results] == native_results(CODE, list(range(40)))
    wait_state(page, lambda s: s["session"]["tasks"] == 40 and not s["unacked"])
    volunteer = page.evaluate("localStorage.getItem('uvm.volunteer')")
    assert server.volunteer(volunteer)["tasks_done"] == 40
    context.close()


def test_an_idle_page_grows_its_unanswered_heartbeats_then_gets_work_pushed(browser, live_server) -> None:
    """Protocol 6: the page's ready is answered by one `wait`; its idle heartbeats, each interval
    doubling up to the longest (4 s here), go unanswered; a job then reaches it without its asking."""
    server = live_server("sqlite", UVM_HEARTBEAT="1", UVM_IDLE_HEARTBEAT="4")
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    page.get_by_role("button", name="Start").click()
    snap = wait_state(page, lambda s: s["counts"]["idle_heartbeats"] >= 3, timeout=60)
    assert snap["idle_beat"] == 4.0 and snap["counts"]["wait_messages"] < snap["counts"]["idle_heartbeats"], snap
    job = server.submit(CODE, {"range": [0, 4, 1]}, name="after-idle", timeout=10)
    done = server.wait(job, timeout=60, page=page)
    assert done["state"] == "done", done
    context.close()

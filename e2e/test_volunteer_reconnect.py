"""A server restart mid-job: the page reconnects with backoff, re-sends what was not
acknowledged, and the job completes with every result recorded once."""

from __future__ import annotations

from e2e.conftest import fake_device, native_results, open_volunteer_page, wait_state

WORK = """
import time

def main(x):
    end = time.time() + 0.25
    while time.time() < end:
        pass
    return x * 3
"""


def test_server_restart_mid_job_loses_nothing(browser, live_server) -> None:
    server = live_server()
    inputs = list(range(24))
    job = server.submit(WORK, inputs, name="restart", timeout=20, max_attempts=3)
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    page.get_by_role("button", name="Start").click()
    wait_state(page, lambda s: s["session"]["tasks"] >= 4)
    server.stop()
    wait_state(page, lambda s: not s["welcomed"] and s["failures"] >= 1)
    page.wait_for_timeout(1500)  # work goes on while the server is away; results wait in the vault
    assert page.locator("body").get_attribute("data-state") == "offline"
    server.restart()
    wait_state(page, lambda s: s["welcomed"], timeout=60)  # reconnected by itself
    done = server.wait(job, timeout=90, page=page)
    assert done["state"] == "done", done
    assert done["counts"]["done"] == len(inputs)
    assert [r["result"] for r in server.results(job)] == native_results(WORK, inputs)
    wait_state(page, lambda s: not s["unacked"])
    context.close()

"""Long tasks in Chromium (issue 10, done-when 2 and 3): a tab closed mid-task and a second tab
resuming from the last checkpoint the server kept; a refresh resuming from the tab's own vault;
the dashboard's job view showing the running task's progress."""

from __future__ import annotations

import dataclasses
import json
import uuid

from e2e.conftest import _cli, fake_device, open_volunteer_page, reload_watching_frames, state, wait_state
from e2e.test_dashboard_flow import PASSWORD, signed_in

# 24 steps of ~0.8 s, a checkpoint at each; the result says at which step each attempt started.
STEPS = """
import time
import uvm

def main(x):
    state = uvm.restore() or {"step": 0, "total": 0, "starts": []}
    state["starts"].append(state["step"])
    for step in range(state["step"], 24):
        end = time.time() + 0.8
        while time.time() < end:
            pass
        state["total"] += step * x
        state["step"] = step + 1
        uvm.checkpoint(state)  # before progress: an update then carries this step's state
        uvm.progress(state["step"] / 24)
        if state["step"] % 6 == 0:
            uvm.partial({"step": state["step"]})
    return {"total": state["total"], "starts": state["starts"]}
"""
EXPECTED_TOTAL = 5 * sum(range(24))


def _start(context, server):  # noqa: ANN001, ANN202
    page = open_volunteer_page(context, server)
    page.get_by_role("button", name="Start").click()
    return page


def _progress(server, job: int) -> float:  # noqa: ANN001
    entries = server.job(job).get("progress") or []
    return entries[0]["progress"] if entries else 0.0


def _wait_progress(server, job: int, page, at_least: float, timeout: float = 90.0) -> float:  # noqa: ANN001
    end = page.evaluate("Date.now()") + timeout * 1000
    while (seen := _progress(server, job)) < at_least:
        assert page.evaluate("Date.now()") < end, f"progress stayed at {seen}: {json.dumps(state(page))[:2000]}"
        page.wait_for_timeout(200)
    return seen


def test_closed_tab_hands_its_checkpoint_to_a_second_tab(browser, live_server, screenshots) -> None:
    server = live_server(UVM_CHECKPOINT_EVERY="0.5")
    email = f"long-{uuid.uuid4().hex[:8]}@example.org"
    token = _cli(server.env, "researcher", "add", email, "--password-stdin", stdin=PASSWORD + "\n")
    server = dataclasses.replace(server, token=token.strip().splitlines()[-1].strip())
    job = server.submit(STEPS, [5], name="long monte carlo", timeout=600)
    dashboard = signed_in(browser, server, email)  # open before the task starts: Pyodide boots meanwhile
    dashboard.goto(f"{server.url}/dashboard#/job/{job}")
    dashboard.wait_for_selector("#view-job:not([hidden])")
    first = browser.new_context()
    first.add_init_script(fake_device(cores=1))
    page = _start(first, server)
    seen = _wait_progress(server, job, page, 0.25)
    # Live feedback before the task finishes: partial results in the export, progress in the job view.
    [row] = server.results(job)
    assert row["state"] == "open" and row["partials"] and row["partials"][0] == {"step": 6}
    bar = dashboard.wait_for_selector('#job-running li[data-task="0"]')
    shown = float(bar.inner_text().split()[-1].rstrip("%"))
    assert 0 < shown < 100, bar.inner_text()
    dashboard.screenshot(path=str(screenshots / "long-task-job-view.png"), full_page=True)
    dashboard.context.close()
    seen = max(seen, _progress(server, job))
    assert server.job(job)["state"] == "running"  # still mid-task (on a slow machine: make the steps longer)
    first.close()  # the tab closes mid-task: the server puts the task back at once

    second = browser.new_context()  # another volunteer: its own id, its own vault
    second.add_init_script(fake_device(cores=1))
    other = _start(second, server)
    done = server.wait(job, timeout=120, page=other)
    assert done["state"] == "done", done
    [row] = server.results(job)
    starts = row["result"]["starts"]
    assert row["result"]["total"] == EXPECTED_TOTAL
    # The second attempt began where the first one's last checkpoint was, not from zero.
    assert starts[0] == 0 and len(starts) == 2 and round(seen * 24) <= starts[1] < 24, (seen, starts)
    assert [p["step"] for p in row["partials"]][-1] == 24
    other.screenshot(path=str(screenshots / "long-task-second-tab.png"), full_page=True)
    second.close()


def test_refresh_resumes_from_the_tabs_own_vault(browser, live_server, screenshots) -> None:
    server = live_server(UVM_CHECKPOINT_EVERY="0.5")
    job = server.submit(STEPS, [5], name="refresh me", timeout=600)
    context = browser.new_context()
    context.add_init_script(fake_device(cores=1))
    page = _start(context, server)
    seen = _wait_progress(server, job, page, 0.3)
    frames = reload_watching_frames(page)
    after = wait_state(page, lambda s: s["running"])
    assert after["restored_tasks"], after  # the task came back from the vault
    done = server.wait(job, timeout=120, page=page)
    assert done["state"] == "done", done
    # No server round trip: the task (and its checkpoint) was not sent to this tab again.
    assert not [t for f in frames if f["type"] == "tasks" for t in f["tasks"]]
    [row] = server.results(job)
    starts = row["result"]["starts"]
    assert row["result"]["total"] == EXPECTED_TOTAL
    assert starts[0] == 0 and len(starts) == 2 and round(seen * 24) <= starts[1] < 24, (seen, starts)
    page.screenshot(path=str(screenshots / "long-task-after-refresh.png"), full_page=True)
    context.close()

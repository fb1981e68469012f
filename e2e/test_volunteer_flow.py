"""The volunteer page against the real server (SQLite default): work flows, timeouts, refresh."""

from __future__ import annotations

import json

import pytest

from e2e.conftest import fake_device, native_results, open_volunteer_page, reload_watching_frames, state, wait_state

SQUARES = """
def main(x):
    total = 0
    for i in range(x % 97):
        total += i * i
    print("x =", x)
    return {"x": x, "total": total, "half": x / 2}
"""

RUNAWAY = """
def main(x):
    if x == 1:
        while True:
            pass
    if x == 2:
        while True:
            try:
                while True:
                    pass
            except BaseException:
                pass
    return x * 10
"""

# Over a second a task (UVM_CHUNK_TARGET's default): always handed out as single tasks, which are the
# ones the vault keeps across a reload or a Stop (chunks are requeued by the server instead).
STEADY = """
import time

def main(x):
    end = time.time() + 1.1
    while time.time() < end:
        pass
    return x + 1000
"""


@pytest.fixture(scope="module")
def server(live_server):
    return live_server()


def start(page) -> None:  # noqa: ANN001
    page.get_by_role("button", name="Start").click()
    wait_state(page, lambda s: s["running"])


def started_pages(browser, server, n: int, cores: int) -> list:  # noqa: ANN001
    """``n`` volunteer pages, each in a context of its own on a device of ``cores``, all started."""
    pages = []
    for _ in range(n):
        context = browser.new_context()
        context.add_init_script(fake_device(cores=cores))
        pages.append(open_volunteer_page(context, server))
    for page in pages:
        start(page)
    return pages


def test_two_pages_complete_a_200_task_job_like_native(browser, server) -> None:
    inputs = list(range(200))
    job = server.submit(SQUARES, inputs, name="squares", timeout=30, max_attempts=2)
    pages = started_pages(browser, server, 2, cores=2)
    done = server.wait(job, timeout=90, page=pages[0])
    assert done["state"] == "done", done
    results = server.results(job)
    assert [r["index"] for r in results] == inputs
    assert [r["result"] for r in results] == native_results(SQUARES, inputs)
    assert all(r["error"] is None and r["state"] == "done" for r in results)
    assert results[3]["output"] == "x = 3\n"
    worked = [wait_state(p, lambda s: not s["unacked"])["session"]["tasks"] for p in pages]
    assert sum(worked) >= 200 and all(n > 0 for n in worked), worked  # both pages computed
    for page in pages:
        page.context.close()


def test_runaway_tasks_are_stopped_at_their_timeout_and_reported(browser, server) -> None:
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    start(page)
    job = server.submit(RUNAWAY, [0, 1, 2, 3, 4, 5], name="runaway", timeout=2, max_attempts=1)
    done = server.wait(job, timeout=60, page=page)
    assert done["state"] == "failed", done
    results = {r["index"]: r for r in server.results(job)}
    for index in (0, 3, 4, 5):  # tasks after the runaways ran on the replacement worker
        assert results[index]["result"] == index * 10 and results[index]["state"] == "done"
    for index in (1, 2):
        assert results[index]["state"] == "failed"
        assert "timed out after 2 s" in results[index]["error"]
    errors = json.dumps(server.errors(job))
    assert "timed out after 2 s" in errors
    snap = state(page)
    assert snap["replaced"] >= 2 and snap["session"]["timeouts"] == 2
    assert page.get_by_role("button", name="Stop").is_enabled()  # the page stayed responsive
    context.close()


def test_refresh_resumes_cached_tasks_without_downloading_them_again(browser, server) -> None:
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    inputs = list(range(8))
    job = server.submit(STEADY, inputs, name="slow", timeout=20, max_attempts=2)
    start(page)
    # Wait until it holds a running task and a prefetched one, and some results are in.
    before = wait_state(
        page, lambda s: len(s["queued"]) >= 1 and any(w["attempt"] for w in s["workers"]) and s["session"]["tasks"] >= 2
    )
    # Only single tasks are kept in the vault; a chunk held at the reload is requeued by the server
    # when the socket closes and may come back to this page (see chunked in webapp/volunteer/main.py).
    held_tasks = set(before["kept_tasks"])
    frames = reload_watching_frames(page)
    after = wait_state(page, lambda s: s["running"])
    # Decided on what the vault held at the reload (a task sampled above may have finished since).
    restored = set(after["restored_tasks"])
    assert restored, after
    held_tasks |= restored
    done = server.wait(job, timeout=60, page=page)
    assert done["state"] == "done", done
    received = [t["task"] for f in frames if f["type"] == "tasks" for t in f["tasks"]]
    assert not held_tasks & set(received), (held_tasks, received)  # not downloaded again
    assert not [f for f in frames if f["type"] == "code"]  # job code came from the vault
    results = server.results(job)
    assert [r["result"] for r in results] == native_results(STEADY, inputs)
    assert done["counts"]["done"] == len(inputs)  # each recorded once
    context.close()


LONG = """
import time

def main(x):
    end = time.time() + 30
    while time.time() < end:
        pass
    return x
"""


def test_cancelled_job_stops_on_the_page(browser, server) -> None:
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    start(page)
    job = server.submit(LONG, [0, 1, 2], name="long", timeout=60)
    wait_state(page, lambda s: s["running_tasks"] and s["queued"])
    status, body = server.request("POST", f"/api/jobs/{job}/cancel")
    assert status in (200, 202), body
    # The running attempt is stopped (its worker replaced) and the held one dropped, long
    # before the 30 s task could have finished; nothing is reported for them.
    snap = wait_state(page, lambda s: not s["running_tasks"] and not s["queued"], timeout=15)
    assert snap["replaced"] >= 1 and snap["session"]["tasks"] == 0 and not snap["unacked"]
    assert server.job(job)["state"] == "cancelled"
    context.close()


PROBE = """
import js

def main(x):
    seen = {"indexedDB": str(getattr(js, "indexedDB", None)), "caches": str(getattr(js, "caches", None))}
    for name, url in (("api", "/api/health"), ("page", "/"), ("other", "http://example.org/")):
        try:
            request = js.XMLHttpRequest.new()
            request.open("GET", url, False)
            request.send()
            seen[name] = request.status
        except Exception as exc:
            seen[name] = "blocked: " + type(exc).__name__
    return seen
"""


def test_research_code_cannot_reach_the_api_or_the_vault(browser, server) -> None:
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    start(page)
    job = server.submit(PROBE, [0], name="probe", timeout=20)
    assert server.wait(job, timeout=60, page=page)["state"] == "done"
    seen = server.results(job)[0]["result"]
    assert seen["indexedDB"] == "None" and seen["caches"] == "None", seen
    for name in ("api", "page", "other"):  # connect-src; nested workers are refused by worker-src
        assert str(seen[name]).startswith("blocked"), seen
    context.close()


def test_start_pressed_before_the_pages_python_is_up(browser, server) -> None:
    job = server.submit(SQUARES, [5, 6, 7], name="early-start", timeout=30)
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = context.new_page()
    page.goto(server.url + "/")
    page.get_by_role("button", name="Start").click()  # the inline script takes it, starts a worker
    page.get_by_role("button", name="Stop").wait_for(timeout=5_000)
    page.wait_for_function("() => window.uvm_state", timeout=60_000)
    assert state(page)["running"]  # Python picked up the choice
    assert server.wait(job, timeout=60, page=page)["state"] == "done"
    context.close()


def test_stop_stops_at_once_and_start_resumes_what_it_held(browser, server) -> None:
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    inputs = list(range(6))
    job = server.submit(STEADY, inputs, name="stop-start", timeout=20, max_attempts=2)
    start(page)
    wait_state(page, lambda s: s["running_tasks"] and s["queued"] and s["session"]["tasks"] >= 1)
    frames: list[dict] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(json.loads(payload))))
    page.get_by_role("button", name="Stop").click()
    # Decided on what Stop actually held (running and waiting at the click), not on an earlier sample:
    # a task running when such a sample was taken can finish before the click. Kept, not lost:
    stopped = wait_state(
        page,
        lambda s: not s["running"] and not s["workers"] and set(s["held_at_stop"]) <= set(s["queued_tasks"]),
        timeout=5,
    )
    assert page.locator("body").get_attribute("data-state") == "stopped"
    held = set(stopped["held_at_stop"])
    assert held, stopped
    page.get_by_role("button", name="Start").click()
    assert server.wait(job, timeout=60, page=page)["state"] == "done"
    received = [t["task"] for f in frames if f["type"] == "tasks" for t in f["tasks"]]
    assert not held & set(received), (held, received)
    assert [r["result"] for r in server.results(job)] == native_results(STEADY, inputs)
    context.close()


TINY = """
def main(x):
    if x == 77:
        raise ValueError("seventy-seven")
    return x * x + 1
"""


def test_pages_run_a_chunked_job_in_few_worker_calls(browser, server) -> None:
    """Protocol 5: tiny tasks go out in chunks, each run in one call of a worker; every result is
    right and recorded once, and a task's error stays that task's (two pages corroborate it)."""
    inputs = list(range(600))
    job = server.submit(TINY, inputs, name="tiny", timeout=30, max_attempts=2)
    pages = started_pages(browser, server, 2, cores=1)
    done = server.wait(job, timeout=120, page=pages[0])
    assert done["state"] == "failed" and done["counts"]["done"] == 599 and done["counts"]["failed"] == 1, done
    results = server.results(job)
    assert [r["index"] for r in results] == inputs
    for r in results:
        if r["index"] == 77:
            assert r["state"] == "failed" and "seventy-seven" in r["error"], r
        else:
            assert r["state"] == "done" and r["result"] == r["index"] ** 2 + 1 and r["error"] is None, r
    seen = [wait_state(p, lambda s: not s["unacked"])["counts"] for p in pages]
    assert sum(c["chunks"] for c in seen) >= 2, seen
    assert sum(c["chunked_tasks"] for c in seen) >= 400, seen  # most tasks went out in chunks
    assert sum(c["tasks_messages"] for c in seen) < 150, seen  # not a message per task
    for page in pages:
        page.context.close()


CRASHES = """
import os

def main(x):
    if x == 150:
        os._exit(1)  # the worker's interpreter exits: the worker fails, whatever else its chunk held
    return x * x + 1
"""


def test_a_chunk_whose_worker_crashes_charges_only_the_task_that_crashes_it(browser, server) -> None:
    """A task that crashes its worker, inside a chunk: the page reports the chunk's tasks ``lost``, the
    server gives them all back uncharged and hands the job out one task at a time, where only the
    task that crashes its worker is charged. With max_attempts=1, every other task is done."""
    inputs = list(range(400))
    job = server.submit(CRASHES, inputs, name="crashes", timeout=30, max_attempts=1)
    (page,) = started_pages(browser, server, 1, cores=1)
    done = server.wait(job, timeout=120, page=page)
    assert done["counts"]["done"] == 399 and done["counts"]["failed"] == 1, done
    failed = [r for r in server.results(job) if r["state"] == "failed"]
    assert [r["index"] for r in failed] == [150] and "worker error" in failed[0]["error"], failed
    counts = wait_state(page, lambda s: not s["unacked"])["counts"]
    assert counts["lost_chunks"] >= 1 and counts["chunks"] >= 2, counts  # it crashed inside a chunk

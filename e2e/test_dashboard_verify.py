"""Verified results on the dashboard (issue 8), in Debian's Chromium against the real server.

The new-job form's verification choice preselects the server's default (adaptive here), explains
each choice and its cost, refuses bad values as they are typed (and never submits them), and sends
what the API accepts (replication 3 with a quorum, a replica limit and a float tolerance). The job
view shows the validation state from the job status: results waiting for a second volunteer (one
simulated volunteer alone), then, with a second honest one and one that forges every result,
"2/3" and 3 replicas per task, disagreements, and tasks that failed with "no agreement", each
listing its variants. Screenshots: ``e2e/screenshots/dashboard-verify-*.png``, phone and desktop.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from e2e.conftest import ROOT, LiveServer
from e2e.test_dashboard_flow import DESKTOP, PHONE, READY_MS, add_account, go, open_dashboard, shot, sign_in, write_code

CODE = "def main(x):\n    return {'x': x, 'sq': x * x}\n"


@pytest.fixture(scope="module")
def server(live_server) -> LiveServer:
    return live_server(UVM_DEFAULT_REPLICATION="adaptive")  # the real default (conftest sets 1 for other tests)


@pytest.fixture(scope="module")
def page(browser, server):  # noqa: ANN001, ANN201
    """One signed-in researcher's tab (one Pyodide boot for the module)."""
    email = add_account(server)
    tab = open_dashboard(browser, server, DESKTOP)
    sign_in(tab, email)
    tab.wait_for_selector("#view-jobs:not([hidden])")
    posts: list[dict] = []
    tab.on(
        "request",
        lambda r: posts.append(r.post_data_json) if r.method == "POST" and r.url.endswith("/api/jobs") else None,
    )
    tab.posted = posts  # what reached the API from this page, in order
    yield tab
    tab.context.close()


@pytest.fixture(scope="module")
def sims(server):  # noqa: ANN001, ANN201
    """Simulated volunteers started on demand (``sims.start(lie_rate=...)``), all stopped at the end."""

    class Sims:
        procs: list[subprocess.Popen] = []

        def start(self, lie_rate: float = 0.0) -> None:
            args = [sys.executable, "-m", "server.cli", "volunteer-sim", "--server", server.url, "--count", "1"]
            self.procs.append(
                subprocess.Popen(
                    [*args, "--quiet", "--lie-rate", str(lie_rate)],
                    cwd=ROOT,
                    env=server.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    sims = Sims()
    yield sims
    for proc in sims.procs:
        proc.terminate()
        proc.wait(10)


def new_job(page, name: str, inputs: list) -> None:  # noqa: ANN001
    go(page, "#/new", "new")
    write_code(page, CODE)
    page.fill("#inputs-json", json.dumps(inputs))
    page.fill("#opt-name", name)


def submit(page) -> int:  # noqa: ANN001
    before = len(page.posted)
    page.click("#submit-button")
    page.wait_for_function("location.hash.startsWith('#/job/')")
    assert len(page.posted) == before + 1
    return int(page.evaluate("location.hash").rsplit("/", 1)[1])


def api(page, server: LiveServer, path: str):  # noqa: ANN001, ANN201
    """GET the API as the page's researcher (its session cookie: the jobs are that researcher's)."""
    response = page.request.get(server.url + path)
    assert response.ok, response.text()
    return response.json()


def wait_ended(page, server: LiveServer, job_id: int, timeout_ms: int = 120_000) -> dict:  # noqa: ANN001
    for _ in range(timeout_ms // 250):
        job = api(page, server, f"/api/jobs/{job_id}")
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        page.wait_for_timeout(250)
    raise AssertionError(f"job {job_id} did not end: {job}")


def more(page) -> None:  # noqa: ANN001
    """Open "Quorum, replica limit, float tolerance" (it stays as the researcher left it)."""
    if not page.evaluate("document.querySelector('.verify-more').open"):
        page.click(".verify-more summary")


def fixed(page, k: str, quorum: str, most: str, rtol: str, atol: str) -> None:  # noqa: ANN001
    """Choose k volunteers per task and type the other verification fields."""
    page.fill("#verify-k", k)
    more(page)
    for element_id, value in (("quorum", quorum), ("max", most), ("rtol", rtol), ("atol", atol)):
        page.fill(f"#verify-{element_id}", value)


def verify_error(page) -> str:  # noqa: ANN001
    page.wait_for_selector("#verify-error:not([hidden])")
    return page.inner_text("#verify-error")


def invalid(page) -> list[str]:  # noqa: ANN001
    return page.eval_on_selector_all("#verify [aria-invalid=true]", "els => els.map(e => e.id)")


def stat(page, name: str) -> str:  # noqa: ANN001
    return page.inner_text(f"#job-validation [data-stat={name}] .stat-value")


def test_form_offers_the_choice_and_refuses_bad_values(page, screenshots) -> None:  # noqa: ANN001
    new_job(page, "not to be sent", [1, 2, 3])
    assert page.is_checked("input[name=verify-mode][value=adaptive]")  # the server's default ...
    assert page.is_visible("[data-default=adaptive]") and page.is_hidden("[data-default=fixed]")  # ... said so
    assert "≈1.1 results per task" in page.inner_text("#verify-explain")
    assert page.is_disabled("#verify-quorum")  # adaptive has no quorum to set

    page.fill("#verify-k", "11")  # typing k picks the fixed choice
    assert page.is_checked("input[name=verify-mode][value=fixed]")
    assert verify_error(page) == "Volunteers per task must be between 1 and 10."
    assert invalid(page) == ["verify-k"]
    page.fill("#verify-k", "3")
    page.wait_for_selector("#verify-error", state="hidden")
    assert invalid(page) == []
    assert page.inner_text("#verify-explain") == (
        "3 volunteers compute each task and 2 must agree. Cost: 3 results per task (up to 6 when they disagree)."
    )
    more(page)
    page.fill("#verify-quorum", "1")
    assert verify_error(page) == "The quorum must be between 2 (a majority of 3) and 3 (all)."
    assert invalid(page) == ["verify-quorum"]
    page.fill("#verify-quorum", "")
    page.fill("#verify-max", "30")
    assert verify_error(page) == "Max replicas must be between 3 and 20."
    page.fill("#verify-max", "")
    page.fill("#verify-rtol", "tiny")
    assert verify_error(page) == "Rtol must be a number such as 1e-9."
    assert invalid(page) == ["verify-rtol"]

    sent = len(page.posted)
    page.click("#submit-button")  # refused here: nothing reaches the API
    page.wait_for_timeout(300)
    assert len(page.posted) == sent and page.is_visible("#view-new")
    assert verify_error(page) == "Rtol must be a number such as 1e-9."
    shot(page, screenshots, "verify-form-error-desktop")
    page.set_viewport_size(PHONE)
    page.locator("#verify").scroll_into_view_if_needed()
    shot(page, screenshots, "verify-form-error-phone")
    page.set_viewport_size(DESKTOP)
    page.fill("#verify-rtol", "")
    page.check("input[name=verify-mode][value=adaptive]")
    page.wait_for_selector("#verify-error", state="hidden")
    assert page.is_disabled("#verify-quorum")


def test_adaptive_results_wait_for_a_second_volunteer(page, server, sims, screenshots) -> None:  # noqa: ANN001
    new_job(page, "adaptive squares", [1, 2, 3, 4])
    assert page.is_checked("input[name=verify-mode][value=adaptive]")
    job_id = submit(page)
    assert page.posted[-1]["replication"] == "adaptive"
    sims.start()  # one honest volunteer: it cannot confirm its own results
    page.wait_for_selector("#waiting-note", timeout=READY_MS)
    page.wait_for_function(
        "document.querySelector('#job-validation [data-stat=waiting] .stat-value').textContent === '4'",
        timeout=READY_MS,
    )
    note = page.inner_text("#waiting-note")
    assert note.startswith("4 results waiting for a second volunteer to confirm.") and "private window" in note
    assert api(page, server, f"/api/jobs/{job_id}")["validation"]["pending_validation"] == 4
    assert "adaptive: trusted volunteers are spot-checked" in page.inner_text("#job-validation")
    page.wait_for_function(
        "document.getElementById('job-results').textContent.includes('1 result in, waiting for confirmation')"
    )
    shot(page, screenshots, "verify-waiting-desktop")
    page.set_viewport_size(PHONE)
    shot(page, screenshots, "verify-waiting-phone")
    page.set_viewport_size(DESKTOP)


def test_replication_three_with_tolerance_and_a_forger(page, server, sims, screenshots) -> None:  # noqa: ANN001
    new_job(page, "three of us", [1, 2, 3, 4, 5])
    fixed(page, k="3", quorum="2", most="4", rtol="1e-9", atol="0")
    assert "3 volunteers compute each task and 2 must agree" in page.inner_text("#verify-explain")
    shot(page, screenshots, "verify-form-three-desktop")
    three = submit(page)
    assert page.posted[-1] == {
        "code": CODE,
        "inputs": [1, 2, 3, 4, 5],
        "name": "three of us",
        "description": "",
        "timeout": 60.0,
        "max_attempts": 3,
        "priority": 0,
        "requirements": [],
        "replication": 3,
        "quorum": 2,
        "max_replicas": 4,
        "tolerance": {"rtol": 1e-9, "atol": 0.0},
    }
    job = api(page, server, f"/api/jobs/{three}")
    assert (job["replication"], job["quorum"], job["max_replicas"], job["tolerance"]) == (
        3,
        2,
        4,
        {"rtol": 1e-9, "atol": 0.0},
    )

    # All three must agree, and one of the three volunteers forges every result: no agreement.
    new_job(page, "all must agree", [6, 7])
    fixed(page, k="3", quorum="3", most="3", rtol="", atol="")
    strict = submit(page)
    assert {k: page.posted[-1].get(k) for k in ("replication", "quorum", "max_replicas", "tolerance")} == {
        "replication": 3,
        "quorum": 3,
        "max_replicas": 3,
        "tolerance": None,
    }
    sims.start()  # a second honest volunteer ...
    sims.start(lie_rate=1.0)  # ... and one that forges every result

    go(page, f"#/job/{three}", "job")
    done = wait_ended(page, server, three)
    assert done["state"] == "done" and done["validation"]["disagreements"] == 5
    assert [r["result"] for r in api(page, server, f"/api/jobs/{three}/results?format=json")] == [
        {"x": x, "sq": x * x} for x in range(1, 6)
    ]
    page.wait_for_function("document.getElementById('job-state').textContent === 'done'", timeout=READY_MS)
    assert stat(page, "validated") == "5" and stat(page, "disagreements") == "5"
    assert stat(page, "replicas-per-task") == "3.00" and stat(page, "accepted-alone") == "0"
    assert (
        "3 volunteers per task, 2 must agree (at most 4 results per task); floats within rtol 1e-9, atol 0"
        in page.inner_text("#job-validation")
    )
    page.wait_for_function("document.querySelectorAll('#job-results td.accepted').length === 5")
    assert page.eval_on_selector_all("#job-results td.accepted", "els => els.map(e => e.textContent)") == ["2/3"] * 5
    assert page.eval_on_selector_all("#job-results td.accepted + td", "els => els.map(e => e.textContent)") == ["3"] * 5
    shot(page, screenshots, "verify-three-desktop")
    page.set_viewport_size(PHONE)
    shot(page, screenshots, "verify-three-phone")
    page.set_viewport_size(DESKTOP)

    go(page, f"#/job/{strict}", "job")
    failed = wait_ended(page, server, strict)
    assert failed["state"] == "failed" and failed["counts"]["failed"] == 2
    page.wait_for_function(
        "document.querySelector('#job-validation [data-stat=no-agreement] .stat-value').textContent === '2'",
        timeout=READY_MS,
    )
    page.wait_for_selector("#job-errors-card:not([hidden])")
    errors = page.inner_text("#job-errors")
    assert "2×" in errors and "NoAgreement: no quorum after <n> replicas" in errors  # one group, not one per task
    page.click("#job-errors summary")
    assert "No agreement after 3 results" in page.inner_text("#job-errors")
    page.wait_for_function("document.querySelectorAll('#job-results ul.variants').length === 2")
    first = page.inner_text("#job-results tbody tr:first-child")
    assert "No agreement after 3 results" in first
    assert '2 volunteers: {"sq":36,"x":6}' in first and "1 volunteer: 0." in first  # the honest pair, the forgery
    assert page.inner_text("#job-results tbody tr:first-child td.accepted") == "no agreement"
    shot(page, screenshots, "verify-no-agreement-desktop")
    page.set_viewport_size(PHONE)
    shot(page, screenshots, "verify-no-agreement-phone")
    page.set_viewport_size(DESKTOP)


def test_the_form_preselects_a_fixed_server_default(browser, live_server, screenshots) -> None:  # noqa: ANN001
    """UVM_DEFAULT_REPLICATION=2: the form starts on "2 volunteers per task", labelled the server default."""
    other = live_server(UVM_DEFAULT_REPLICATION="2")
    tab = open_dashboard(browser, other, PHONE)
    try:
        sign_in(tab, add_account(other))
        tab.wait_for_selector("#view-jobs:not([hidden])")
        go(tab, "#/new", "new")
        tab.wait_for_function("document.getElementById('verify-explain').textContent !== ''")
        assert tab.is_checked("input[name=verify-mode][value=fixed]") and tab.input_value("#verify-k") == "2"
        assert tab.is_visible("[data-default=fixed]") and tab.is_hidden("[data-default=adaptive]")
        assert tab.inner_text("#verify-explain") == (
            "2 volunteers compute each task and all must agree. Cost: 2 results per task (up to 5 when they disagree)."
        )
        assert not tab.is_disabled("#verify-quorum")
        tab.locator("#verify").scroll_into_view_if_needed()
        tab.screenshot(path=str(screenshots / "dashboard-verify-form-default-2-phone.png"))
    finally:
        tab.context.close()

"""The researcher dashboard in Debian's Chromium against the real server (SQLite default).

Sign in, write a job in the editor, Try it, submit, watch it finish while the volunteer page runs
in another tab, download every format; bad code, bad inputs and a wrong password get messages;
researchers see only their own jobs; the operator page; screenshots of every view at phone and
desktop widths (``e2e/screenshots/dashboard-*.png``).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from e2e.conftest import ROOT, LiveServer, _cli, open_volunteer_page

PASSWORD = "dashboard-pass-1"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
READY_MS = 90_000  # Pyodide boots and volunteer work; generous: the machine may be shared
STEP_MS = 45_000  # any other wait (Playwright's default is 30 s)

JOB = """def main(x):
    print("squaring", x)
    return {"x": x, "sq": x * x}
"""


@pytest.fixture(scope="module")
def server(live_server) -> LiveServer:
    return live_server()


def add_account(server: LiveServer, operator: bool = False) -> str:
    email = f"dash-{uuid.uuid4().hex[:8]}@example.org"
    args = ["researcher", "add", email, "--password-stdin"] + (["--operator"] if operator else [])
    _cli(server.env, *args, stdin=PASSWORD + "\n")
    return email


@pytest.fixture(scope="module")
def accounts(server) -> dict[str, str]:
    return {"a": add_account(server), "b": add_account(server), "op": add_account(server, operator=True)}


def open_dashboard(browser, server: LiveServer, viewport: dict = DESKTOP, hash_: str = ""):  # noqa: ANN001, ANN201
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    context.set_default_timeout(STEP_MS)
    page = context.new_page()
    page.goto(f"{server.url}/dashboard{hash_}")
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=READY_MS)
    return page


def sign_in(page, email: str, password: str = PASSWORD) -> None:  # noqa: ANN001
    page.fill("#login-email", email)
    page.fill("#login-password", password)
    page.click("#login-button")


def signed_in(browser, server: LiveServer, email: str, viewport: dict = DESKTOP):  # noqa: ANN001, ANN201
    page = open_dashboard(browser, server, viewport)
    sign_in(page, email)
    page.wait_for_selector("#view-jobs:not([hidden])")
    return page


@pytest.fixture(scope="module")
def a_page(browser, server, accounts):  # noqa: ANN001, ANN201
    """Researcher A's tab (desktop), signed in; shared by the tests of this module."""
    page = signed_in(browser, server, accounts["a"])
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def b_page(browser, server, accounts):  # noqa: ANN001, ANN201
    """Researcher B's tab (phone), not signed in yet: one Pyodide boot serves several tests."""
    page = open_dashboard(browser, server, PHONE)
    yield page
    page.context.close()


def ensure_signed_in(page, email: str) -> None:  # noqa: ANN001
    if page.is_visible("#view-login"):
        sign_in(page, email)
        page.wait_for_selector("#view-jobs:not([hidden])")


def go(page, hash_: str, view: str) -> None:  # noqa: ANN001
    page.evaluate(f"location.hash = {json.dumps(hash_)}")
    page.wait_for_selector(f"#view-{view}:not([hidden])")


def write_code(page, code: str) -> None:  # noqa: ANN001
    """Replace the editor's text: select all, then insert (typing would trigger auto-indent)."""
    page.wait_for_selector("#editor .cm-content")
    page.click("#editor .cm-content")
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(code)


HIGHLIGHTED = """(word) => {
  const span = [...document.querySelectorAll('#editor .cm-line span')].find((s) => s.textContent === word);
  return !!span && getComputedStyle(span).color !== getComputedStyle(span.closest('.cm-line')).color;
}"""


def shot(page, screenshots: Path, name: str) -> None:  # noqa: ANN001
    page.wait_for_timeout(150)
    page.screenshot(path=str(screenshots / f"dashboard-{name}.png"), full_page=True)


def test_wrong_password_gets_a_message(b_page, accounts, screenshots) -> None:
    page = b_page
    page.wait_for_selector("#view-login:not([hidden])")
    assert not page.is_disabled("#login-button")
    sign_in(page, accounts["b"], "not-the-password")
    page.wait_for_selector("#login-error:not([hidden])")
    assert page.inner_text("#login-error") == "Wrong email or password."
    shot(page, screenshots, "login-error-phone")
    page.set_viewport_size(DESKTOP)
    shot(page, screenshots, "login-error-desktop")
    page.set_viewport_size(PHONE)
    sign_in(page, accounts["b"])
    page.wait_for_selector("#view-jobs:not([hidden])")
    assert page.is_hidden("#login-error")


def test_write_try_submit_watch_with_volunteer_tab_and_download(a_page, server, screenshots) -> None:
    page = a_page
    go(page, "#/new", "new")
    write_code(page, JOB)
    assert page.evaluate(HIGHLIGHTED, "def") and page.evaluate(HIGHLIGHTED, '"squaring"')  # Python highlighting
    page.fill("#inputs-json", json.dumps(list(range(1, 13))))
    page.fill("#opt-name", "squares from the dashboard")
    page.click("#try-button")
    page.wait_for_selector("#try-output:not([hidden])", timeout=READY_MS)
    assert page.get_attribute("#try-output", "data-outcome") == "ok"
    tried = page.inner_text("#try-output")
    assert '"sq": 1' in tried and "squaring 1" in tried
    shot(page, screenshots, "new-job-tried-desktop")

    page.click("#submit-button")
    page.wait_for_selector("#view-job:not([hidden])")
    job_id = int(page.evaluate("location.hash").rsplit("/", 1)[1])
    page.wait_for_function("document.getElementById('job-title').textContent === 'squares from the dashboard'")

    volunteer = open_volunteer_page(page.context, server)
    volunteer.get_by_role("button", name="Start").click()
    page.bring_to_front()
    page.wait_for_function("document.getElementById('job-state').textContent === 'done'", timeout=READY_MS, polling=200)
    volunteer.get_by_role("button", name="Stop").click()
    volunteer.close()
    page.wait_for_function("document.getElementById('job-results').textContent.includes('\"sq\": 144')")
    assert page.locator("[data-stat=done] .stat-value").inner_text() == "12"
    shot(page, screenshots, "job-done-desktop")

    expected = [{"x": x, "sq": x * x} for x in range(1, 13)]
    files = {}
    for fmt in ("txt", "json", "ndjson", "csv"):
        with page.expect_download() as info:
            page.click(f"#downloads a[data-format={fmt}]")
        download = info.value
        assert download.suggested_filename == f"job-{job_id}-results.{fmt}"
        files[fmt] = Path(download.path()).read_text()
    assert [json.loads(line) for line in files["txt"].splitlines()] == expected
    assert [row["result"] for row in json.loads(files["json"])] == expected
    assert [json.loads(line)["result"] for line in files["ndjson"].splitlines()] == expected
    rows = list(csv.DictReader(io.StringIO(files["csv"])))
    assert [json.loads(r["result"]) for r in rows] == expected and {r["state"] for r in rows} == {"done"}

    page.set_viewport_size(PHONE)
    shot(page, screenshots, "job-done-phone")
    go(page, "#/jobs", "jobs")
    page.wait_for_selector(f"tr[data-job='{job_id}']")
    assert "done" in page.inner_text(f"tr[data-job='{job_id}']")
    shot(page, screenshots, "jobs-phone")
    page.set_viewport_size(DESKTOP)
    shot(page, screenshots, "jobs-desktop")


MARKS = """import builtins


def main(x):
    seen = getattr(builtins, "_uvm_seen", [])
    builtins._uvm_seen = seen + ["%s"]
    return seen
"""


def try_result(page) -> str:  # noqa: ANN001
    """Press Try and return the result it shows (waits for this run's output, not the last one)."""
    page.evaluate("document.getElementById('try-output').hidden = true")
    page.click("#try-button")
    page.wait_for_selector("#try-output[data-outcome=ok]:not([hidden])", timeout=READY_MS)
    return json.loads(page.inner_text("#try-output .result"))


def test_try_runs_each_version_of_the_code_in_a_fresh_interpreter(a_page) -> None:
    page = a_page
    go(page, "#/new", "new")
    page.fill("#inputs-json", "[1]")
    write_code(page, MARKS % "v1")
    assert try_result(page) == []
    assert try_result(page) == ["v1"]  # the same code runs on in its worker...
    write_code(page, MARKS % "v2")
    assert try_result(page) == []  # ...other code gets a fresh one: nothing of v1 is left


def results_of(page, job_id: int) -> list:  # noqa: ANN001
    """The job's results through the page's own session (same-origin fetch with the cookie)."""
    rows = page.evaluate(f"fetch('/api/jobs/{job_id}/results?format=json').then(r => r.json())")
    return [row["result"] for row in rows]


def wait_done(page, timeout_ms: int = READY_MS) -> None:  # noqa: ANN001
    page.wait_for_function(
        "document.getElementById('job-state').textContent === 'done'", timeout=timeout_ms, polling=200
    )


def test_pipeline_and_chained_job_from_the_dashboard(a_page, server, screenshots) -> None:
    page = a_page
    go(page, "#/jobs", "jobs")
    page.wait_for_selector("#jobs-table tr[data-job]")
    squares = int(page.get_attribute("#jobs-table tr[data-job]", "data-job"))  # from the test above

    # A declared pipeline: stage B exists before stage A has run anything (no volunteer yet).
    go(page, "#/new", "new")
    write_code(page, "def main(x):\n    return x * 3\n")
    page.click("#input-tabs [data-mode=range]")
    page.fill("#range-start", "0")
    page.fill("#range-stop", "120")
    page.fill("#opt-name", "stage A")
    page.click("#submit-button")
    page.wait_for_function("location.hash.startsWith('#/job/')")
    stage_a = int(page.evaluate("location.hash").rsplit("/", 1)[1])
    page.wait_for_selector("#chain-after-button:not([hidden])")
    page.click("#chain-after-button")
    page.wait_for_selector("#view-new:not([hidden])")
    page.wait_for_function(f"document.getElementById('chain-job').value === '{stage_a}'")
    assert page.inner_text("#chain-note") == "Pipeline stage after stage A"
    assert page.input_value("#chain-kind") == "after" and page.input_value("#chain-job") == str(stage_a)
    write_code(page, "def main(x):\n    return x + 1\n")
    page.click("#try-button")
    page.wait_for_selector("#inputs-error:not([hidden])")
    assert f"Job {stage_a} has no result yet" in page.inner_text("#inputs-error")
    page.fill("#opt-name", "stage B")
    shot(page, screenshots, "new-job-pipeline-desktop")
    page.click("#submit-button")
    page.wait_for_function(f"location.hash.startsWith('#/job/') && location.hash !== '#/job/{stage_a}'")
    stage_b = int(page.evaluate("location.hash").rsplit("/", 1)[1])
    page.wait_for_function("document.getElementById('job-stats').textContent.includes('120 tasks')")

    sims = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "volunteer-sim", "--server", server.url, "--count", "2", "--quiet"],
        cwd=ROOT,
        env=server.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_done(page)
        assert results_of(page, stage_b) == [x * 3 + 1 for x in range(120)]
        page.wait_for_function("document.getElementById('job-results').textContent.includes('Showing 50 of 120')")
        assert page.locator("#job-results tbody tr").count() == 50
        assert f"pipeline stage after job {stage_a}" in page.inner_text("#job-stats")
        shot(page, screenshots, "job-pipeline-desktop")

        # "New job from these results" of the finished squares job.
        go(page, f"#/job/{squares}", "job")
        page.wait_for_selector("#chain-results-button:not([hidden])")
        page.click("#chain-results-button")
        page.wait_for_selector("#view-new:not([hidden])")
        assert page.input_value("#chain-kind") == "results_of"
        assert page.inner_text("#chain-note") == "Inputs: results of squares from the dashboard"
        page.wait_for_function(f"document.getElementById('chain-job').value === '{squares}'")
        write_code(page, "def main(r):\n    return r['sq'] + 1\n")
        page.click("#try-button")
        page.wait_for_selector("#try-output:not([hidden])", timeout=READY_MS)
        page.wait_for_function("document.getElementById('try-status').textContent.includes('sq')")
        assert "2" in page.inner_text("#try-output .result")
        page.click("#submit-button")
        page.wait_for_function(f"location.hash.startsWith('#/job/') && location.hash !== '#/job/{squares}'")
        chained = int(page.evaluate("location.hash").rsplit("/", 1)[1])
        wait_done(page)
        assert results_of(page, chained) == [x * x + 1 for x in range(1, 13)]
    finally:
        sims.terminate()
        sims.wait(10)


def test_bad_code_and_bad_inputs_get_messages(b_page, accounts, screenshots) -> None:
    page = b_page
    ensure_signed_in(page, accounts["b"])
    go(page, "#/new", "new")
    write_code(page, "def main(x):\n    y = x +\n    return y\n")
    page.click("#submit-button")
    page.wait_for_selector("#code-error:not([hidden])")
    message = page.inner_text("#code-error")
    assert "SyntaxError" in message and "line 2" in message
    assert page.inner_text("#editor .cm-activeLine") == "    y = x +"  # the cursor is on the bad line
    assert page.locator("#editor.has-error").count() == 1
    shot(page, screenshots, "new-job-syntax-error-phone")

    write_code(page, "def main(x):\n    raise ValueError(f'no {x}')\n")
    page.click("#try-button")
    page.wait_for_selector("#try-output[data-outcome=error]", timeout=READY_MS)
    assert "ValueError: no 1" in page.inner_text("#try-output")

    # A runaway main: Try stops it at the job's timeout (the worker is replaced), the page stays usable.
    write_code(page, "def main(x):\n    while True:\n        pass\n")
    page.fill("#opt-timeout", "1.5")
    page.click("#try-button")
    page.wait_for_function(
        "document.getElementById('try-output').textContent.includes('did not return within 1.5 s')", timeout=READY_MS
    )
    page.fill("#opt-timeout", "60")

    write_code(page, JOB)
    assert "stale" in page.get_attribute("#try-output", "class")  # that run was of the old code
    page.fill("#inputs-json", "[1, 2,")
    page.click("#submit-button")
    page.wait_for_selector("#inputs-error:not([hidden])")
    assert "not valid JSON" in page.inner_text("#inputs-error")
    page.click("#input-tabs [data-mode=csv]")
    page.fill("#inputs-csv", "a,b\n1,2\n3\n")
    page.click("#submit-button")
    page.wait_for_function("document.getElementById('inputs-error').textContent.includes('row 3')")
    page.click("#input-tabs [data-mode=range]")
    page.fill("#range-start", "5")
    page.fill("#range-stop", "5")
    page.click("#submit-button")
    page.wait_for_function("document.getElementById('inputs-error').textContent.includes('is empty')")
    shot(page, screenshots, "new-job-bad-inputs-phone")
    page.fill("#range-stop", "8")
    page.fill("#opt-timeout", "-1")
    page.click("#submit-button")
    page.wait_for_selector("#submit-error:not([hidden])")
    assert "timeout" in page.inner_text("#submit-error")
    assert page.is_visible("#view-new")  # nothing was submitted
    page.fill("#opt-timeout", "60")

    # An uploaded CSV file: one task per row, each a dict of the columns; Try gets the first row.
    page.click("#input-tabs [data-mode=csv]")
    csv_file = {"name": "rows.csv", "mimeType": "text/csv", "buffer": b"a,b,label\n1,2,first\n3,4.5,second\n"}
    page.set_input_files("#file-csv", csv_file)
    page.wait_for_function("document.getElementById('inputs-summary').textContent.startsWith('2 tasks')")
    assert page.inner_text("#inputs-summary") == '2 tasks; the first input is {"a": 1, "b": 2, "label": "first"}'
    write_code(page, "def main(row):\n    return f\"{row['label']}: {row['a'] + row['b']}\"\n")
    page.click("#try-button")
    page.wait_for_selector("#try-output[data-outcome=ok]", timeout=READY_MS)
    assert '"first: 3"' in page.inner_text("#try-output .result")


def test_researchers_see_only_their_own_jobs(a_page, b_page, accounts) -> None:
    go(a_page, "#/jobs", "jobs")
    a_page.wait_for_selector("#jobs-table tr[data-job]")
    theirs = int(a_page.get_attribute("#jobs-table tr[data-job]", "data-job"))
    b = b_page
    ensure_signed_in(b, accounts["b"])
    go(b, "#/jobs", "jobs")
    b.wait_for_selector("#jobs-table p.empty")
    assert "No jobs yet" in b.inner_text("#jobs-table")
    go(b, f"#/job/{theirs}", "job")
    b.wait_for_selector("#flash:not([hidden])")
    assert b.inner_text("#flash") == f"There is no job {theirs} of yours."
    assert b.inner_text("#job-results") == "No results yet."


def test_operator_page_approves_revokes_and_sees_volunteers(browser, server, accounts, b_page, screenshots) -> None:
    sims = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "volunteer-sim", "--server", server.url, "--count", "2", "--quiet"],
        cwd=ROOT,
        env=server.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        page = signed_in(browser, server, accounts["op"])
        assert page.is_visible("#nav-admin")
        go(page, "#/admin", "admin")
        row = f"tr[data-researcher] >> text={accounts['b']}"
        page.wait_for_selector(row)
        page.wait_for_function("document.querySelectorAll('#admin-volunteers tr[data-volunteer]').length === 2")
        assert page.locator("[data-stat=connected] .stat-value").inner_text() == "2"
        shot(page, screenshots, "operator-desktop")
        page.set_viewport_size(PHONE)
        shot(page, screenshots, "operator-phone")

        researcher = page.locator("tr[data-researcher]", has_text=accounts["b"])
        researcher.get_by_role("button", name="Revoke").click()
        researcher.get_by_role("button", name="Approve").wait_for()
        b = b_page
        ensure_signed_in(b, accounts["b"])
        b.click("[data-action=logout]")
        b.wait_for_selector("#view-login:not([hidden])")
        sign_in(b, accounts["b"])
        b.wait_for_function("document.getElementById('login-error').textContent.includes('not approved')")
        researcher.get_by_role("button", name="Approve").click()
        researcher.get_by_role("button", name="Revoke").wait_for()
        sign_in(b, accounts["b"])
        b.wait_for_selector("#view-jobs:not([hidden])")
        # Revoked while signed in: revoking ended the session; the next request says so.
        researcher.get_by_role("button", name="Revoke").click()
        researcher.get_by_role("button", name="Approve").wait_for()
        b.evaluate("location.hash = '#/new'")  # its request for the job list is refused
        b.wait_for_selector("#view-login:not([hidden])")
        assert b.inner_text("#login-error") == "Your session has ended; please sign in again."
        researcher.get_by_role("button", name="Approve").click()
        researcher.get_by_role("button", name="Revoke").wait_for()
        sign_in(b, accounts["b"])
        b.wait_for_selector("#view-jobs:not([hidden])")
        assert not b.is_visible("#nav-admin")  # not an operator
        page.context.close()
    finally:
        sims.terminate()
        sims.wait(10)


FLAKY = """import time


def main(x):
    time.sleep(0.3)
    if x == 3:
        raise ValueError(f"bad input {x}")
    return x
"""


def test_live_view_errors_retry_and_cancel(b_page, server, accounts, screenshots) -> None:
    page = b_page
    ensure_signed_in(page, accounts["b"])
    go(page, "#/new", "new")
    write_code(page, FLAKY)
    page.click("#input-tabs [data-mode=json]")
    page.fill("#inputs-json", json.dumps(list(range(8))))
    page.fill("#opt-name", "flaky")
    page.fill("#opt-attempts", "1")
    page.click("#submit-button")
    page.wait_for_function("location.hash.startsWith('#/job/')")
    page.wait_for_function("document.getElementById('job-state').textContent === 'running'")
    assert page.locator("[data-stat=queued] .stat-value").inner_text() == "8"
    sims = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "volunteer-sim", "--server", server.url, "--count", "1", "--quiet"],
        cwd=ROOT,
        env=server.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        page.wait_for_function(
            "+document.querySelector('[data-stat=done] .stat-value').textContent >= 2", timeout=READY_MS, polling=100
        )
        shot(page, screenshots, "job-running-phone")
        # 7 done, 1 failed: the API's state "failed", shown amber as what it is
        partial = "finished · 7 done, 1 failed"
        page.wait_for_function(f"document.getElementById('job-state').textContent === '{partial}'", timeout=READY_MS)
        page.wait_for_selector("#job-errors-card:not([hidden]) details.error-group")
        group = page.locator("details.error-group").first
        assert "ValueError: bad input <n>" in group.inner_text() and "1×" in group.inner_text()  # grouped, masked
        group.locator("summary").click()
        assert "line 7, in main" in page.inner_text("details.error-group pre.traceback")
        page.wait_for_function("document.getElementById('job-results').textContent.includes('bad input 3')")
        shot(page, screenshots, "job-failed-phone")
        page.set_viewport_size(DESKTOP)
        shot(page, screenshots, "job-failed-desktop")
        page.set_viewport_size(PHONE)

        page.click("#retry-button")  # the same input fails again: the job ends failed again
        page.wait_for_function("document.getElementById('flash').textContent === '1 failed task queued again.'")
        page.wait_for_function(f"document.getElementById('job-state').textContent === '{partial}'", timeout=READY_MS)

        go(page, "#/new", "new")
        page.fill("#inputs-json", json.dumps(list(range(300))))
        page.fill("#opt-name", "to cancel")
        page.click("#submit-button")
        page.wait_for_function("document.getElementById('job-title').textContent === 'to cancel'")
        asked: list[str] = []
        page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
        page.click("#cancel-button")  # Cancel asks first: "no" leaves the job running
        for _ in range(100):  # the page's Python asks after the click, not during it
            if asked:
                break
            page.wait_for_timeout(100)
        page.wait_for_function("document.getElementById('job-state').textContent === 'running'")
        assert asked and asked[0].startswith("Cancel to cancel?"), asked
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#cancel-button")
        page.wait_for_function("document.getElementById('job-state').textContent === 'cancelled'")
        assert int(page.locator("[data-stat=cancelled] .stat-value").inner_text()) > 250
        assert page.is_hidden("#cancel-button")
    finally:
        sims.terminate()
        sims.wait(10)

"""The volunteer page through a database outage: told to hold its results, it keeps them, sends
them again only after the delay the server gave (no storm), and nothing is lost when the database
returns. The database is a private mariadbd (tests/procs.py): the shared one serves other tests."""

from __future__ import annotations

import time

from e2e.conftest import fake_device, open_volunteer_page, state, wait_state
from server.jobs.outage import HOLD_MIN
from tests.procs import PrivateMariaDB

CODE = "import time\n\ndef main(x):\n    time.sleep(0.2)\n    return x * 7\n"
OUTAGE = 12.0


def test_page_holds_results_through_an_outage(browser, live_server, tmp_path) -> None:
    db = PrivateMariaDB(tmp_path / "mariadb").start()
    try:
        server = live_server("sqlite", UVM_DATABASE_URL=db.url, UVM_KEY="3d" * 32)
        job = server.submit(CODE, list(range(40)), timeout=120)
        context = browser.new_context()
        context.add_init_script(fake_device(cores=2))
        page = open_volunteer_page(context, server)
        page.get_by_role("button", name="Start").click()
        wait_state(page, lambda s: s["session"]["tasks"] >= 3, timeout=60)

        db.stop()
        stopped = time.monotonic()
        held = wait_state(page, lambda s: s["counts"]["holds"] >= 1, timeout=20)
        assert held["unacked"], held  # kept, not dropped
        sent = held["counts"]["results_messages"]
        page.wait_for_timeout(max(0.0, OUTAGE - (time.monotonic() - stopped)) * 1000)
        during = state(page)
        resends = during["counts"]["results_messages"] - sent
        assert resends <= OUTAGE / HOLD_MIN + 1, during["counts"]  # once per hold, not a storm
        assert during["unacked"] and "held by the server" in during["last_error"]

        db.start()
        done = server.wait(job, timeout=90, page=page)
        assert done["state"] == "done", done
        assert [r["result"] for r in server.results(job)] == [x * 7 for x in range(40)]
        wait_state(page, lambda s: not s["unacked"])
        context.close()
    finally:
        db.stop()

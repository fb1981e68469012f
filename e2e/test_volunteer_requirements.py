"""A job's requirements are loaded by Pyodide's package loader from the configured index.

These machines have no internet and the npm Pyodide holds no packages, so the stand-in index
(e2e/conftest.py) plays an operator's own Pyodide distribution (``UVM_PACKAGE_LOCK=index``): its
lock file lists one pure-Python package it serves, which a job imports; a package its lock lists
but it cannot serve fails the job's tasks with a clear error naming the package and the index.
"""

from __future__ import annotations

import json

from e2e.conftest import DEMO_PACKAGE, fake_device, open_volunteer_page

USES_DEMO = """
import uvm_demo_pkg

def main(x):
    return uvm_demo_pkg.ANSWER + x
"""

USES_SIX = """
import six

def main(x):
    return six.PY3
"""


def test_requirements_come_from_the_configured_index(browser, live_server, package_index) -> None:
    url = package_index.url
    server = live_server(UVM_PACKAGE_INDEX_URL=url, UVM_PACKAGE_LOCK="index")
    assert url in server.request("GET", "/", auth=False)[1]
    loads = server.submit(USES_DEMO, [1, 2], name="needs-demo", timeout=20, requirements=[DEMO_PACKAGE])
    missing = server.submit(USES_SIX, [1, 2], name="needs-six", timeout=20, max_attempts=1, requirements=["six"])
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    page.get_by_role("button", name="Start").click()
    done = server.wait(loads, timeout=60, page=page)
    failed = server.wait(missing, timeout=60, page=page)
    context.close()
    assert done["state"] == "done", done
    assert [row["result"] for row in server.results(loads)] == [43, 44]
    assert "/pyodide-packages/uvm_demo_pkg-1.0-py3-none-any.whl" in package_index.asked, package_index.asked
    assert failed["state"] == "failed", failed
    assert "/pyodide-packages/six-1.17.0-py2.py3-none-any.whl" in package_index.asked, package_index.asked
    errors = json.dumps(server.errors(missing))
    assert f"could not load requirements six from {url}" in errors, errors

"""A job's requirements are loaded by Pyodide's package loader from the configured index.

These machines have no internet and the npm Pyodide holds no packages, so a stand-in index
records what the workers ask it for and answers 404: the loader goes to the configured URL for
the pinned lock file's wheel, and the failure comes back to the researcher as a clear error.
"""

from __future__ import annotations

import json

from e2e.conftest import fake_device, open_volunteer_page

CODE = """
import six

def main(x):
    return six.PY3
"""


def test_requirements_come_from_the_configured_index(browser, live_server, package_index) -> None:
    url = package_index.url
    server = live_server(UVM_PACKAGE_INDEX_URL=url)
    assert url in server.request("GET", "/", auth=False)[1]
    job = server.submit(CODE, [1, 2], name="needs-six", timeout=20, max_attempts=1, requirements=["six"])
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, server)
    page.get_by_role("button", name="Start").click()
    done = server.wait(job, timeout=60, page=page)
    context.close()
    assert done["state"] == "failed", done
    assert "/pyodide-packages/six-1.17.0-py2.py3-none-any.whl" in package_index.asked, package_index.asked
    errors = json.dumps(server.errors(job))
    assert f"could not load requirements six from {url}" in errors, errors

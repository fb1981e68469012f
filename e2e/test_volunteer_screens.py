"""Screenshots of the volunteer page in each state, at phone and desktop widths.

Saved under e2e/screenshots/ (not committed) to be looked at; the test checks that each state is
reached, that nothing overflows the viewport horizontally, and that the controls stay usable.
"""

from __future__ import annotations

import pytest

from e2e.conftest import fake_device, open_volunteer_page, wait_state

SLOW = """
import time

def main(x):
    end = time.time() + 1.0
    while time.time() < end:
        pass
    return x
"""
VIEWPORTS = {"phone": {"width": 390, "height": 844}, "desktop": {"width": 1280, "height": 900}}


def shoot(page, screenshots, viewport: str, name: str) -> None:  # noqa: ANN001
    page.wait_for_function(f"document.body.dataset.state === '{name}'", timeout=30_000)
    page.wait_for_timeout(150)  # let the last render land
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{viewport}/{name}: page is {overflow}px wider than the viewport"
    page.screenshot(path=str(screenshots / f"volunteer-{viewport}-{name}.png"), full_page=True)


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_screenshots_of_every_state(browser, live_server, screenshots, viewport: str) -> None:
    server = live_server()
    context = browser.new_context(viewport=VIEWPORTS[viewport], device_scale_factor=1)
    context.add_init_script(fake_device(cores=4, battery={"charging": True, "level": 0.8}, connection={}))
    page = open_volunteer_page(context, server)
    shoot(page, screenshots, viewport, "stopped")
    button = page.get_by_role("button", name="Start")
    assert button.is_visible() and button.bounding_box()["height"] >= 44  # a comfortable tap target
    button.click()
    shoot(page, screenshots, viewport, "starting")
    wait_state(page, lambda s: s["workers"] and all(w["ready"] for w in s["workers"]), timeout=60)
    shoot(page, screenshots, viewport, "waiting")
    job = server.submit(SLOW, list(range(12)), name="screens", timeout=20)
    wait_state(page, lambda s: sum(1 for w in s["workers"] if w["attempt"]) >= 2, timeout=30)
    shoot(page, screenshots, viewport, "running")
    page.evaluate("__uvmFake.battery.charging = false; __uvmFake.battery.level = 0.12; __uvmFake.fire()")
    shoot(page, screenshots, viewport, "paused")
    page.evaluate("__uvmFake.battery.charging = true; __uvmFake.fire()")
    server.wait(job, timeout=60, page=page)
    server.stop()
    shoot(page, screenshots, viewport, "offline")
    context.close()


def test_screenshot_of_the_embed_example(browser, live_server, screenshots) -> None:
    server = live_server()
    context = browser.new_context(viewport=VIEWPORTS["desktop"])
    page = context.new_page()
    page.goto(server.url + "/static/embed-example.html")
    page.frame_locator("iframe").get_by_role("button", name="Start").wait_for(timeout=60_000)
    page.wait_for_function(
        "() => { const f = document.querySelector('iframe'); "
        "return f && f.contentWindow.uvm_state && !f.contentDocument.getElementById('toggle').disabled; }",
        timeout=60_000,
    )
    page.screenshot(path=str(screenshots / "embed-example.png"), full_page=True)
    context.close()

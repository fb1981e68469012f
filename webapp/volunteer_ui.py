"""What the volunteer sees: the page's text and controls, drawn from ``App.snapshot()``.

``page_state`` and the text helpers are pure (plain dicts in, strings out); ``render`` writes them
into the DOM of ``public/index.html`` and ``bind`` hooks the controls to the app.
"""

from __future__ import annotations

import html

from pyodide.ffi import create_proxy
from pyscript import document

_bound: list = []  # proxies kept alive for the page's lifetime

HEADLINES = {
    "stopped": ("Not running", "Lend this tab to research"),
    "connecting": ("Connecting…", "Connecting to the server"),
    "offline": ("Connection lost", "Waiting for the server"),
    "starting": ("Starting", "Starting Python in your browser"),
    "waiting": ("Waiting for work", "Ready — waiting for tasks"),
    "running": ("Computing", "Thank you — computing for research"),
    "paused": ("Paused", "Paused to spare your device"),
}


def page_state(snap: dict) -> str:
    """One word for the page's state (also the ``data-state`` of ``<body>``)."""
    if not snap["running"]:
        return "stopped"
    if snap["plan"]["paused"]:
        return "paused"
    if not snap["welcomed"]:
        return "offline" if snap["failures"] else "connecting"
    workers = snap["workers"]
    if any(w["attempt"] for w in workers):
        return "running"
    if not any(w["ready"] for w in workers):
        return "starting"
    return "waiting"


def detail(state: str, snap: dict) -> str:
    plan = snap["plan"]
    if state == "stopped":
        return (
            "Researchers send small Python tasks; your browser runs them in the background and "
            "sends back the answers. Nothing starts until you press Start."
        )
    if state == "paused":
        busy = sum(1 for w in snap["workers"] if w["attempt"])
        finishing = f" Finishing {busy} task(s) already started." if busy else ""
        return (plan["pause_reason"] or "Paused.") + finishing
    if state == "offline":
        retry = snap["reconnect_in"]
        when = f"Trying again in {retry:.0f} s." if retry is not None and retry >= 1 else "Trying again now."
        return f"{when} Work in progress is kept safe in this browser."
    if state == "connecting":
        return "Opening a connection to the server…"
    if state == "starting":
        return f"Loading Python into {plan['workers']} worker(s); this takes a few seconds."
    if state == "waiting":
        return "No task is waiting right now; we will ask again shortly. You can leave this tab open."
    busy = sum(1 for w in snap["workers"] if w["attempt"])
    return f"{busy} task(s) running in the background. You can keep using your device."


def seconds(value: float) -> str:
    """CPU time for people: 4.2 s, 3 min 5 s, 2 h 10 min."""
    value = max(0.0, float(value))
    if value < 60:
        return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60)} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60)} min"


def device_chips(snap: dict) -> list[tuple[str, bool]]:
    """(text, is_warning) chips describing the device as the browser reports it."""
    device = snap["device"]
    chips = [(f"{device['cores']} cores" if device["cores"] else "cores: unknown", False)]
    battery = device["battery"]
    if battery is None:
        chips.append(("battery: not reported by this browser", False))
    else:
        level = f"{battery['level']:.0%}"
        chips.append(
            (f"charging · {level}" if battery["charging"] else f"on battery · {level}", not battery["charging"])
        )
    network = device["network"]
    if network is None:
        chips.append(("network: not reported by this browser", False))
    else:
        slow = network["save_data"] or network["effective_type"] in ("slow-2g", "2g")
        text = "data saver" if network["save_data"] else f"network {network['effective_type'] or 'unknown'}"
        chips.append((text, slow))
    chips.append(("tab hidden" if device["hidden"] else "tab visible", device["hidden"]))
    return chips


def worker_rows(snap: dict) -> str:
    rows = []
    for w in snap["workers"]:
        if w["attempt"]:
            cls, badge = "busy", f"Worker {w['number']}"
            what = f"job {w['job']} · task #{w['index']}"
            time = f"{w['elapsed']:.1f} s"
        elif not w["ready"]:
            cls, badge, what, time = "boot", f"Worker {w['number']}", "starting Python…", ""
        else:
            cls, badge, what, time = "idle", f"Worker {w['number']}", "idle", ""
        rows.append(
            f'<li class="{cls}"><span class="badge">{badge}</span>'
            f'<span class="what">{html.escape(what)}</span><span class="time">{time}</span></li>'
        )
    if not rows:
        return '<li class="empty">No workers running.</li>'
    return "".join(rows)


def _set(element_id: str, text: str) -> None:
    element = document.getElementById(element_id)
    if element is not None and element.textContent != text:
        element.textContent = text


def _set_html(element_id: str, markup: str) -> None:
    element = document.getElementById(element_id)
    if element is not None and element.innerHTML != markup:
        element.innerHTML = markup


def render(app) -> None:
    """Draw the app's snapshot into the page."""
    snap = app.snapshot()
    state = page_state(snap)
    document.body.dataset.state = state
    status, headline = HEADLINES[state]
    _set("status-text", status)
    _set("headline", headline)
    _set("status-detail", detail(state, snap))
    button = document.getElementById("toggle")
    button.disabled = False
    label = "Stop computing" if snap["running"] else "Start computing"
    if button.textContent != label:
        button.textContent = label
    button.setAttribute("aria-pressed", "true" if snap["running"] else "false")
    plan = snap["plan"]
    _set("stat-workers", str(len(snap["workers"])))
    _set("stat-workers-label", "workers")
    _set("stat-workers-sub", f"{plan['workers']} allowed now, {plan['max_workers']} at most")
    _set("stat-tasks", str(snap["session"]["tasks"]))
    _set("stat-tasks-all", f"{snap['totals']['tasks']} all time")
    _set("stat-cpu", seconds(snap["session"]["cpu"]))
    _set("stat-cpu-all", f"{seconds(snap['totals']['cpu'])} all time")
    held = len(snap["queued"]) + sum(1 for w in snap["workers"] if w["attempt"])
    _set("stat-queue", str(held))
    unacked = len(snap["unacked"])
    _set("stat-unsent", f"{unacked} result(s) not yet confirmed" if unacked else "all results delivered")
    _set("cap-value", f"{snap['settings']['cpu_cap']} %")
    cores = snap["device"]["cores"]
    _set("cap-hint", f"of this device's {cores} cores" if cores else "of this device's cores")
    _set_html("workers", worker_rows(snap))
    chips = "".join(
        f'<li class="{"warn" if warn else ""}">{html.escape(text)}</li>' for text, warn in device_chips(snap)
    )
    _set_html("device", chips)
    _set_html("reasons", "".join(f"<li>{html.escape(r)}</li>" for r in plan["reasons"]))


def bind(app) -> None:
    """Hook the Start/Stop button and the settings to ``app``; show the saved settings."""
    cap = document.getElementById("cap")
    cap.value = str(app.settings.cpu_cap)
    hidden = document.getElementById("when-hidden")
    hidden.value = app.settings.when_hidden

    def on_toggle(event) -> None:
        app.toggle()

    def on_cap(event) -> None:
        app.set_cap(cap.value)

    def on_hidden(event) -> None:
        app.set_when_hidden(str(hidden.value))

    handlers = [
        (document.getElementById("toggle"), "click", on_toggle),
        (cap, "input", on_cap),
        (hidden, "change", on_hidden),
        (document, "visibilitychange", lambda event: app.tick()),
    ]
    for element, name, handler in handlers:
        proxy = create_proxy(handler)
        _bound.append(proxy)
        element.addEventListener(name, proxy)

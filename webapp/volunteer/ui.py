"""The page's DOM: ``render`` writes ``view``'s text into ``public/index.html`` and ``bind``
hooks the controls to the app."""

from __future__ import annotations

import html

from pyodide.ffi import create_proxy
from pyscript import document

from .view import HEADLINES, credit_text, detail, device_chips, helping, page_state, plural, seconds, worker_rows

_bound: list = []  # proxies kept alive for the page's lifetime


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
    _set("stat-tasks-label", "task this session" if snap["session"]["tasks"] == 1 else "tasks this session")
    credit = snap.get("credit") or {}
    known = credit.get("known")  # all time as the server counts it, over every browser of this id
    session = snap["session"]
    tasks_all = max(credit["tasks_all"], credit["tasks_at_start"] + session["tasks"]) if known else None
    elapsed_all = max(credit["elapsed_all"], credit["elapsed_at_start"] + session["elapsed"]) if known else None
    _set("stat-tasks-all", f"{snap['totals']['tasks'] if tasks_all is None else tasks_all} all time")
    _set("stat-elapsed", seconds(session["elapsed"]))
    _set("stat-elapsed-all", f"{seconds(snap['totals']['elapsed'] if elapsed_all is None else elapsed_all)} all time")
    held = len(snap["queued"]) + sum(1 for w in snap["workers"] if w["attempt"])
    _set("stat-queue", str(held))
    unacked = len(snap["unacked"])
    _set("stat-unsent", f"{plural(unacked, 'result')} not yet confirmed" if unacked else "all results delivered")
    texts = credit_text(snap)
    _set("stat-validated", texts["validated"])
    _set("stat-validated-sub", texts["validated_sub"])
    _set("nickname-status", texts["nickname"])
    _set("nickname-note", texts.get("note", ""))
    _set_html("helping", helping(snap))
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

    nickname = document.getElementById("nickname")

    def on_nickname(event) -> None:
        event.preventDefault()
        app.save_nickname(str(nickname.value).strip())

    handlers = [
        (document.getElementById("nickname-form"), "submit", on_nickname),
        (document.getElementById("toggle"), "click", on_toggle),
        (cap, "input", on_cap),
        (hidden, "change", on_hidden),
        (document, "visibilitychange", lambda event: app.tick()),
    ]
    for element, name, handler in handlers:
        proxy = create_proxy(handler)
        _bound.append(proxy)
        element.addEventListener(name, proxy)

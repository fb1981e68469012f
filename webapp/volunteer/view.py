"""What the volunteer sees, as pure functions of ``App.snapshot()``: plain dicts in, text out.

No browser imports, so CPython unit tests cover them (tests/test_volunteer_view.py);
``ui`` writes the results into the page.
"""

from __future__ import annotations

import html

from ..words import plural

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
        finishing = f" Finishing {plural(busy, 'task')} already started." if busy else ""
        return (plan["pause_reason"] or "Paused.") + finishing
    if state == "offline":
        retry = snap["reconnect_in"]
        when = f"Trying again in {retry:.0f} s." if retry is not None and retry >= 1 else "Trying again now."
        return f"{when} Work in progress is kept safe in this browser."
    if state == "connecting":
        return "Opening a connection to the server…"
    if state == "starting":
        return f"Loading Python into {plural(plan['workers'], 'worker')}; this takes a few seconds."
    if state == "waiting":
        return (
            "No task is waiting right now. The server sends one the moment a researcher submits work; "
            "you can leave this tab open."
        )
    busy = sum(1 for w in snap["workers"] if w["attempt"])
    return f"{plural(busy, 'task')} running in the background. You can keep using your device."


def seconds(value: float) -> str:
    """Durations for people: 4.2 s, 3 min 5 s, 2 h 10 min."""
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
    if snap.get("vault_note"):
        chips.append((f"work not kept across reloads: {snap['vault_note']}", True))
    return chips


def job_about(snap: dict, job: int | None) -> tuple[str, str]:
    """(name, description) of a job as its researcher wrote them; "a research job" with no name."""
    about = (snap.get("jobs") or {}).get(str(job)) or {}
    return about.get("name") or "a research job", about.get("description") or ""


def helping(snap: dict) -> str:
    """HTML: the jobs the workers compute now, by name, with their public descriptions."""
    jobs = []
    for w in snap["workers"]:
        if w["attempt"] and w.get("job") is not None and w["job"] not in jobs:  # a slot between tasks: no job
            jobs.append(w["job"])
    items = []
    for job in jobs:
        name, description = job_about(snap, job)
        about = f'<span class="about">{html.escape(description)}</span>' if description else ""
        items.append(f'<p class="helping" data-job="{int(job)}"><strong>{html.escape(name)}</strong>{about}</p>')
    return "".join(items)


def credit_text(snap: dict) -> dict[str, str]:
    """The contribution card's texts: validated results (this session, all time), the server's
    all-time tasks and time given, and the nickname line."""
    credit = snap.get("credit") or {}
    if not credit.get("known"):
        return {"validated": "—", "validated_sub": "not counted yet", "nickname": "Not listed on the leaderboard."}
    nickname = credit.get("nickname")
    return {
        "validated": str(credit["validated_session"]),
        "validated_sub": (
            f"{plural(credit['validated'], 'result')} all time · {seconds(credit['validated_seconds'])} credited"
        ),
        "nickname": f"Listed on the leaderboard as {nickname}." if nickname else "Not listed on the leaderboard.",
        "note": credit.get("note") or "",
    }


def worker_rows(snap: dict) -> str:
    rows = []
    for w in snap["workers"]:
        if w["attempt"]:
            cls, badge = "busy", f"Worker {w['number']}"
            what = job_about(snap, w["job"])[0] + (f" · task #{w['index']}" if w.get("index") is not None else "")
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
    spare = snap.get("spare")
    if spare is not None:  # idle, no CPU: it takes over when a task of another job comes
        what = "ready for the next researcher's job" if spare["ready"] else "starting Python…"
        rows.append(
            f'<li class="spare"><span class="badge">Spare</span><span class="what">{what}</span>'
            '<span class="time"></span></li>'
        )
    return "".join(rows)

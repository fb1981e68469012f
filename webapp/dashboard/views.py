"""What the dashboard shows: HTML fragments drawn from the API's JSON.

Pure functions (plain dicts in, strings out; every value escaped), so they run in the page and
in CPython tests alike. ``webapp/dashboard.py`` puts them into the DOM.
"""

from __future__ import annotations

import json
import time
from html import escape
from typing import Any

from ..words import plural
from . import verify

TERMINAL = ("done", "failed", "cancelled")
PREVIEW_ROWS = 50
FORMATS = (("txt", ".txt"), ("json", "JSON"), ("ndjson", "NDJSON"), ("csv", "CSV"))


def esc(value: Any) -> str:
    return escape(str(value), quote=True)


def when(ts: float | None, now: float | None = None) -> str:
    """A timestamp as "12 s ago", "3 min ago", "2 h ago" or a date."""
    if not ts:
        return "—"
    now = time.time() if now is None else now
    ago = max(0.0, now - ts)
    if ago < 60:
        return f"{ago:.0f} s ago"
    if ago < 3600:
        return f"{ago / 60:.0f} min ago"
    if ago < 86400:
        return f"{ago / 3600:.0f} h ago"
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def rate(value: float | None) -> str:
    if not value:
        return "—"
    return f"{value:.1f}/s" if value >= 1 else f"{value * 60:.1f}/min"


def progress(job: dict) -> tuple[float, float]:
    """Fractions of the job done and failed (0..1)."""
    n = max(1, job.get("n_tasks") or 0)
    counts = job.get("counts") or {}
    return counts.get("done", 0) / n, counts.get("failed", 0) / n


def speed(job: dict, now: float | None = None) -> float:
    """Tasks per second, as the server defines it for the API, the list and this view alike: over
    the last 30 s while the job runs, over its whole run (first start to last finish) once ended."""
    del now  # one definition, the server's: nothing is recomputed here
    return job.get("throughput") or 0.0


def eta(job: dict, now: float | None = None, task_etas: list[float] | None = None) -> float | None:
    """Seconds left, or None when it cannot be told.

    At the current throughput, less the share of running tasks their progress says is done
    (uvm.progress); while no task has finished lately (long tasks), the slowest running task's
    own estimate (``task_etas``, see ``task_eta``) once it is the last work left."""
    if job.get("state") in TERMINAL:
        return 0.0
    counts = job.get("counts") or {}
    done_share = sum(min(1.0, max(0.0, p.get("progress") or 0.0)) for p in job.get("progress") or [])
    held = counts.get("queued", 0) + counts.get("running", 0) + counts.get("leased", 0)
    left = max(0.0, held - done_share)
    rate_now = speed(job, now)
    if rate_now > 0:
        return left / rate_now
    if task_etas and counts.get("queued", 0) == 0 and len(task_etas) >= counts.get("running", 0):
        return max(task_etas)
    return None


def task_eta(first: tuple[float, float], last: tuple[float, float]) -> float | None:
    """Seconds a running task still needs, from two of its progress reports ``(fraction, at)``."""
    (p0, t0), (p1, t1) = first, last
    if p1 <= p0 or t1 <= t0:
        return None
    return (1.0 - p1) * (t1 - t0) / (p1 - p0)


def running_tasks(job: dict) -> str:
    """The running tasks that report their progress (uvm.progress), each with a bar."""
    entries = [] if job.get("state") in TERMINAL else (job.get("progress") or [])
    if not entries:
        return ""
    rows = []
    for entry in entries[:50]:
        fraction = min(1.0, max(0.0, float(entry.get("progress") or 0.0)))
        rows.append(
            f'<li data-task="{esc(entry.get("index"))}"><span>task {esc(entry.get("index"))}</span>'
            f'<div class="mini-progress"><div class="bar done" style="width:{fraction * 100:.1f}%"></div></div>'
            f'<span class="num">{fraction * 100:.0f}%</span></li>'
        )
    more = f'<li class="muted small">and {len(entries) - 50} more</li>' if len(entries) > 50 else ""
    return f'<h2 class="small">Running tasks</h2><ul class="running-tasks">{"".join(rows)}{more}</ul>'


def job_name(job: dict) -> str:
    return job.get("name") or f"Job {job['id']}"


def state_label(job: dict) -> tuple[str, str]:
    """(text, css state) of a job's badge. A finished job where some tasks failed (the API's state
    ``failed``) reads "finished · N done, M failed" in amber; red only when nothing succeeded."""
    state = job.get("state", "")
    counts = job.get("counts") or {}
    done, failed = counts.get("done", 0), counts.get("failed", 0)
    if state == "failed" and done > 0:
        return f"finished · {done} done, {failed} failed", "partial"
    return state, state


def state_badge(job: dict) -> str:
    text, css = state_label(job)
    return f'<span class="state state-{esc(css)}">{esc(text)}</span>'


def jobs_table(jobs: list[dict], now: float | None = None) -> str:
    if not jobs:
        return '<p class="empty">No jobs yet. <a href="#/new">Write your first one.</a></p>'
    rows = []
    for job in jobs:
        done, failed = progress(job)
        counts = job.get("counts") or {}
        finished = counts.get("done", 0) + counts.get("failed", 0)
        rows.append(
            f'<tr data-job="{job["id"]}">'
            f'<td class="num">{job["id"]}</td>'
            f'<td><a href="#/job/{job["id"]}">{esc(job_name(job))}</a>{_chain_note(job)}</td>'
            f"<td>{state_badge(job)}</td>"
            f'<td><div class="mini-progress" title="{finished} of {job["n_tasks"]}">'
            f'<div class="bar done" style="width:{done * 100:.1f}%"></div>'
            f'<div class="bar failed" style="width:{failed * 100:.1f}%"></div></div>'
            f'<span class="muted small">{finished}/{job["n_tasks"]}</span></td>'
            f'<td class="hide-phone">{esc(when(job.get("created_at"), now))}</td>'
            f'<td class="hide-phone">{esc(rate(speed(job, now)))}</td>'
            "</tr>"
        )
    head = (
        "<thead><tr><th>#</th><th>Name</th><th>State</th><th>Progress</th>"
        '<th class="hide-phone">Created</th><th class="hide-phone">Throughput</th></tr></thead>'
    )
    return f'<table class="table jobs">{head}<tbody>{"".join(rows)}</tbody></table>'


def _chain_note(job: dict) -> str:
    parent = job.get("parent_job_id")
    if not parent:
        return ""
    kind = "after" if job.get("inputs_kind") == "after" else "results of"
    return f' <span class="muted small">({kind} #{esc(parent)})</span>'


def job_stats(job: dict, now: float | None = None, task_etas: list[float] | None = None) -> str:
    counts = job.get("counts") or {}
    items = [
        ("queued", counts.get("queued", 0)),
        ("running", counts.get("running", 0)),
        ("prefetched", counts.get("leased", 0)),
        ("done", counts.get("done", 0)),
        ("failed", counts.get("failed", 0)),
        ("cancelled", counts.get("cancelled", 0)),
        ("throughput", rate(speed(job, now))),
        ("time left", "—" if job.get("state") in TERMINAL else duration(eta(job, now, task_etas))),
        ("volunteers", job.get("volunteers", 0)),
    ]
    return "".join(
        f'<div class="stat" data-stat="{esc(label.replace(" ", "-"))}">'
        f'<span class="stat-value">{esc(value)}</span><span class="stat-label">{esc(label)}</span></div>'
        for label, value in items
    )


def no_volunteer_hint(job: dict, volunteer_url: str) -> str:
    """For a running job nobody computes (no tasks running or prefetched): say so, and how to get
    volunteers: the volunteer page's link, to share."""
    counts = job.get("counts") or {}
    if job.get("state") != "running" or job.get("volunteers") or counts.get("running") or counts.get("leased"):
        return ""
    link = esc(volunteer_url)
    return (
        '<div class="hint-box" id="no-volunteers"><strong>No volunteer is connected to this job right now.</strong> '
        "Its tasks wait until someone opens the volunteer page. "
        f'Share this link: <a href="{link}" target="_blank" rel="noopener">{link}</a> '
        '<button type="button" class="small" data-action="copy-volunteer-link">Copy link</button></div>'
    )


def job_subtitle(job: dict) -> str:
    """One line under the job's title (HTML): tasks, times, and the job its inputs come from."""
    parts = [plural(job["n_tasks"], "task"), f"created {esc(when(job.get('created_at')))}"]
    if job.get("finished_at"):
        parts.append(f"finished {esc(when(job['finished_at']))}")
    parent = job.get("parent_job_id")
    if parent:
        how = "pipeline stage after" if job.get("inputs_kind") == "after" else "inputs: results of"
        parts.append(f'{how} <a href="#/job/{int(parent)}">job {int(parent)}</a>')
    return " · ".join(parts)


def downloads(job_id: int) -> str:
    return "".join(
        f'<a class="button small" href="/api/jobs/{job_id}/results?format={fmt}" download '
        f'data-format="{fmt}">{label}</a>'
        for fmt, label in FORMATS
    )


def errors_html(body: dict) -> str:
    groups = body.get("groups") or []
    if not groups:
        return '<p class="muted">No errors.</p>'
    out = []
    for group in groups:
        indices = ", ".join(str(i) for i in group.get("indices", [])[:20])
        more = "…" if group.get("count", 0) > 20 else ""
        out.append(
            '<details class="error-group">'
            f'<summary><span class="count">{group.get("count", 0)}×</span> <code>{esc(group.get("message"))}</code>'
            f'<span class="muted small"> input{"s" if group.get("count", 0) > 1 else ""} #{esc(indices)}{more}</span>'
            "</summary>"
            + (
                verify.no_agreement_html(group["traceback"])
                if verify.variants(group.get("traceback"))
                else f'<pre class="traceback">{esc(group.get("traceback") or "")}</pre>'
            )
            + "</details>"
        )
    return "".join(out)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def results_table(rows: list[dict], total: int | None = None) -> str:
    if not rows:
        return '<p class="muted">No results yet.</p>'
    body = []
    for row in rows[:PREVIEW_ROWS]:
        if row.get("state") == "done":
            result = f"<code>{esc(_short(row.get('result')))}</code>"
        elif row.get("state") == "failed" and verify.variants(row.get("error")):
            result = verify.no_agreement_html(row["error"])
        elif row.get("state") == "failed":
            last = (row.get("error") or "").strip().splitlines()
            result = f'<span class="bad">{esc(_short(last[-1] if last else "failed"))}</span>'
        else:
            result = verify.awaiting(row) or f'<span class="muted">({esc(row.get("state"))})</span>'
        body.append(
            f'<tr><td class="num">{row.get("index")}</td><td><code>{esc(_short(row.get("input"), 60))}</code></td>'
            f"<td>{result}{verify.replica_line(row)}</td>{verify.replica_cells(row)}</tr>"
        )
    total = len(rows) if total is None else total
    more = (
        f'<p class="muted small">Showing {min(len(rows), PREVIEW_ROWS)} of {total}; download for all.</p>'
        if total > PREVIEW_ROWS
        else ""
    )
    return (
        '<table class="table results"><thead><tr><th>#</th><th>Input</th><th>Result</th>'
        f"{verify.REPLICA_HEADS}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>{more}"
    )


def try_html(answer: dict, seconds: float) -> str:
    """What Try shows: the result and captured output, or what went wrong: the requirements could
    not be loaded, the code does not compile (``main`` never ran), or ``main`` raised."""
    parts = []
    error = answer.get("error")
    if error:
        parts.append(f'<p class="bad"><strong>{esc(try_failure(error))}</strong> ({seconds:.2f} s)</p>')
        parts.append(f'<pre class="traceback">{esc(error)}</pre>')
    else:
        parts.append(f'<p class="good"><strong>Result</strong> ({seconds:.2f} s)</p>')
        parts.append(f'<pre class="result">{esc(json.dumps(answer.get("result"), indent=2, ensure_ascii=False))}</pre>')
    if answer.get("output"):
        parts.append(f'<p class="muted small">Printed output</p><pre class="output">{esc(answer["output"])}</pre>')
    return "".join(parts)


COMPILE_ERRORS = ("SyntaxError", "IndentationError", "TabError")


def try_failure(error: str) -> str:
    """The headline over Try's error: which stage failed, in the researcher's words."""
    if error.startswith("could not load requirements"):
        return "The requirements could not be loaded (is the package index reachable, and does it have them?)"
    last = error.strip().splitlines()[-1] if error.strip() else ""
    # runner.py reports a compile error without a traceback: main never ran
    if "Traceback (most recent call last)" not in error and last.startswith(COMPILE_ERRORS):
        return "The code does not compile"
    if error.startswith("TimeoutError"):
        return "main did not finish in time"
    return "main raised an error"


def admin_stats(volunteers: dict) -> str:
    connected = volunteers.get("connected") or []
    paused = sum(1 for v in connected if (v.get("throttle") or {}).get("paused"))
    items = [
        ("connected", len(connected)),
        ("paused", paused),
        ("seen in 10 min", len(volunteers.get("recent") or [])),
        ("tasks held", sum(v.get("held", 0) for v in connected)),
        ("ready tasks", volunteers.get("ready", 0)),
        ("throughput", rate(volunteers.get("throughput"))),
    ]
    return "".join(
        f'<div class="stat" data-stat="{esc(label.replace(" ", "-"))}"><span class="stat-value">{esc(value)}</span>'
        f'<span class="stat-label">{esc(label)}</span></div>'
        for label, value in items
    )


def researchers_table(people: list[dict], me: int) -> str:
    rows = []
    for person in people:
        if person["id"] == me:
            action = '<span class="muted small">you</span>'
        elif person["approved"]:
            action = (
                f'<button type="button" class="small" data-action="revoke" data-id="{person["id"]}">Revoke</button>'
            )
        else:
            action = (
                f'<button type="button" class="small primary" data-action="approve" data-id="{person["id"]}">'
                "Approve</button>"
            )
        role = "operator" if person.get("operator") else "researcher"
        status = "approved" if person["approved"] else "not approved"
        rows.append(
            f'<tr data-researcher="{person["id"]}"><td class="email">{esc(person["email"])}'
            f'<span class="only-phone muted small">{role} · {status}</span></td><td class="hide-phone">{role}</td>'
            f'<td class="hide-phone"><span class="state state-{"done" if person["approved"] else "failed"}">'
            f"{status}</span></td>"
            f'<td class="num">{action}</td></tr>'
        )
    return (
        '<table class="table"><thead><tr><th>Email</th><th class="hide-phone">Role</th>'
        '<th class="hide-phone">Status</th><th></th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def throttle_text(throttle: dict) -> str:
    """A volunteer's throttle state (``workers/supervisor.py`` plus device facts) in a few words."""
    if not throttle:
        return "running"
    if throttle.get("paused"):
        reason = throttle.get("pause_reason") or throttle.get("reason")
        return "paused" + (f": {reason}" if reason else "")
    bits = []
    if "workers" in throttle:
        bits.append(f"{throttle['workers']}/{throttle.get('max_workers', throttle['workers'])} workers")
    battery = throttle.get("battery")
    if isinstance(battery, dict) and "level" in battery:
        bits.append(f"battery {battery['level'] * 100:.0f}%" + (" charging" if battery.get("charging") else ""))
    network = throttle.get("network")
    if isinstance(network, dict) and (network.get("save_data") or network.get("effective_type") not in (None, "4g")):
        bits.append("data saver" if network.get("save_data") else f"{network.get('effective_type')} network")
    if throttle.get("cpu_cap") not in (None, 100):
        bits.append(f"CPU cap {throttle['cpu_cap']}%")
    if throttle.get("hidden"):
        bits.append("tab hidden")
    reasons = throttle.get("reasons") or []
    if reasons:
        bits.append(str(reasons[0]))
    return ", ".join(bits) or "running"


def volunteers_table(volunteers: dict, now: float | None = None) -> str:
    connected = volunteers.get("connected") or []
    if not connected:
        return '<p class="muted">No volunteer is connected to this server right now.</p>'
    rows = []
    for v in connected:
        caps = v.get("capabilities") or {}
        device = ", ".join(f"{k} {caps[k]}" for k in ("cores", "workers") if k in caps) or "—"
        rows.append(
            f'<tr data-volunteer="{esc(v["id"])}"><td><code>{esc(v["id"][:12])}</code></td>'
            f'<td class="hide-phone">{esc(device)}</td><td>{esc(throttle_text(v.get("throttle") or {}))}</td>'
            f'<td class="num">{v.get("held", 0)}</td>'
            f'<td class="hide-phone">{esc(when(v.get("connected_at"), now))}</td></tr>'
        )
    return (
        '<table class="table"><thead><tr><th>Volunteer</th><th class="hide-phone">Device</th><th>Throttle</th>'
        f'<th>Tasks held</th><th class="hide-phone">Connected</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )

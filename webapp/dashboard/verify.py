"""How a job's results are verified, on the dashboard: the new-job form's choice and the job view.

The form offers ``replication`` ("adaptive" or 1-10 volunteers per task), ``quorum``,
``max_replicas`` and a float ``tolerance`` ({"rtol", "atol"}); ``parse`` checks the fields as
they are typed, with the rules of ``server/spec.py``, so what the form sends is what the API
accepts. The job view shows the job status's ``validation`` counts, the setting, and each
task's ``accepted``/``replicas`` (from the exports); a task that failed with ``NoAgreement``
lists its variants.

Pure Python (no browser imports): the page and the CPython tests run the same functions.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from .inputs import InputError

ADAPTIVE = "adaptive"
MAX_REPLICATION = 10  # server/spec.py MAX_REPLICATION (tests/test_dashboard_verify.py keeps them equal)
MAX_REPLICAS = 20  # server/spec.py MAX_REPLICAS
ADAPTIVE_K = 2  # adaptive replication confirms an untrusted volunteer's result with a second one
NO_AGREEMENT = "NoAgreement:"
FIELDS = ("replication", "quorum", "max_replicas", "rtol", "atol")


class VerifyError(InputError):
    """A verification field the API would refuse; ``field`` is the form field to point at."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _esc(value: Any) -> str:
    return escape(str(value), quote=True)


def _int(raw: str, field: str, label: str) -> int | None:
    text = raw.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise VerifyError(f"{label} must be a whole number", field) from None


def _tolerance(raw: str, field: str) -> float | None:
    text = raw.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise VerifyError(f"{field} must be a number such as 1e-9", field) from None
    if not math.isfinite(value) or not 0 <= value < 1e300:
        raise VerifyError(f"{field} must be a non-negative number such as 1e-9", field)
    return value


def parse(fields: dict[str, str]) -> dict[str, Any]:
    """The API's verification settings from the form's text fields (an empty field: the default).

    ``fields``: ``mode`` ("adaptive" or "fixed"), ``replication`` (k), ``quorum``,
    ``max_replicas``, ``rtol``, ``atol``. Raises ``VerifyError`` naming the field to fix."""
    out: dict[str, Any] = {}
    if fields.get("mode", ADAPTIVE) == ADAPTIVE:
        out["replication"], k = ADAPTIVE, ADAPTIVE_K
    else:
        k_typed = _int(fields.get("replication", ""), "replication", "volunteers per task")
        if k_typed is None or not 1 <= k_typed <= MAX_REPLICATION:
            raise VerifyError(f"volunteers per task must be between 1 and {MAX_REPLICATION}", "replication")
        out["replication"] = k = k_typed
    quorum = _int(fields.get("quorum", ""), "quorum", "the quorum")
    if quorum is not None:
        if out["replication"] == ADAPTIVE:
            raise VerifyError("the quorum applies to a fixed number of volunteers; adaptive uses 2", "quorum")
        if not k // 2 + 1 <= quorum <= k:
            raise VerifyError(f"the quorum must be between {k // 2 + 1} (a majority of {k}) and {k} (all)", "quorum")
        out["quorum"] = quorum
    most = _int(fields.get("max_replicas", ""), "max_replicas", "max replicas")
    if most is not None:
        if not k <= most <= MAX_REPLICAS:
            raise VerifyError(f"max replicas must be between {k} and {MAX_REPLICAS}", "max_replicas")
        out["max_replicas"] = most
    typed = {name: _tolerance(fields.get(name, ""), name) for name in ("rtol", "atol")}
    tolerance = {name: value for name, value in typed.items() if value is not None}
    if tolerance:
        out["tolerance"] = tolerance
    return out


def settings(replication: int | str, quorum: int | None = None, max_replicas: int | None = None) -> tuple[int, int]:
    """(quorum, max_replicas) with the server's defaults filled in: a majority, and k + 3 (at most 20)."""
    k = ADAPTIVE_K if replication == ADAPTIVE else int(replication)
    return quorum or k // 2 + 1, max_replicas or min(k + 3, MAX_REPLICAS)


def explain(choice: dict[str, Any]) -> str:
    """One line on what the chosen verification does and what it costs (results per task)."""
    replication = choice.get("replication", ADAPTIVE)
    quorum, most = settings(replication, choice.get("quorum"), choice.get("max_replicas"))
    if replication == ADAPTIVE:
        return (
            "A second volunteer confirms each result until a volunteer has earned trust; then its results are "
            f"spot-checked. Cost: ≈1.1 results per task once volunteers are trusted (2 before; up to {most} "
            "on disagreement). Needs two volunteers: one browser alone cannot confirm its own results."
        )
    if replication == 1:
        return "One volunteer's result is taken as it is, unchecked. Cost: 1 result per task."
    agree = "all" if quorum == replication else str(quorum)
    return (
        f"{replication} volunteers compute each task and {agree} must agree. "
        f"Cost: {replication} results per task (up to {most} when they disagree)."
    )


def choice_label(default: int | str) -> str:
    """What the form says of the server's default (``UVM_DEFAULT_REPLICATION``)."""
    if default == ADAPTIVE:
        return "adaptive"
    return f"{default} volunteer{'s' if default != 1 else ''} per task"


# ------------------------------------------------------------------------------- the job view
def setting_text(job: dict) -> str:
    """The job's verification setting in words, e.g. "3 volunteers per task, 2 must agree, at most 6"."""
    replication = job.get("replication", 1)
    quorum, most = settings(replication, job.get("quorum"), job.get("max_replicas"))
    if replication == ADAPTIVE:
        text = "adaptive: trusted volunteers are spot-checked, others confirmed by a second "
        text += f"(at most {most} results per task)"
    elif replication == 1:
        text = "1 volunteer per task, unchecked"
    else:
        agree = "all" if quorum == replication else str(quorum)
        text = f"{replication} volunteers per task, {agree} must agree (at most {most} results per task)"
    tolerance = job.get("tolerance") or {}
    if tolerance:
        text += "; floats within " + ", ".join(
            f"{k} {_number(tolerance[k])}" for k in ("rtol", "atol") if k in tolerance
        )
    return text


def results_key(job: dict) -> tuple[int, int, int]:
    """(done, failed, awaiting confirmation): the results table is drawn again when it changes, and
    has something to show when it is not all zero (a pending result becoming done changes it too)."""
    counts = job.get("counts") or {}
    pending = (job.get("validation") or {}).get("pending_validation", 0)
    return counts.get("done", 0), counts.get("failed", 0), pending


def _number(value: float) -> str:
    """1e-9, not Python's 1e-09."""
    return f"{value:g}".replace("e-0", "e-").replace("e+0", "e+")


def waiting_note(job: dict) -> str:
    """ "N results waiting for a second volunteer to confirm" (the client's words), or ""."""
    n = (job.get("validation") or {}).get("pending_validation", 0)
    if not n:
        return ""
    who = "a second volunteer" if job.get("replication") in (ADAPTIVE, 2) else "more volunteers"
    return f"{n} result{'s' if n != 1 else ''} waiting for {who} to confirm"


def validation_html(job: dict, no_agreement: int = 0) -> str:
    """The job's validation state: setting, counts, cost, and the one-browser note when results wait."""
    v = job.get("validation") or {}
    done = (job.get("counts") or {}).get("done", 0)
    validated = v.get("validated", 0)
    finished = done + (job.get("counts") or {}).get("failed", 0)
    per_task = f"{v.get('replicas_per_task', 0.0):.2f}" if finished else "—"  # the API divides by finished tasks
    items = [
        ("validated", validated, "done, confirmed by agreeing volunteers"),
        ("accepted alone", max(0, done - validated), "done on one volunteer's word (trusted, or replication 1)"),
        ("waiting", v.get("pending_validation", 0), "results waiting for another volunteer to confirm"),
        ("disagreements", v.get("disagreements", 0), "tasks whose volunteers' results differed"),
        ("no agreement", no_agreement, "tasks failed: no quorum after the most replicas allowed"),
        ("replicas per task", per_task, f"{v.get('replicas', 0)} results received"),
    ]
    stats = "".join(
        f'<div class="stat" data-stat="{_esc(label.replace(" ", "-"))}" title="{_esc(title)}">'
        f'<span class="stat-value">{_esc(value)}</span><span class="stat-label">{_esc(label)}</span></div>'
        for label, value, title in items
    )
    note = waiting_note(job)
    hint = ""
    if note and job.get("state") not in ("done", "failed", "cancelled"):
        hint = (
            f'<p class="hint-wait" id="waiting-note"><strong>{_esc(note)}.</strong> One volunteer (or two tabs of '
            "one browser) cannot confirm its own results: volunteer from a second browser or a private window.</p>"
        )
    return (
        f'<h2 class="small">Verification</h2><p class="muted small verify-setting">{_esc(setting_text(job))}</p>'
        f'<div class="stats verify-stats">{stats}</div>{hint}'
    )


def variants(error: str | None) -> tuple[str, list[tuple[int, str]]] | None:
    """A ``NoAgreement`` error's headline and its variants [(volunteers, value)], else None."""
    text = (error or "").strip()
    if not text.startswith(NO_AGREEMENT):
        return None
    head, *lines = text.splitlines()
    out = []
    for line in lines:
        count, sep, value = line.strip().partition("x ")
        if sep and count.isdigit():
            out.append((int(count), value))
    return head, out


def no_agreement_html(error: str) -> str:
    """A NoAgreement failure, readable: "no agreement after 3 results" and each variant's count."""
    parsed = variants(error)
    if parsed is None:
        return ""
    head, found = parsed
    n = head.split("after ", 1)[1].split(" ", 1)[0] if "after " in head else "?"
    rows = "".join(
        f'<li><span class="count">{c} volunteer{"s" if c != 1 else ""}:</span> <code>{_esc(value)}</code></li>'
        for c, value in found
    )
    return (
        f'<span class="bad">No agreement after {_esc(n)} results</span>'
        f'<ul class="variants" aria-label="the results the volunteers sent">{rows}</ul>'
    )


def awaiting(row: dict) -> str:
    """The results table's Result cell for a task whose result awaits confirmation, else ""."""
    n = row.get("replicas") or 0
    if row.get("state") in ("done", "failed") or not n:
        return ""
    return f'<span class="muted">({n} result{"s" if n != 1 else ""} in, waiting for confirmation)</span>'


def replica_cells(row: dict) -> str:
    """The results table's two cells of verification: how the result was accepted, and replicas
    (on a phone these columns are hidden; ``replica_line`` says the same under the result)."""
    return (
        f'<td class="accepted small hide-phone">{_esc(_accepted(row) or "—")}</td>'
        f'<td class="num hide-phone">{_esc(row.get("replicas", 0))}</td>'
    )


def replica_line(row: dict) -> str:
    """On a phone, under the result: "2/3 · 3 replicas"."""
    n = row.get("replicas", 0)
    accepted = _accepted(row)
    text = (f"{accepted} · " if accepted else "") + f"{n} replica{'s' if n != 1 else ''}"
    return f'<span class="only-phone muted small replica-line">{_esc(text)}</span>'


def _accepted(row: dict) -> str:
    accepted = row.get("accepted") or ""
    if not accepted and row.get("state") == "failed" and variants(row.get("error")) is not None:
        return "no agreement"
    if not accepted and row.get("state") not in ("done", "failed") and row.get("replicas"):
        return "waiting"
    return accepted


REPLICA_HEADS = (
    '<th class="hide-phone" title="how its result was accepted">Accepted</th><th class="num hide-phone">Replicas</th>'
)

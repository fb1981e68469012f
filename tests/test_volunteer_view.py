"""The volunteer page's words, from snapshots: states, details, device chips, worker rows."""

from __future__ import annotations

import pytest

from webapp.volunteer.view import (
    HEADLINES,
    credit_text,
    detail,
    device_chips,
    helping,
    page_state,
    plural,
    seconds,
    worker_rows,
)


def snapshot(**changes: object) -> dict:
    snap = {
        "running": True,
        "welcomed": True,
        "failures": 0,
        "reconnect_in": None,
        "plan": {"paused": False, "pause_reason": "", "workers": 2, "max_workers": 3, "reasons": []},
        "device": {"cores": 4, "battery": None, "network": None, "hidden": False},
        "workers": [{"number": 1, "ready": True, "attempt": None, "job": None, "index": None, "elapsed": None}],
    }
    snap.update(changes)
    return snap


def busy(number: int = 1) -> dict:
    return {"number": number, "ready": True, "attempt": "a", "job": 7, "index": 3, "elapsed": 1.25}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"running": False}, "stopped"),
        ({"plan": {"paused": True, "pause_reason": "Battery low", "workers": 0, "max_workers": 3}}, "paused"),
        ({"welcomed": False}, "connecting"),
        ({"welcomed": False, "failures": 2, "reconnect_in": 3.0}, "offline"),
        ({"workers": []}, "starting"),
        ({"workers": [{"number": 1, "ready": False, "attempt": None}]}, "starting"),
        ({}, "waiting"),
        ({"workers": [busy()]}, "running"),
    ],
)
def test_page_state(changes: dict, expected: str) -> None:
    state = page_state(snapshot(**changes))
    assert state == expected and state in HEADLINES


def test_details_say_why() -> None:
    paused = snapshot(
        plan={"paused": True, "pause_reason": "Battery low (9%).", "workers": 0, "max_workers": 3},
        workers=[busy(1), busy(2)],
    )
    assert detail("paused", paused) == "Battery low (9%). Finishing 2 tasks already started."
    assert "Trying again in 3 s" in detail("offline", snapshot(reconnect_in=3.2))
    assert "Trying again now" in detail("offline", snapshot(reconnect_in=0.2))
    assert "2 workers" in detail("starting", snapshot())
    assert "Nothing starts until you press Start" in detail("stopped", snapshot())


@pytest.mark.parametrize(
    ("value", "text"), [(0, "0.0 s"), (4.25, "4.2 s"), (42, "42 s"), (185, "3 min 5 s"), (7800, "2 h 10 min")]
)
def test_seconds(value: float, text: str) -> None:
    assert seconds(value) == text


def test_device_chips_name_missing_apis_and_warn() -> None:
    assert device_chips(snapshot()) == [
        ("4 cores", False),
        ("battery: not reported by this browser", False),
        ("network: not reported by this browser", False),
        ("tab visible", False),
    ]
    device = {
        "cores": None,
        "battery": {"charging": False, "level": 0.42},
        "network": {"effective_type": "2g", "save_data": False},
        "hidden": True,
    }
    assert device_chips(snapshot(device=device)) == [
        ("cores: unknown", False),
        ("on battery · 42%", True),
        ("network 2g", True),
        ("tab hidden", True),
    ]


def test_worker_rows_escape_and_describe() -> None:
    rows = worker_rows(snapshot(workers=[busy(1), {"number": 2, "ready": False, "attempt": None}]))
    assert "a research job · task #3" in rows and "1.2 s" in rows and "starting Python…" in rows
    assert worker_rows(snapshot(workers=[])) == '<li class="empty">No workers running.</li>'


def test_the_page_names_the_job_and_credits_the_volunteer() -> None:
    """The job's name and description instead of ids; validated results; "1 task", never "task(s)"."""
    jobs = {"7": {"name": "Primes <b>", "description": "Twin primes for a course & more"}}
    snap = snapshot(workers=[busy(1)], jobs=jobs)
    assert "Primes &lt;b&gt; · task #3" in worker_rows(snap)
    assert helping(snap) == (
        '<p class="helping" data-job="7"><strong>Primes &lt;b&gt;</strong>'
        '<span class="about">Twin primes for a course &amp; more</span></p>'
    )
    assert detail("running", snap) == "1 task running in the background. You can keep using your device."
    between = snapshot(workers=[{**busy(1), "job": None}], jobs=jobs)  # a slot given a task, its job not yet set
    assert helping(between) == ""
    assert credit_text(snap)["validated"] == "—"
    credit = {"known": True, "validated": 1, "validated_session": 1, "validated_seconds": 2.5, "nickname": "Ada"}
    texts = credit_text(snapshot(credit=credit))
    assert texts["validated_sub"] == "1 result all time · 2.5 s credited"
    assert texts["nickname"] == "Listed on the leaderboard as Ada."
    assert plural(2, "result") == "2 results" and plural(1, "worker") == "1 worker"


def test_the_spare_worker_is_shown_while_workers_run() -> None:
    rows = worker_rows(snapshot(workers=[busy(1)], spare={"ready": True}))
    assert rows.count("<li") == 2 and "Spare" in rows and "ready for the next researcher's job" in rows
    assert "starting Python" in worker_rows(snapshot(workers=[busy(1)], spare={"ready": False}))
    assert "Spare" not in worker_rows(snapshot(workers=[busy(1)], spare=None))


def test_a_vault_in_memory_only_is_said() -> None:
    chips = device_chips(snapshot(vault_note="WebCrypto needs https (or localhost)"))
    assert chips[-1] == ("work not kept across reloads: WebCrypto needs https (or localhost)", True)

"""The dashboard's verification choice and validation view (``webapp/dashboard/verify.py``), in CPython.

What the form accepts is what the API accepts (``server/spec.py`` parses every setting the form
makes), and what the form refuses the API refuses too; the job view's words come from the job
status and from the validator's own "no agreement" error.
"""

from __future__ import annotations

import pytest

from server import spec
from server.config import Config
from server.jobs.validator import Replica, no_agreement
from webapp.dashboard import verify, views

CODE = "def main(x):\n    return x\n"


def form(**fields: str) -> dict[str, str]:
    return {"mode": "fixed", "replication": "3", "quorum": "", "max_replicas": "", "rtol": "", "atol": "", **fields}


def api_accepts(settings: dict) -> spec.JobSpec:
    return spec.parse({"code": CODE, "inputs": [1], **settings}, Config())


def test_limits_are_the_servers():
    assert (verify.MAX_REPLICATION, verify.MAX_REPLICAS, verify.ADAPTIVE) == (
        spec.MAX_REPLICATION,
        spec.MAX_REPLICAS,
        spec.ADAPTIVE,
    )


@pytest.mark.parametrize(
    ("fields", "sent"),
    [
        ({"mode": "adaptive"}, {"replication": "adaptive"}),
        ({"mode": "adaptive", "replication": "not looked at"}, {"replication": "adaptive"}),
        ({}, {"replication": 3}),
        ({"replication": " 1 "}, {"replication": 1}),
        (
            {"replication": "10", "quorum": "10", "max_replicas": "20"},
            {"replication": 10, "quorum": 10, "max_replicas": 20},
        ),
        ({"quorum": "2", "max_replicas": "3"}, {"replication": 3, "quorum": 2, "max_replicas": 3}),
        ({"mode": "adaptive", "max_replicas": "2"}, {"replication": "adaptive", "max_replicas": 2}),
        ({"rtol": "1e-9"}, {"replication": 3, "tolerance": {"rtol": 1e-9}}),
        ({"rtol": "1e-6", "atol": "0"}, {"replication": 3, "tolerance": {"rtol": 1e-6, "atol": 0.0}}),
    ],
)
def test_what_the_form_sends_the_api_accepts(fields, sent):
    settings = verify.parse(form(**fields))
    assert settings == sent
    job = api_accepts(settings)
    assert job.replication == sent["replication"]
    assert (job.quorum, job.max_replicas, job.tolerance) == (
        sent.get("quorum"),
        sent.get("max_replicas"),
        sent.get("tolerance"),
    )


@pytest.mark.parametrize(
    ("fields", "field", "message", "api_body"),
    [
        ({"replication": "0"}, "replication", "between 1 and 10", {"replication": 0}),
        ({"replication": "11"}, "replication", "between 1 and 10", {"replication": 11}),
        ({"replication": "2.5"}, "replication", "whole number", {"replication": 2.5}),
        ({"replication": ""}, "replication", "between 1 and 10", {"replication": None, "quorum": 1}),
        ({"quorum": "1"}, "quorum", "between 2 (a majority of 3) and 3", {"replication": 3, "quorum": 1}),
        ({"quorum": "4"}, "quorum", "between 2 (a majority of 3) and 3", {"replication": 3, "quorum": 4}),
        ({"mode": "adaptive", "quorum": "2"}, "quorum", "adaptive uses 2", {"replication": "adaptive", "quorum": 2}),
        ({"max_replicas": "2"}, "max_replicas", "between 3 and 20", {"replication": 3, "max_replicas": 2}),
        ({"max_replicas": "21"}, "max_replicas", "between 3 and 20", {"replication": 3, "max_replicas": 21}),
        ({"rtol": "-1"}, "rtol", "non-negative", {"replication": 3, "tolerance": {"rtol": -1}}),
        ({"atol": "abc"}, "atol", "a number such as 1e-9", {"replication": 3, "tolerance": {"atol": "abc"}}),
        ({"atol": "inf"}, "atol", "non-negative", {"replication": 3, "tolerance": {"atol": 1e300}}),
    ],
)
def test_bad_values_are_refused_with_a_message_as_the_api_does(fields, field, message, api_body):
    with pytest.raises(verify.VerifyError) as caught:
        verify.parse(form(**fields))
    assert caught.value.field == field and message in str(caught.value)
    with pytest.raises(spec.InvalidJob):  # the API refuses the same (never silently ignores it)
        api_accepts(api_body)


def test_each_choice_is_explained_with_its_cost():
    assert "≈1.1 results per task" in verify.explain({"replication": "adaptive"})
    assert "two volunteers" in verify.explain({"replication": "adaptive"})
    assert (
        verify.explain({"replication": 1})
        == "One volunteer's result is taken as it is, unchecked. Cost: 1 result per task."
    )
    three = verify.explain({"replication": 3})
    assert (
        three
        == "3 volunteers compute each task and 2 must agree. Cost: 3 results per task (up to 6 when they disagree)."
    )
    assert "and all must agree" in verify.explain({"replication": 3, "quorum": 3, "max_replicas": 8})
    assert "up to 8" in verify.explain({"replication": 3, "quorum": 3, "max_replicas": 8})
    assert verify.choice_label("adaptive") == "adaptive" and verify.choice_label(2) == "2 volunteers per task"


def job(**over: object) -> dict:
    base = {
        "id": 4,
        "state": "running",
        "n_tasks": 10,
        "counts": {"queued": 4, "running": 0, "done": 5, "failed": 1, "cancelled": 0},
        "replication": 3,
        "quorum": 2,
        "max_replicas": 6,
        "tolerance": {"rtol": 1e-9},
        "validation": {
            "validated": 4,
            "pending_validation": 2,
            "disagreements": 3,
            "replicas": 19,
            "replicas_per_task": 3.167,
        },
    }
    return {**base, **over}


def stat(html: str, name: str) -> str:
    start = html.index(f'data-stat="{name}"')
    value = html.index('<span class="stat-value">', start) + len('<span class="stat-value">')
    return html[value : html.index("</span>", value)]


def test_validation_state_of_a_job():
    html = verify.validation_html(job(), no_agreement=1)
    assert "3 volunteers per task, 2 must agree (at most 6 results per task); floats within rtol 1e-9" in html
    assert [stat(html, s) for s in ("validated", "accepted-alone", "waiting", "disagreements", "no-agreement")] == [
        "4",
        "1",
        "2",
        "3",
        "1",
    ]
    assert stat(html, "replicas-per-task") == "3.17" and "19 results received" in html
    assert "2 results waiting for more volunteers to confirm." in html


def test_a_newcomer_with_one_volunteer_is_told_why_results_wait():
    adaptive = job(replication="adaptive", quorum=2, max_replicas=5, tolerance=None)
    html = verify.validation_html(adaptive)
    nothing_finished = {**adaptive, "counts": {"queued": 10}, "validation": {"pending_validation": 4, "replicas": 4}}
    assert stat(verify.validation_html(nothing_finished), "replicas-per-task") == "—"  # not 0.00 with 4 results in
    assert "adaptive: trusted volunteers are spot-checked" in html
    assert "2 results waiting for a second volunteer to confirm." in html and "private window" in html
    one = job(replication="adaptive", validation={**adaptive["validation"], "pending_validation": 1})
    assert verify.waiting_note(one) == "1 result waiting for a second volunteer to confirm"
    assert "waiting-note" not in verify.validation_html({**adaptive, "state": "done"})  # nothing waits on an ended job
    assert verify.waiting_note(job(validation={"pending_validation": 0})) == ""
    assert verify.setting_text(job(replication=1, quorum=1, max_replicas=4, tolerance=None)) == (
        "1 volunteer per task, unchecked"
    )


def test_no_agreement_lists_the_variants_as_the_api_does():
    replicas = [Replica("a1", "v1", {"sq": 4}), Replica("a2", "v2", {"sq": 4}), Replica("a3", "v3", 0.25)]
    error = no_agreement([replicas[:2], replicas[2:]])  # the validator's own words
    head, found = verify.variants(error)
    assert head.startswith("NoAgreement: no quorum after 3 replicas")
    assert found == [(2, '{"sq":4}'), (1, "0.25")]
    assert verify.variants("Traceback ...\nValueError: x") is None
    html = verify.no_agreement_html(error)
    assert "No agreement after 3 results" in html
    assert "2 volunteers:</span> <code>{&quot;sq&quot;:4}</code>" in html and "1 volunteer:</span> <code>0.25" in html

    rows = [
        {"index": 0, "input": 2, "state": "done", "result": {"sq": 4}, "accepted": "2/3", "replicas": 3},
        {"index": 1, "input": 3, "state": "failed", "error": error, "accepted": None, "replicas": 3},
        {"index": 2, "input": 4, "state": "open", "result": None, "accepted": None, "replicas": 1},
        {"index": 3, "input": 5, "state": "done", "result": 25, "accepted": "trusted, spot-check 10%", "replicas": 1},
    ]
    table = views.results_table(rows)
    assert "<th>Input</th><th>Result</th><th" in table and ">Accepted</th>" in table and ">Replicas</th>" in table
    assert '<td class="accepted small hide-phone">2/3</td><td class="num hide-phone">3</td>' in table
    assert '<td class="accepted small hide-phone">no agreement</td><td class="num hide-phone">3</td>' in table
    assert '<td class="accepted small hide-phone">waiting</td><td class="num hide-phone">1</td>' in table
    assert "(1 result in, waiting for confirmation)" in table
    assert '<span class="only-phone muted small replica-line">2/3 · 3 replicas</span>' in table  # phones
    assert "no agreement · 3 replicas" in table and "waiting · 1 replica<" in table
    assert "trusted, spot-check 10%" in table
    assert "1 volunteer:</span> <code>0.25" in table  # not only the last line of the error

    groups = {
        "groups": [
            {"message": "NoAgreement: ...", "type": "NoAgreement", "count": 1, "indices": [1], "traceback": error}
        ]
    }
    assert "No agreement after 3 results" in views.errors_html(groups) and "<pre" not in views.errors_html(groups)


def test_results_with_a_result_awaiting_confirmation_are_shown():
    waiting = job(counts={"queued": 10, "done": 0, "failed": 0}, validation={"pending_validation": 3})
    assert verify.results_key(waiting) == (0, 0, 3)
    confirmed = job(counts={"queued": 9, "done": 1, "failed": 0}, validation={"pending_validation": 2})
    assert verify.results_key(confirmed) != verify.results_key(waiting)  # one confirmed: drawn again
    assert not any(verify.results_key({"counts": {}}))

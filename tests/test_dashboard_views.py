"""The dashboard's pure Python (inputs parsing and HTML fragments), run here in CPython."""

from __future__ import annotations

import pytest

from webapp.dashboard import inputs, views


def test_parsers_accept_each_input_form():
    assert inputs.parse("json", {"json": ' [1, {"a": 2}, null] '}) == [1, {"a": 2}, None]
    assert inputs.parse("csv", {"csv": "\ufeffa,b,name\n1,2.5,x\n-3,1e3, y \n\n"}) == [
        {"a": 1, "b": 2.5, "name": "x"},
        {"a": -3, "b": 1000.0, "name": " y "},
    ]
    assert inputs.parse("csv", {"csv": "n\nnan\ninf\n"}) == [{"n": "nan"}, {"n": "inf"}]  # not JSON numbers
    assert inputs.parse("lines", {"lines": "alpha\r\n\n beta\n"}) == ["alpha", " beta"]
    assert inputs.parse("range", {"start": "10", "stop": "0", "step": "-5"}) == {"range": [10, 0, -5]}
    assert inputs.parse("chain", {"job": "7", "kind": "after"}) == {"after": 7}
    assert inputs.parse("chain", {"job": "7", "kind": "results_of"}) == {"results_of": 7}
    assert inputs.count({"range": [10, 0, -5]}) == 2 and inputs.first({"range": [10, 0, -5]}) == 10
    assert inputs.summary([1, 2]) == "2 tasks; the first input is 1"
    assert "started as each finishes" in inputs.summary({"after": 3})


@pytest.mark.parametrize(
    ("mode", "fields", "message"),
    [
        ("json", {"json": ""}, "paste a JSON list"),
        ("json", {"json": "[1, 2,"}, "not valid JSON: Expecting value (line 1, column 7)"),
        ("json", {"json": '{"a": 1}'}, "must be a JSON list [...], not dict"),
        ("json", {"json": "null"}, "not null"),
        ("json", {"json": "[]"}, "empty"),
        ("csv", {"csv": "a,b\n"}, "at least one data row"),
        ("csv", {"csv": "a,a\n1,2\n"}, "distinct name"),
        ("csv", {"csv": "a,b\n1,2\n3\n"}, "row 3 has 1 cells; the header has 2"),
        ("lines", {"lines": " \n\n"}, "one input per line"),
        ("range", {"start": "a", "stop": "3", "step": "1"}, "whole numbers"),
        ("range", {"start": "0", "stop": "3", "step": "0"}, "must not be zero"),
        ("range", {"start": "5", "stop": "5", "step": "1"}, "range(5, 5, 1) is empty"),
        ("chain", {"job": "", "kind": "after"}, "choose the job"),
        ("chain", {"job": "3", "kind": "sideways"}, "unknown chaining"),
        ("upside", {}, "unknown input mode"),
    ],
)
def test_parsers_explain_bad_input(mode, fields, message):
    with pytest.raises(inputs.InputError) as info:
        inputs.parse(mode, fields)
    assert message in str(info.value)


JOB = {
    "id": 4,
    "name": "<b>squares</b>",
    "state": "running",
    "n_tasks": 10,
    "counts": {"queued": 4, "running": 2, "done": 3, "failed": 1, "cancelled": 0},
    "throughput": 0.5,
    "volunteers": 2,
    "created_at": 1000.0,
    "finished_at": None,
    "parent_job_id": 2,
    "inputs_kind": "after",
}


def test_job_views_escape_and_compute():
    table = views.jobs_table([JOB], now=1030.0)
    assert "&lt;b&gt;squares&lt;/b&gt;" in table and "<b>" not in table
    assert "4/10" in table and "30 s ago" in table and "30.0/min" in table and "(after #2)" in table
    assert views.progress(JOB) == (0.3, 0.1)
    assert views.eta(JOB) == 12.0 and views.eta({**JOB, "throughput": 0}) is None
    assert views.speed(JOB, now=1010.0) == 0.5  # the server's throughput, as it is: one definition
    stats = views.job_stats(JOB)
    assert 'data-stat="time-left"><span class="stat-value">12 s' in stats
    ended = {**JOB, "state": "done", "finished_at": 1020.0, "counts": {**JOB["counts"], "done": 9}}
    assert views.speed(ended) == 0.5 and views.eta(ended) == 0.0
    assert 'data-stat="prefetched"' in views.job_stats({**JOB, "counts": {**JOB["counts"], "leased": 3}})
    assert views.duration(4000) == "67 min" and views.duration(None) == "—"
    assert views.rate(2.0) == "2.0/s" and views.rate(0) == "—"
    assert views.jobs_table([]).startswith('<p class="empty">')


def test_errors_results_try_and_admin_views():
    errors = {"groups": [{"message": "ValueError: <x>", "count": 2, "indices": [3, 5], "traceback": "Traceback…"}]}
    html = views.errors_html(errors)
    assert "2×" in html and "ValueError: &lt;x&gt;" in html and "#3, 5" in html
    rows = [
        {"index": 0, "input": 1, "state": "done", "result": {"a": "<i>"}},
        {"index": 1, "input": 2, "state": "failed", "error": "Traceback\nValueError: no"},
        {"index": 2, "input": 3, "state": "queued"},
    ]
    table = views.results_table(rows, total=80)
    assert "&lt;i&gt;" in table and "ValueError: no" in table and "(queued)" in table
    assert "Showing 3 of 80" in table
    assert "Result" in views.try_html({"result": [1], "output": "hi\n"}, 0.2) and "hi" in views.try_html(
        {"result": [1], "output": "hi\n"}, 0.2
    )
    assert "main raised an error" in views.try_html({"error": "Traceback\nKeyError: 1"}, 0.1)


def test_try_says_which_stage_failed():
    compile_error = (
        "  File \"<job 1a2b>\", line 1\n    def main(x) return 1\n                ^^^^^^\nSyntaxError: expected ':'"
    )
    assert "The code does not compile" in views.try_html({"error": compile_error}, 0.1)
    raised = 'Traceback (most recent call last):\n  File "<job 1>", line 2, in main\nSyntaxError: from eval'
    assert "main raised an error" in views.try_html({"error": raised}, 0.1)  # main ran: it raised
    missing = "could not load requirements six from http://127.0.0.1:9/: 404"
    assert "requirements could not be loaded" in views.try_html({"error": missing}, 0.1)


def test_partial_failure_label_and_plurals():
    partial = {**JOB, "state": "failed", "counts": {**JOB["counts"], "done": 8, "failed": 4, "queued": 0}}
    assert views.state_label(partial) == ("finished · 8 done, 4 failed", "partial")
    assert views.state_label({**partial, "counts": {"done": 0, "failed": 12}}) == ("failed", "failed")
    assert views.state_label({**JOB, "state": "done"}) == ("done", "done")
    assert 'class="state state-partial">finished · 8 done, 4 failed<' in views.jobs_table([partial])
    assert views.plural(1, "task") == "1 task" and views.plural(0, "task") == "0 tasks"
    assert views.job_subtitle({**JOB, "n_tasks": 1}).startswith("1 task ·")


def test_no_volunteer_hint():
    idle = {**JOB, "volunteers": 0, "counts": {**JOB["counts"], "running": 0, "leased": 0}}
    hint = views.no_volunteer_hint(idle, "http://example.org/?<x>")
    assert "No volunteer is connected" in hint and "Share this link" in hint
    assert 'href="http://example.org/?&lt;x&gt;"' in hint
    assert views.no_volunteer_hint(JOB, "http://example.org/") == ""  # someone computes it
    assert views.no_volunteer_hint({**idle, "state": "done"}, "http://example.org/") == ""
    people = [
        {"id": 1, "email": "op@x.org", "approved": True, "operator": True},
        {"id": 2, "email": "r@x.org", "approved": False, "operator": False},
    ]
    admin = views.researchers_table(people, me=1)
    assert 'data-action="approve" data-id="2"' in admin and "you" in admin
    vols = {
        "connected": [
            {"id": "v1", "capabilities": {"cores": 4}, "throttle": {"paused": True, "reason": "battery"}, "held": 2}
        ],
        "recent": [{}, {}],
        "throughput": 1.5,
        "ready": 7,
    }
    assert "paused: battery" in views.volunteers_table(vols) and "cores 4" in views.volunteers_table(vols)
    stats = views.admin_stats(vols)
    assert 'data-stat="paused"><span class="stat-value">1' in stats and "1.5/s" in stats


def test_throttle_text_reads_the_volunteer_page_state():
    state = {
        "workers": 1,
        "max_workers": 3,
        "prefetch": 1,
        "batch_results": False,
        "paused": False,
        "reasons": ["on battery: one worker"],
        "pause_reason": None,
        "cores": 4,
        "battery": {"charging": False, "level": 0.42},
        "network": {"effective_type": "3g", "save_data": False},
        "hidden": True,
        "cpu_cap": 50,
    }
    assert views.throttle_text(state) == (
        "1/3 workers, battery 42%, 3g network, CPU cap 50%, tab hidden, on battery: one worker"
    )
    assert views.throttle_text({**state, "paused": True, "pause_reason": "battery below 20%"}) == (
        "paused: battery below 20%"
    )
    assert views.throttle_text({}) == "running"


def test_running_tasks_progress_and_time_left_from_it() -> None:
    from webapp.dashboard import views as V

    job = {
        "id": 3,
        "state": "running",
        "n_tasks": 2,
        "counts": {"queued": 0, "running": 2, "done": 0, "failed": 0},
        "progress": [{"index": 0, "progress": 0.25, "at": 10.0}, {"index": 1, "progress": 0.5, "at": 10.0}],
    }
    html = V.running_tasks(job)
    assert 'data-task="0"' in html and "25%" in html and "width:50.0%" in html
    assert V.running_tasks({**job, "state": "done"}) == ""
    assert V.running_tasks({**job, "progress": []}) == ""
    # No task finished lately: the slowest running task's own estimate, once nothing is queued.
    assert V.task_eta((0.1, 0.0), (0.5, 40.0)) == 50.0  # 0.4 in 40 s: 0.5 left takes 50 s
    assert V.task_eta((0.5, 0.0), (0.5, 40.0)) is None  # no movement: cannot tell
    assert V.eta(job, now=20.0, task_etas=[50.0, 10.0]) == 50.0
    assert V.eta({**job, "counts": {**job["counts"], "queued": 5}}, now=20.0, task_etas=[50.0, 10.0]) is None
    # With a throughput, the running tasks' done share is not counted again.
    fast = {**job, "throughput": 0.5, "created_at": -100.0}
    assert V.eta(fast, now=20.0) == (2 - 0.75) / 0.5
    assert "<script>" not in V.running_tasks({**job, "progress": [{"index": "<script>", "progress": 0.1}]})

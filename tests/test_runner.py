"""The worker-side runner, run here in CPython: namespaces, capture, errors, JSON results."""

from __future__ import annotations

import json

from workers.runner import MAX_OUTPUT_CHARS, Runner, handle


def run(source: str, value: object = None) -> dict:
    runner = Runner()
    runner.load("h", source, job=7)
    return runner.run("h", value)


def test_result_and_output() -> None:
    out = run("def main(x):\n    print('hi', x)\n    return {'sq': x * x}\n", 4)
    assert out["result"] == {"sq": 16}
    assert out["output"] == "hi 4\n"
    assert out["error"] is None and out["cpu"] >= 0


def test_fresh_namespace_per_task_and_code_compiled_once() -> None:
    runner = Runner()
    runner.load("h", "seen = []\ndef main(x):\n    seen.append(x)\n    return len(seen)\n")
    code = runner.code["h"]
    assert [runner.run("h", i)["result"] for i in range(3)] == [1, 1, 1]
    runner.load("h", "def main(x): return 0\n")  # same hash: kept, not recompiled
    assert runner.code["h"] is code


def test_traceback_shows_source_lines_and_the_job_that_ran() -> None:
    """The offending line is shown (linecache), and a job whose code another job ran first in this
    worker reports its own id, not the first job's (code is cached by hash)."""
    runner = Runner()
    source = "def main(x):\n    y = x + 1\n    raise ValueError(f'bad value {y}')\n"
    runner.load("h", source, job=2)
    first = runner.run("h", 1, job=2)["error"]
    assert "\"<job 2>\", line 3, in main\n    raise ValueError(f'bad value {y}')\n" in first
    later = runner.run("h", 1, job=9)["error"]
    assert '"<job 9>", line 3, in main' in later and "<job 2>" not in later
    assert "raise ValueError(f'bad value {y}')" in later
    assert "<job 2>" in runner.run("h", 1, job=2)["error"]
    assert (
        "<job 9>" in json.loads(handle(json.dumps({"code_hash": "z", "source": source, "job": 9, "input": 0})))["error"]
    )


def test_traceback_shows_only_the_research_code() -> None:
    out = run("def helper(x):\n    return 1 / x\ndef main(x):\n    return helper(x)\n", 0)
    assert out["result"] is None
    assert "ZeroDivisionError" in out["error"]
    assert '"<job 7>", line 2, in helper' in out["error"]
    assert "runner.py" not in out["error"]


def test_base_exceptions_are_reported_not_raised() -> None:
    assert "SystemExit" in run("import sys\ndef main(x):\n    sys.exit(3)\n")["error"]
    assert "KeyboardInterrupt" in run("def main(x):\n    raise KeyboardInterrupt\n")["error"]


def test_syntax_error_and_missing_main() -> None:
    assert "SyntaxError" in run("def main(x) return 1\n")["error"]
    assert "defines no function main" in run("x = 1\n")["error"]
    assert "was not loaded" in Runner().run("nope", 1)["error"]


def test_result_must_be_json() -> None:
    assert "not JSON-serialisable" in run("def main(x):\n    return {1, 2}\n")["error"]
    assert "not JSON-serialisable" in run("def main(x):\n    return float('nan')\n")["error"]


def test_output_is_capped() -> None:
    out = run("def main(x):\n    print('y' * (x * 2))\n    return 1\n", MAX_OUTPUT_CHARS)
    assert out["result"] == 1
    assert len(out["output"]) < MAX_OUTPUT_CHARS + 100
    assert out["output"].endswith("[output truncated]\n")


def test_handle_speaks_json_strings() -> None:
    first = json.loads(handle(json.dumps({"code_hash": "hh", "source": "def main(x): return x + 1", "input": 1})))
    again = json.loads(handle(json.dumps({"code_hash": "hh", "input": 2})))  # source sent once
    assert (first["result"], again["result"]) == (2, 3)

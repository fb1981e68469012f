"""The worker-side runner, run here in CPython: namespaces, capture, errors, JSON results.

It is the only runner of ``main(x)``: the simulated volunteer uses it, and nothing under ``server/``
runs research code (the server compiles it in ``server/spec.py`` and checks received results).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from server import protocol as P
from server.config import Config
from server.jobs.dispatch import validate_received_result
from workers.runner import MAX_OUTPUT_CHARS, MAX_RESULT_BYTES, Runner, handle

ROOT = Path(__file__).resolve().parent.parent


def run(source: str, value: object = None) -> dict:
    runner = Runner()
    runner.load("h", source, job=7)
    return runner.run("h", value)


def test_result_and_output() -> None:
    out = run("def main(x):\n    print('hi', x)\n    return {'sq': x * x}\n", 4)
    assert out["result"] == {"sq": 16}
    assert out["output"] == "hi 4\n"
    assert out["error"] is None and out["elapsed"] >= 0


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


def test_result_size_is_capped() -> None:
    at_limit = run("def main(x):\n    return 'y' * x\n", MAX_RESULT_BYTES - 2)  # two quotes
    assert at_limit["error"] is None and len(at_limit["result"]) == MAX_RESULT_BYTES - 2
    over = run("def main(x):\n    return 'y' * x\n", MAX_RESULT_BYTES - 1)
    assert over["result"] is None and over["error"].endswith(f"the limit is {MAX_RESULT_BYTES}")


def test_runner_limits_are_the_servers() -> None:
    assert MAX_OUTPUT_CHARS == P.MAX_OUTPUT_CHARS
    assert Config.from_env({}).max_result_bytes == MAX_RESULT_BYTES


@pytest.mark.parametrize("value", [float("nan"), "z" * MAX_RESULT_BYTES])
def test_the_server_words_a_refused_result_as_the_runner_does(value: object) -> None:
    """A hostile volunteer's result is refused in the same words an honest runner would use."""
    ran = run("def main(x):\n    return x\n", value)
    received = P.Outcome("a", 1, result=value)
    validate_received_result(received, Config.from_env({}).max_result_bytes)
    assert received.result is None and received.error == ran["error"]


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        10**299,
        10**400,  # past the quick bound: written out, and within the limit
        -1.5e308,
        float("inf"),
        float("-inf"),
        "z" * 100,
        "\U0001f600" * 40,  # 12 characters of JSON each: a pair of escapes
        "\U0001f600" * 43,
        "\u00e9" * 20,
        [1, 2],
    ],
)
def test_the_quick_checks_of_small_results_agree_with_writing_them_out(value: object) -> None:
    """Small results pass without being written out as JSON; at a limit of 500 bytes, each is
    refused or kept exactly as measuring its JSON would decide."""
    limit = 500
    try:
        size = len(json.dumps(value, allow_nan=False, separators=(",", ":")))
    except ValueError:
        size = None
    received = P.Outcome("a", 1, result=value)
    validate_received_result(received, limit)
    if size is not None and size <= limit:
        assert received.error is None and received.result == value
    else:
        assert received.result is None and received.error.startswith("ValueError: the result of main() is")


def _calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def test_only_the_runner_runs_research_code() -> None:
    """No ``exec``/``eval`` under server/ (``compile`` in spec.py only) nor in the simulated volunteer."""
    for path in sorted((ROOT / "server").rglob("*.py")):
        calls = _calls(path)
        assert not calls & {"exec", "eval"}, path
        assert "compile" not in calls or path.name == "spec.py", path
    assert not _calls(ROOT / "workers" / "sim.py") & {"exec", "eval", "compile"}
    assert {"exec", "compile"} <= _calls(ROOT / "workers" / "runner.py")


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_simulated_volunteers_run_tasks_through_the_runner(serve, volunteers) -> None:
    """The runner's marks: its ``<job N>`` file name in tracebacks, and its checks of results."""
    api, _ = await serve()
    job = await api.submit("def main(x):\n    if x:\n        return 1 / 0\n    return {1}\n", [0, 1], max_attempts=1)
    volunteers(api.url, 1)
    assert (await api.wait(job))["state"] == "failed"
    async with api.session.get(f"{api.url}/api/jobs/{job}/errors", headers=api.headers()) as resp:
        errors = {e["index"]: e["error"] for e in (await resp.json())["errors"]}
    assert errors[0].startswith("ValueError: the result of main() is not JSON-serialisable")
    assert f'File "<job {job}>", line 3, in main' in errors[1] and "runner.py" not in errors[1]


def test_output_is_capped() -> None:
    out = run("def main(x):\n    print('y' * (x * 2))\n    return 1\n", MAX_OUTPUT_CHARS)
    assert out["result"] == 1
    assert len(out["output"]) < MAX_OUTPUT_CHARS + 100
    assert out["output"].endswith("[output truncated]\n")


def test_handle_speaks_json_strings() -> None:
    first = json.loads(handle(json.dumps({"code_hash": "hh", "source": "def main(x): return x + 1", "input": 1})))
    again = json.loads(handle(json.dumps({"code_hash": "hh", "input": 2})))  # source sent once
    assert (first["result"], again["result"]) == (2, 3)


def test_a_chunk_runs_in_one_call_each_task_with_its_own_outcome() -> None:
    """``run_many``: a fresh namespace, output and error per task; a task past its timeout gets a
    timeout error; uvm updates say which task of the chunk they are of."""
    code = (
        "import time, uvm\n"
        "seen = []\n"
        "def main(x):\n"
        "    seen.append(x)\n"
        "    print('x', x)\n"
        "    if x == 2:\n"
        "        raise KeyError(x)\n"
        "    if x == 3:\n"
        "        time.sleep(0.05)\n"
        "    uvm.partial(x)\n"
        "    return len(seen)\n"
    )
    sent: list[str] = []
    request = {"code_hash": "chunk", "source": code, "job": 9, "items": [{"input": i} for i in range(5)]}
    answer = json.loads(handle(json.dumps({**request, "timeout": 0.03, "every": 0}), sent.append))
    outcomes = answer["outcomes"]
    assert [o["result"] for o in outcomes] == [1, 1, None, None, 1]  # a fresh namespace each time
    assert [o["output"] for o in outcomes] == [f"x {i}\n" for i in range(5)]
    assert "KeyError: 2" in outcomes[2]["error"] and "timeout" not in outcomes[2]
    assert outcomes[3]["timeout"] is True and outcomes[3]["error"] == "timed out after 0.03 s"
    assert [json.loads(text)["item"] for text in sent] == [0, 1, 3, 4]  # each update names its task


@pytest.mark.parametrize(
    ("returned", "sent"),
    [
        ("(1, 2)", [1, 2]),
        ("{1: 'a'}", {"1": "a"}),
        ("Flag.ON", 1),
        ("Text('abc')", "abc"),
        ("3", 3),
        ("-1.5", -1.5),
        ("'é'", "é"),
        ("None", None),
        ("True", True),
    ],
)
def test_a_result_is_what_its_json_says(returned, sent):
    """The outcome carries the result as its JSON reads back: a tuple a list, int keys strings, a
    subclass of int or str its plain value (only exactly int, float, str, bool and None skip the
    read back)."""
    source = (
        "import enum\n\nclass Flag(enum.IntEnum):\n    ON = 1\n\nclass Text(str):\n    pass\n\n"
        f"def main(x):\n    return {returned}\n"
    )
    result = run(source)["result"]
    assert result == sent and type(result) is type(sent)

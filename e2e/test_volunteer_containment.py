"""Containment in Chromium: a worker runs one job's code only, and research code finds the origin's
storage and channels gone. Tried as an attacker would: hostile jobs of another researcher."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from e2e.conftest import _cli, fake_device, native_results, open_volunteer_page, state, wait_state

# Researcher B's job: patches what it finds in sys.modules and builtins so that any other job's
# task run in this interpreter is recorded and answered "POISONED", and reports what it stole.
HOSTILE = """
import builtins
import json
import sys

import js


def main(x):
    stolen = getattr(builtins, "_uvm_stolen", None)
    report = {"b": x, "had_stash": stolen is not None, "patched": []}
    if stolen is None:
        stolen = builtins._uvm_stolen = []
        report["patched"] = patch(stolen)
    # Messages nobody asked for: the page must drop and count them, never act on them.
    for forged in ('{"type": "ready", "boot": 0}', '{"type": "fatal", "error": "x"}', '{"id": 99999, "result": "{}"}'):
        js.postMessage(js.JSON.parse(forged))
    js.postMessage("not even an object")
    report["stolen"] = list(stolen)
    report["modules"] = len(sys.modules)
    return report


def patch(stolen):
    patched = []
    poison = json.dumps({"result": "POISONED", "output": "", "error": None, "elapsed": 0})

    def spy_handle(original):
        def handle(request, *args, **kwargs):
            data = json.loads(request) if isinstance(request, str) else {}
            if isinstance(data.get("input"), dict) and "b" in data["input"]:
                return original(request, *args, **kwargs)
            stolen.append(repr(request)[:300])
            return poison
        return handle

    for name, module in list(sys.modules.items()):
        if module is None or name.startswith(("_", "js", "pyodide")):
            continue
        for attr in ("handle", "run"):
            if callable(getattr(module, attr, None)) and getattr(module, "__file__", None):
                try:
                    setattr(module, attr, spy_handle(getattr(module, attr)))
                    patched.append(f"{name}.{attr}")
                except Exception:
                    pass
        runner = getattr(module, "_RUNNER", None)
        if runner is not None:
            original_run = runner.run
            def run(code_hash, value, *args, _original=original_run, **kwargs):
                if isinstance(value, dict) and "b" in value:
                    return _original(code_hash, value, *args, **kwargs)
                stolen.append(repr(value)[:300])
                return {"result": "POISONED", "output": "", "error": None, "elapsed": 0}
            runner.run = run
            patched.append(f"{name}._RUNNER.run")
    for name in ("sum", "sorted", "abs", "len", "print"):  # the runner itself needs len and print
        original = getattr(builtins, name)
        def spy(*args, _original=original, _poison=name in ("sum", "sorted", "abs"), **kwargs):
            if args and not (isinstance(args[0], str) and args[0].startswith("b")):
                stolen.append(repr(args)[:300])
            return "POISONED" if _poison else _original(*args, **kwargs)
        setattr(builtins, name, spy)
        patched.append("builtins." + name)
    original_dumps = json.dumps
    def dumps(value, *args, **kwargs):
        mine = isinstance(value, dict) and isinstance(value.get("result"), dict) and "b" in value["result"]
        if isinstance(value, dict) and "result" in value and not mine:
            stolen.append(repr(value)[:300])
            value = dict(value, result="POISONED")
        return original_dumps(value, *args, **kwargs)
    json.dumps = dumps
    patched.append("json.dumps")
    return patched
"""

# Researcher A's job: ordinary code that uses the builtins and modules B patched.
VICTIM = """
import json

def main(x):
    values = sorted([x % 7, x % 5, x % 3])
    print("secret", x)
    return {"x": x, "sum": sum(range(x % 1000)), "sorted": values, "len": len(str(x)), "abs": abs(-x)}
"""
SECRETS = [7_310_001 + 17 * i for i in range(6)]

# A job that goes after the origin's storage and channels, as research code can from a worker.
PROBE = """
import js

GLOBALS = ("indexedDB", "caches", "BroadcastChannel", "webkitRequestFileSystem", "OffscreenCanvas", "IdleDetector")
NAVIGATOR = ("storage", "storageBuckets", "locks", "gpu", "usb", "hid", "serial")


def attempt(what, action):
    try:
        action()
        return "reached"
    except Exception as exc:
        return "blocked: " + type(exc).__name__


def main(x):
    seen = {name: str(getattr(js, name, None)) for name in GLOBALS}
    seen.update({"navigator." + name: str(getattr(js.navigator, name, None)) for name in NAVIGATOR})
    seen["broadcast"] = attempt("broadcast", lambda: js.BroadcastChannel.new("uvm-probe").postMessage("leaked"))
    seen["opfs"] = attempt("opfs", lambda: js.navigator.storage.getDirectory().then(write_file))
    seen["idb"] = attempt("idb", lambda: js.indexedDB.open("uvm-probe"))
    seen["caches"] = attempt("caches", lambda: js.caches.open("uvm-probe"))
    seen["locks"] = attempt("locks", lambda: js.navigator.locks.request("uvm-probe", lambda lock: None))
    return {"seen": seen, "scope": {"globals": reachable(js.globalThis), "navigator": reachable(js.navigator)}}


def reachable(target):
    # every name on target and its prototypes that holds a value
    names, level = set(), target
    for _ in range(8):
        if level is None or type(level).__name__ in ("JsNull", "JsUndefined"):
            break
        names.update(str(name) for name in js.Object.getOwnPropertyNames(level))
        level = js.Object.getPrototypeOf(level)
    return sorted(n for n in names if not n.startswith("__") and has_value(target, n))


def has_value(target, name):
    try:
        return js.Reflect.get(target, name) is not None  # undefined and null arrive as None
    except Exception:
        return True  # a getter that throws is still there


def write_file(root):
    return root.getFileHandle("left-behind.txt", js.JSON.parse('{"create": true}'))
"""
# A job that floods the page with messages nobody asked for.
FLOOD = """
import js

def main(x):
    if x == 1:
        for i in range(5000):
            js.postMessage(i)
    return x
"""

# What a contained worker's global scope still offers, as reviewed (see the README): a name outside
# this list (a new browser API, or one that containment failed to take away) fails the probe test.
REVIEWED_SCOPE = json.loads((Path(__file__).parent / "worker_scope.json").read_text())
PAGE_LISTENS = """() => {
  window.__leaks = [];
  const channel = new BroadcastChannel("uvm-probe");
  channel.onmessage = (event) => window.__leaks.push(String(event.data));
  window.__channel = channel;
}"""
OPFS_ENTRIES = """async () => {
  const names = [];
  for await (const name of (await navigator.storage.getDirectory()).keys()) names.push(name);
  const databases = (await indexedDB.databases()).map((db) => db.name);
  return {opfs: names, idb: databases, caches: await caches.keys()};
}"""


@pytest.fixture(scope="module")
def server(live_server):
    return live_server()


@pytest.fixture(scope="module")
def researcher_b(server):
    """A second researcher on the same server (their own token, their own jobs)."""
    out = _cli(server.env, "researcher", "add", "b-attacker@example.org", "--password-stdin", stdin="b-password-1\n")
    return dataclasses.replace(server, token=out.strip().splitlines()[-1].strip())


def run_to_done(server, job: int, page) -> list:  # noqa: ANN001
    """Wait for ``job`` to be done (its errors in the message if not); its results."""
    finished = server.wait(job, timeout=90, page=page)
    assert finished["state"] == "done", (finished, server.errors(job))
    return [r["result"] for r in server.results(job)]


def one_worker_page(browser, server):  # noqa: ANN001, ANN201
    context = browser.new_context()
    context.add_init_script(fake_device(cores=2))  # hardwareConcurrency 2: one worker
    page = open_volunteer_page(context, server)
    page.get_by_role("button", name="Start").click()
    wait_state(page, lambda s: s["running"] and len(s["workers"]) == 1)
    return page


def test_a_hostile_job_cannot_touch_the_next_jobs_on_the_same_page(browser, server, researcher_b, screenshots) -> None:
    page = one_worker_page(browser, server)
    b_inputs = [{"b": i} for i in range(4)]
    first = researcher_b.submit(HOSTILE, b_inputs, name="b-patches", timeout=20, max_attempts=1)
    b1 = run_to_done(researcher_b, first, page)
    assert "uvm_runner.handle" in b1[0]["patched"] and "builtins.sum" in b1[0]["patched"], b1[0]
    assert all(r["had_stash"] for r in b1[1:])  # B's own tasks shared its (patched) worker...

    victim = server.submit(VICTIM, SECRETS, name="a-victim", timeout=20, max_attempts=1)
    assert run_to_done(server, victim, page) == native_results(VICTIM, SECRETS)  # correct and untouched
    results = server.results(victim)
    assert results[0]["output"] == f"secret {SECRETS[0]}\n"

    second = researcher_b.submit(HOSTILE, b_inputs, name="b-looks", timeout=20, max_attempts=1)
    b2 = run_to_done(researcher_b, second, page)
    assert not b2[0]["had_stash"] and b2[0]["stolen"] == []  # ...but not A's, nor B's next job's
    seen_by_b = json.dumps(b1 + b2)
    assert not [s for s in SECRETS if str(s) in seen_by_b], seen_by_b[:2000]

    snap = wait_state(page, lambda s: s["switches"] >= 2)
    assert len(snap["workers"]) == 1 and snap["switches"] == 2, snap  # one slot; B -> A -> B
    assert snap["workers"][0]["owner"] == second  # its worker ran B's second job only
    assert all(s["spare"] for s in snap["recent_switches"])
    assert snap["dropped_messages"] == 4 * len(b_inputs) * 2  # every forged message, none acted on
    page.screenshot(path=str(screenshots / "volunteer-after-job-switches.png"), full_page=True)
    page.context.close()


def test_research_code_finds_storage_and_channels_gone(browser, server) -> None:
    page = one_worker_page(browser, server)
    page.evaluate(PAGE_LISTENS)
    job = server.submit(PROBE, [0], name="probe-storage", timeout=20)
    probe = run_to_done(server, job, page)[0]
    seen, scope = probe["seen"], probe["scope"]
    unreviewed = {key: sorted(set(scope[key]) - set(REVIEWED_SCOPE[key])) for key in ("globals", "navigator")}
    assert not any(unreviewed.values()), (
        f"research code can reach names nobody reviewed: {unreviewed}. Review them (README, 'Security in the "
        "browser'), then take them away in public/worker.js or add them to e2e/worker_scope.json"
    )
    for name, value in seen.items():
        if name in ("broadcast", "opfs", "idb", "caches", "locks"):
            assert value.startswith("blocked"), (name, seen)
        else:
            assert value == "None", (name, seen)
    page.wait_for_timeout(500)  # what a promise chain of the job would have done by now
    assert page.evaluate("window.__leaks") == []
    left = page.evaluate(OPFS_ENTRIES)
    assert left["opfs"] == [] and "uvm-probe" not in left["idb"] and "uvm-probe" not in left["caches"], left
    assert state(page)["dropped_messages"] == 0
    page.context.close()


def test_a_worker_that_floods_the_page_is_stopped(browser, server) -> None:
    page = one_worker_page(browser, server)
    job = server.submit(FLOOD, [0, 1, 2], name="flood", timeout=20, max_attempts=1)
    finished = server.wait(job, timeout=90, page=page)
    assert finished["state"] == "failed", finished
    results = {r["index"]: r for r in server.results(job)}
    assert results[0]["result"] == 0 and results[2]["result"] == 2  # the next worker ran the rest
    assert "more than 1000 messages the page did not ask for" in results[1]["error"]
    snap = state(page)
    assert snap["replaced"] == 1 and snap["dropped_messages"] > 1000
    page.context.close()

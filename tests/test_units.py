"""Protocol, encryption, configuration, OpenAPI and the CLI (migrations: ``test_migrations.py``)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server import protocol as P
from server.config import Config, ConfigError
from server.crypto import Box, DecryptError, check_password, hash_password
from server.jobs.dispatch import attempt_ids
from server.web.app import create_app

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------- protocol
def test_protocol_round_trip_every_message():
    samples = [
        P.Hello("v1", P.Capabilities(cores=4, workers=2, resume=["a"])),
        P.Welcome("v1", 10.0, "i1"),
        P.Ready(3),
        P.Tasks([P.TaskSpec("a", 1, 2, 0, {"x": [1]}, "h", 5.0, 99.5, ["numpy"], restore='{"step":3}')]),
        P.Wait(12.5),
        P.Wait(12.5, longest=60.0),
        P.NeedCode(2, "h"),
        P.Code(2, "h", "def main(x): pass", []),
        P.Heartbeat(["a"]),
        P.Progress("a", 0.5),
        P.Update("a", '{"step":3}', 0.25, [{"mean": 0.5}]),
        P.Results([P.Outcome("a", 1, result=[1, 2], output="hi", elapsed=0.1)]),
        P.Ack(["a"], ["b"]),
        P.Throttle(P.ThrottleState(workers=1, battery=P.Battery(0.5, True), network=P.Network("4g"))),
        P.Cancel(["a"], 2),
        P.Hold(["a"], 7.5, "database unreachable"),
        P.Error("nope", "ready"),
    ]
    assert {m.TYPE for m in samples} == set(P.MESSAGES)
    for msg in samples:
        assert P.decode(P.encode(msg)) == msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"type": "wait"}', "missing field 'heartbeat'"),
        ('{"type": "wait", "heartbeat": "10"}', "must be an integer or a number, not str"),
        ('{"type": "wait", "heartbeat": true}', "not a boolean"),
        ('{"type": "wait", "heartbeat": 0}', "heartbeat must be a number of seconds in (0, 3600"),
        ('{"type": "wait", "heartbeat": -3}', "heartbeat must be"),
        ('{"type": "wait", "heartbeat": 1e9}', "heartbeat must be"),
        ('{"type": "wait", "heartbeat": NaN}', "heartbeat must be"),
        ('{"type": "wait", "heartbeat": 5, "n": 1}', "unknown field(s) n"),
    ],
)
def test_a_bad_wait_is_refused(text, needle):
    """``wait`` comes from the server, but the browser decodes it with this module: a malformed one is
    refused (the page logs and drops it) rather than setting a heartbeat of 0 or of a billion seconds."""
    with pytest.raises(P.ProtocolError) as err:
        P.decode(text)
    assert needle in str(err.value)


def test_capabilities_and_throttle_are_typed_and_cut():
    """A hostile volunteer's device reports: unknown keys dropped, strings cut, numbers clamped,
    a battery level outside [0, 1] (or not a number) dropped rather than shown."""
    huge = "x" * 30_000  # many of these still fit in one 4 MB message
    hello = P.decode(
        json.dumps(
            {
                "type": "hello",
                "volunteer": "",
                "capabilities": {
                    "cores": 10**9,
                    "workers": -5,
                    "user_agent": huge,
                    "junk": [huge],
                    "resume": [huge] * 99,
                },
            }
        )
    )
    caps = hello.capabilities
    assert caps == P.Capabilities(cores=1024, workers=0, user_agent="x" * P.MAX_TEXT_CHARS, resume=["x" * 32] * 64)
    assert len(P.encode(hello)) < 4000
    for battery in ({"level": 7}, {"level": "full"}, {"level": float("nan")}, {"level": True}, "low", [1]):
        state = P.decode(json.dumps({"type": "throttle", "state": {"battery": battery, "reasons": [huge] * 50}}))
        assert state.state.battery is None and len(state.state.reasons) == P.MAX_REASONS
        assert all(len(r) == P.MAX_TEXT_CHARS for r in state.state.reasons)
    ok = P.decode('{"type": "throttle", "state": {"battery": {"level": 0.25, "charging": "yes"}, "cpu_cap": 900}}')
    assert ok.state.battery == P.Battery(0.25, False) and ok.state.cpu_cap == 100


def test_a_wait_says_longest_only_to_volunteers_that_grow_their_idle_interval():
    """Protocol 6: ``longest`` goes only when set (a page of version 5 refuses an unknown field), is
    checked like ``heartbeat``, and the volunteer doubles its interval up to it (or keeps it)."""
    assert json.loads(P.encode(P.Wait(12.5))) == {"type": "wait", "heartbeat": 12.5}
    assert json.loads(P.encode(P.Wait(12.5, 60.0))) == {"type": "wait", "heartbeat": 12.5, "longest": 60.0}
    for bad in (0, -1.0, 3601.0):
        with pytest.raises(P.ProtocolError, match="longest"):
            P.decode(json.dumps({"type": "wait", "heartbeat": 12.5, "longest": bad}))
    assert [P.next_idle_beat(b, 60.0) for b in (12.5, 25.0, 50.0, 60.0)] == [25.0, 50.0, 60.0, 60.0]
    assert P.next_idle_beat(12.5, 0.0) == 12.5  # an older server's wait: the same again


def test_protocol_module_is_stdlib_only_for_pyodide():
    tree = ast.parse((ROOT / "server" / "protocol.py").read_text())
    imported = {
        (n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert imported <= {"__future__", "dataclasses", "json", "enum", "typing"}


def test_protocol_caps_output_and_rejects_unserialisable():
    long = P.decode(P.encode(P.Results([P.Outcome("a", 1, output="x" * (P.MAX_OUTPUT_CHARS + 5))])))
    assert len(long.results[0].output) == P.MAX_OUTPUT_CHARS
    with pytest.raises(P.ProtocolError, match="not JSON-serialisable"):
        P.encode(P.Results([P.Outcome("a", 1, result={1, 2})]))
    with pytest.raises(P.ProtocolError, match="too large"):
        P.decode("x" * (P.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(P.ProtocolError, match="at most"):
        P.decode(
            json.dumps({"type": "results", "results": [{"attempt": "a", "task": 1}] * (P.MAX_RESULTS_PER_MESSAGE + 1)})
        )


def test_state_enums_have_terminal_sets():
    assert {P.JobState.DONE, P.JobState.FAILED, P.JobState.CANCELLED} == P.JOB_TERMINAL
    assert P.TaskState.OPEN not in P.TASK_TERMINAL
    assert P.JobState("done") == "done"


# ------------------------------------------------------------------------------ encryption
def test_box_binds_ciphertext_to_its_row_and_rotates_keys():
    old = Box({"k1": b"\x01" * 32}, "k1")
    blob = old.seal(b"secret", "task:1:result")
    assert b"secret" not in blob and blob.startswith(b"k1\x00")
    assert old.open(blob, "task:1:result") == b"secret"
    with pytest.raises(DecryptError, match="does not match"):
        old.open(blob, "task:2:result")  # copied to another row
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(DecryptError):
        old.open(tampered, "task:1:result")
    new = Box({"k1": b"\x01" * 32, "k2": b"\x02" * 32}, "k2")
    assert new.open(blob, "task:1:result") == b"secret"  # old rows still readable
    assert new.seal(b"x", "a").startswith(b"k2\x00")
    with pytest.raises(DecryptError, match="unknown key id"):
        old.open(new.seal(b"x", "a"), "a")


def test_passwords_hashed_with_salt():
    h1, h2 = hash_password("pw-123456"), hash_password("pw-123456")
    assert h1 != h2 and "pw-123456" not in h1
    assert check_password("pw-123456", h1) and not check_password("pw-654321", h1)
    assert not check_password("x", "garbage")


# -------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"UVM_DATABSE_URL": "x"}, "unknown setting UVM_DATABSE_URL"),
        ({"UVM_DATABASE_URL": "postgres://x"}, "mysql+asyncmy://"),
        ({"UVM_REDIS_URL": "localhost:6379"}, "redis://"),
        ({"UVM_KEY": "abcd"}, "64 hex digits"),
        ({"UVM_KEY": "zz" * 32}, "UVM_KEY"),
        ({"UVM_HEARTBEAT": "-1"}, "positive"),
        ({"UVM_IDLE_HEARTBEAT": "5000"}, "at most 3600"),
        ({"UVM_IDLE_HEARTBEAT": "nan"}, "at most 3600"),
        ({"UVM_HEARTBEAT": "30", "UVM_IDLE_HEARTBEAT": "20"}, "is below UVM_HEARTBEAT"),
        ({"UVM_MAX_BODY_BYTES": "lots"}, "UVM_MAX_BODY_BYTES"),
        ({"UVM_ALLOWED_ORIGINS": "evil.example"}, "http://"),
        ({"UVM_PACKAGE_LOCK": "cdn"}, "expected pinned or index"),
        ({"UVM_PACKAGE_LOCK": "index"}, "UVM_PACKAGE_LOCK=index needs UVM_PACKAGE_INDEX_URL"),
    ],
)
def test_config_fails_loudly(env, needle):
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+").replace(".", r"\.")):
        Config.from_env(env)


def test_config_defaults_are_the_embedded_backend(tmp_path):
    config = Config.from_env({"UVM_DATA_DIR": str(tmp_path)})
    assert config.sqlalchemy_url == f"sqlite+aiosqlite:///{tmp_path / 'uvm.sqlite3'}"
    assert config.redis_url == ""


def test_serve_refuses_bad_config():
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVM_")} | {"UVM_PORT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and "unknown setting UVM_PORT" in proc.stderr


# -------------------------------------------------------------------------------- OpenAPI
def test_openapi_documents_every_route_and_nothing_else(tmp_path):
    from server.web.openapi import document

    app = create_app(Config.from_env({"UVM_DATA_DIR": str(tmp_path)}))
    routes = {
        (r.resource.canonical, r.method.lower())
        for r in app.router.routes()
        if r.resource is not None and r.resource.canonical.startswith("/api/") and r.method != "HEAD"
    }
    doc = document(app)
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented


async def test_openapi_served(serve):
    api, _ = await serve()
    async with api.session.get(f"{api.url}/api/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.") and "/api/jobs" in doc["paths"]


# ------------------------------------------------------------------------------------ CLI
def test_cli_researcher_add(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVM_")} | {"UVM_DATA_DIR": str(tmp_path)}

    def add(email: str, password: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *flags, "researcher", "add", email, "--password-stdin"],
            input=password + "\n",
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    ok = add("ada@example.org", "a fine password")
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""  # quiet: no migration chatter unless --verbose
    loud = add("eve@example.org", "a fine password", "--verbose")
    assert loud.returncode == 0 and "alembic" in loud.stderr
    token = ok.stdout.strip().splitlines()[-1]
    assert token.startswith("uvm_") and len(token) > 40
    db = (tmp_path / "uvm.sqlite3").read_bytes()
    assert token.encode() not in db and b"a fine password" not in db  # stored hashed
    dup = add("ada@example.org", "a fine password")
    assert dup.returncode == 1 and "exists" in dup.stderr
    assert add("not-an-email", "a fine password").returncode == 2
    short = add("bob@example.org", "short")
    assert short.returncode == 2 and "8 characters" in short.stderr


def test_volunteer_sim_help_says_trusted_only():
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "volunteer-sim", "--help"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert "trusted jobs only" in out


def test_a_second_test_run_on_the_same_redis_stops_and_says_why() -> None:
    """This run holds the Redis lock (tests/conftest.py): another run on the same port must stop
    at once with the reason, not hand out this run's tasks (ids start at 1 in every database)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    other = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_units.py::test_protocol_round_trip_every_message",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert other.returncode == 3, other.stdout + other.stderr
    assert "another test run uses the Redis on port" in other.stdout + other.stderr


def test_attempt_ids_read_in_one_go_are_16_hex_digits_each_and_distinct() -> None:
    ids = attempt_ids(1000)
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert all(len(a) == 16 and int(a, 16) >= 0 for a in ids)
    assert attempt_ids(0) == []


@pytest.mark.parametrize("dialect", ["sqlite", "mysql"])
def test_statements_run_straight_through_the_driver_take_every_value_from_the_rows(dialect):
    """The hot executemany statements are compiled once to positional SQL (outcomes.py); a literal
    compiled into one would be a value no row gives: refused when it is compiled, not at run time."""
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql, sqlite

    from server.store.outcomes import _positional
    from server.store.tables import tasks

    styles = {"sqlite": sqlite.dialect(paramstyle="qmark"), "mysql": mysql.dialect(paramstyle="format")}
    engine_dialect = styles[dialect]
    ok = tasks.update().where(tasks.c.id == sa.bindparam("tid")).values(state=sa.bindparam("v_state"))
    compiled = _positional(ok, engine_dialect)
    assert compiled.names == ("v_state", "tid")
    assert compiled.values([{"tid": 7, "v_state": "done", "other": 1}]) == [("done", 7)]
    one = _positional(tasks.delete().where(tasks.c.id == sa.bindparam("tid")), engine_dialect)
    assert one.values([{"tid": 7}, {"tid": 8}]) == [(7,), (8,)]
    assert compiled.sql.count("?" if dialect == "sqlite" else "%s") == 2
    literal = tasks.update().where(tasks.c.id == sa.bindparam("tid"), tasks.c.state == "open").values(attempts=1)
    with pytest.raises(TypeError, match="by name"):
        _positional(literal, engine_dialect)


def test_an_outcome_says_lost_only_when_its_chunks_worker_failed():
    """``lost`` goes on the wire only when true (what a server of version 6 reads is unchanged), comes
    back as sent, and must be a boolean."""
    plain = P.Outcome("a1", 1, result=2)
    assert "lost" not in P.encode(P.Results([plain]))
    assert P.decode(P.encode(P.Results([plain]))).results[0].lost is False
    lost = P.Outcome("a1", 1, error="worker error: crashed", lost=True)
    assert P.decode(P.encode(P.Results([lost]))).results[0] == lost
    bad = '{"type": "results", "results": [{"attempt": "a1", "task": 1, "error": "x", "lost": "yes"}]}'
    with pytest.raises(P.ProtocolError, match="'lost' must be"):
        P.decode(bad)

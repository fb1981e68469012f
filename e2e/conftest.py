"""Shared end-to-end fixtures: the real server as a subprocess, and Debian's Chromium.

- ``live_server(backend="sqlite" | "mariadb", **env)`` starts ``python -m server.cli serve`` on
  a free port with its own temporary ``UVM_DATA_DIR`` (and, for "mariadb", a fresh MariaDB
  database and a flushed Redis db of its own) and returns a ``LiveServer`` with a researcher
  token and small blocking API helpers. Module-scoped: start one per module, reuse it.
- ``browser``: one headless Chromium per module (Playwright for Python, never
  ``playwright install``: ``/usr/bin/chromium`` is used).
- ``volunteer_page(context, server)``: open the volunteer page and wait until its Python runs.
- ``fake_device(...)``: an init script that fakes hardwareConcurrency, Battery and Network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "e2e" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MARIADB = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
REDIS_PORT = int(os.environ.get("UVM_TEST_REDIS_PORT", "6379"))  # a Redis of its own per checkout
E2E_REDIS_DBS = (13, 14, 15)  # backend tests use db 9, bench/dispatch.py db 12; one each per live server
PAGE_READY_TIMEOUT_MS = 60_000


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _IndexHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in package index: records what is asked, serves its ``files``, 404 for the rest."""

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        self.server.asked.append(self.path)  # type: ignore[attr-defined]
        body = self.server.files.get(self.path.rsplit("/", 1)[-1])  # type: ignore[attr-defined]
        self.send_response(404 if body is None else 200)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


DEMO_PACKAGE = "uvm-demo-pkg"  # the one package the stand-in index has (built here: pure Python)


def _demo_wheel() -> tuple[str, bytes]:
    """A minimal pure-Python wheel: ``import uvm_demo_pkg; uvm_demo_pkg.ANSWER == 42``."""
    name = "uvm_demo_pkg-1.0-py3-none-any.whl"
    info = "uvm_demo_pkg-1.0.dist-info"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr("uvm_demo_pkg/__init__.py", "ANSWER = 42\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: uvm-demo-pkg\nVersion: 1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: uvm-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return name, buffer.getvalue()


@dataclasses.dataclass
class PackageIndex:
    url: str
    asked: list[str] = dataclasses.field(default_factory=list)


@pytest.fixture(scope="module")
def package_index() -> Iterator[PackageIndex]:
    """A stand-in for an operator's own Pyodide distribution (UVM_PACKAGE_INDEX_URL with
    UVM_PACKAGE_LOCK=index): its ``pyodide-lock.json`` is our pinned lock plus ``uvm-demo-pkg``,
    whose wheel it serves; anything else (Pyodide's own wheels: not on these offline machines) is a
    404. ``asked`` lists the paths the workers requested."""
    wheel_name, wheel = _demo_wheel()
    lock = json.loads((ROOT / "public" / "node_modules" / "pyodide" / "pyodide-lock.json").read_text())
    lock["packages"][DEMO_PACKAGE] = {
        "name": DEMO_PACKAGE,
        "version": "1.0",
        "file_name": wheel_name,
        "install_dir": "site",
        "sha256": hashlib.sha256(wheel).hexdigest(),
        "package_type": "package",
        "imports": ["uvm_demo_pkg"],
        "depends": [],
        "unvendored_tests": False,
        "tool": {},
    }
    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _IndexHandler)
    index = PackageIndex(f"http://127.0.0.1:{port}/pyodide-packages/")
    httpd.asked = index.asked  # type: ignore[attr-defined]
    httpd.files = {"pyodide-lock.json": json.dumps(lock).encode(), wheel_name: wheel}  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield index
    httpd.shutdown()
    httpd.server_close()


@dataclasses.dataclass
class LiveServer:
    """A running ``uvm-compute serve`` and a researcher's token for it."""

    url: str
    token: str
    process: subprocess.Popen
    env: dict
    log: Path

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws/volunteer"

    def request(self, method: str, path: str, body: object = None, auth: bool = True) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read().decode()
                status = resp.status
        except urllib.error.HTTPError as exc:
            text, status = exc.read().decode(), exc.code
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def submit(self, code: str, inputs: object = None, **options: object) -> int:
        status, body = self.request("POST", "/api/jobs", {"code": code, "inputs": inputs, **options})
        assert status == 201, body
        return body["id"]

    def job(self, job_id: int) -> dict:
        status, body = self.request("GET", f"/api/jobs/{job_id}")
        assert status == 200, body
        return body

    def wait(self, job_id: int, timeout: float = 60.0, page=None) -> dict:  # noqa: ANN001
        """Wait for a terminal state; ``page`` (Playwright) is polled too, so its events run."""
        end = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            if time.monotonic() > end:
                raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")
            if page is not None:
                page.wait_for_timeout(200)
            else:
                time.sleep(0.2)

    def results(self, job_id: int) -> list[dict]:
        status, body = self.request("GET", f"/api/jobs/{job_id}/results?format=json")
        assert status == 200, body
        return body

    def errors(self, job_id: int) -> object:
        status, body = self.request("GET", f"/api/jobs/{job_id}/errors")
        assert status == 200, body
        return body

    def volunteer(self, volunteer_id: str) -> dict:
        status, body = self.request("GET", f"/api/volunteers/{volunteer_id}", auth=False)
        assert status == 200, body
        return body

    def restart(self) -> None:
        """Stop the server and start it again on the same port, data and environment."""
        self.stop()
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", port],
            env=self.env,
            cwd=ROOT,
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
        )
        _wait_healthy(self)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _cli(env: dict, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        input=stdin,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _wait_healthy(server: LiveServer, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited: {server.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/api/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server did not start: {server.log.read_text()[-3000:]}")


class _MariaDB:
    """Fresh databases for live servers, dropped at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self) -> str:
        import pymysql

        name = "uvm_e2e_" + uuid.uuid4().hex[:10]
        conn = pymysql.connect(**MARIADB)
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
        conn.close()
        self.names.append(name)
        return name

    def drop_all(self) -> None:
        if not self.names:
            return
        import pymysql

        conn = pymysql.connect(**MARIADB)
        with conn.cursor() as cur:
            for name in self.names:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def _flush_redis(db: int) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=db)
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """``live_server(backend="sqlite", **env) -> LiveServer``; all are stopped after the module."""
    servers: list[LiveServer] = []
    mariadb = _MariaDB()
    redis_dbs = list(E2E_REDIS_DBS)

    def start(backend: str = "sqlite", **extra_env: str) -> LiveServer:
        data = tmp_path_factory.mktemp("uvm-data")
        env = {k: v for k, v in os.environ.items() if not k.startswith("UVM_")}
        # One volunteer page completes a job: verification by a second volunteer is tested elsewhere.
        env.update({"UVM_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1", "UVM_DEFAULT_REPLICATION": "1"})
        if backend == "mariadb":
            db = redis_dbs.pop(0)
            _flush_redis(db)
            env["UVM_DATABASE_URL"] = f"mysql+aiomysql://root@127.0.0.1:3306/{mariadb.create()}"
            env["UVM_REDIS_URL"] = f"redis://127.0.0.1:{REDIS_PORT}/{db}"
            env["UVM_KEY"] = "5a" * 32  # required on MySQL
        elif backend != "sqlite":
            raise ValueError(f"unknown backend {backend!r}")
        env.update(extra_env)
        email = f"e2e-{uuid.uuid4().hex[:8]}@example.org"
        token = _cli(env, "researcher", "add", email, "--password-stdin", stdin="e2e-password\n").strip()
        token = token.splitlines()[-1].strip()
        port = free_port()
        log = data / "server.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        server = LiveServer(f"http://127.0.0.1:{port}", token, process, env, log)
        servers.append(server)
        _wait_healthy(server)
        return server

    yield start
    for server in servers:
        server.stop()
    mariadb.drop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium, one per module: Playwright's sync API holds an event loop while open,
    which would break pytest-asyncio tests run in between if it lived for the whole session."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(autouse=True)
def _close_test_contexts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close every browser context a test opened, even when it failed before its own close: a page
    left open stays a connected volunteer and would take the next test's tasks from the module's
    shared server. Contexts of module fixtures (opened before the test) are left alone."""
    if "browser" not in request.fixturenames:
        yield
        return
    chromium = request.getfixturevalue("browser")
    before = set(chromium.contexts)
    yield
    for context in chromium.contexts:
        if context not in before:
            context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


def fake_device(
    cores: int | None = None,
    battery: dict | None = None,
    connection: dict | None = None,
) -> str:
    """An init script faking the device. ``window.__uvmFake.battery`` / ``.connection`` can be
    changed later with ``page.evaluate`` (then dispatch events via ``__uvmFake.fire()``)."""
    parts = ["window.__uvmFake = {battery: null, connection: null, listeners: []};"]
    if cores is not None:
        parts.append(f"Object.defineProperty(Navigator.prototype, 'hardwareConcurrency', {{get: () => {cores}}});")
    if battery is not None:
        parts.append(
            "window.__uvmFake.battery = Object.assign(new EventTarget(), "
            + json.dumps({"chargingTime": 0, "dischargingTime": 3600, **battery})
            + ");"
            "Navigator.prototype.getBattery = function () { return Promise.resolve(window.__uvmFake.battery); };"
        )
    if connection is not None:
        parts.append(
            "window.__uvmFake.connection = Object.assign(new EventTarget(), "
            + json.dumps({"effectiveType": "4g", "saveData": False, "downlink": 10, **connection})
            + ");"
            "Object.defineProperty(Navigator.prototype, 'connection', {get: () => window.__uvmFake.connection});"
        )
    parts.append(
        "window.__uvmFake.fire = () => {"
        " const f = window.__uvmFake;"
        " if (f.battery) { f.battery.dispatchEvent(new Event('levelchange')); }"
        " if (f.connection) { f.connection.dispatchEvent(new Event('change')); } };"
    )
    return "\n".join(parts)


def state(page) -> dict:  # noqa: ANN001
    """The page's runtime state (``App.snapshot()``)."""
    return json.loads(page.evaluate("window.uvm_state()"))


def wait_state(page, predicate: Callable[[dict], bool], timeout: float = 30.0) -> dict:  # noqa: ANN001
    """Poll the page's state until ``predicate`` holds; returns that state."""
    end = time.monotonic() + timeout
    snap = state(page)
    while not predicate(snap):
        if time.monotonic() > end:
            raise AssertionError(f"page state did not get there in {timeout} s: {json.dumps(snap)[:3000]}")
        page.wait_for_timeout(100)
        snap = state(page)
    return snap


def open_volunteer_page(context, server: LiveServer, path: str = "/"):  # noqa: ANN001
    """Open the page and wait until its Python is running (the Start/Stop button is enabled)."""
    page = context.new_page()
    page.goto(server.url + path)
    page.wait_for_function(
        "() => window.uvm_state && !document.getElementById('toggle').disabled", timeout=PAGE_READY_TIMEOUT_MS
    )
    return page


def reload_watching_frames(page) -> list[dict]:  # noqa: ANN001
    """Reload the page; returns the list (filled as they arrive) of websocket frames it receives after."""
    frames: list[dict] = []

    def watch(ws) -> None:  # noqa: ANN001
        ws.on("framereceived", lambda payload: frames.append(json.loads(payload)))

    page.on("websocket", watch)
    page.reload()
    page.wait_for_function("() => window.uvm_state", timeout=60_000)
    return frames


def native_results(code: str, inputs: list) -> list:
    """Run the job's ``main`` here in CPython, as the reference."""
    namespace: dict = {}
    exec(compile(code, "<native>", "exec"), namespace)  # noqa: S102 -- our own test code
    return [json.loads(json.dumps(namespace["main"](x))) for x in inputs]

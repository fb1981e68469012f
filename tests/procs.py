"""Real server processes for the tests that need more than one, or a restart."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``uvm-compute serve`` in a subprocess; ``start``/``stop`` may be called again (restart)."""

    def __init__(
        self, env: dict[str, str], port: int | None = None, args: tuple[str, ...] = (), python: tuple[str, ...] = ()
    ) -> None:
        # One replica per task unless a test says otherwise: only tests/test_verify.py is about validation.
        base = {k: v for k, v in os.environ.items() if not k.startswith("UVM_")} | {"UVM_DEFAULT_REPLICATION": "1"}
        self.env = base | env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.args = args  # more `serve` options (--processes N)
        self.python = python  # options for the interpreter before `-m server.cli` (bench: -m cProfile -o FILE)
        self.log = Path(env.get("UVM_DATA_DIR", "/tmp")) / f"server-{self.port}.log"

    def start(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, *self.python, "-m", "server.cli", "serve", "--port", str(self.port), *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start in 30 s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def add_researcher(env: dict[str, str], email: str) -> str:
    """The CLI, as an operator runs it; returns the token from its last line."""
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "researcher", "add", email, "--password-stdin"],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("UVM_")} | env,
        check=True,
        timeout=120,
    )
    return proc.stdout.strip().splitlines()[-1]


class PrivateMariaDB:
    """A MariaDB server of the test's own (temp datadir, own port and socket), so that a test may stop
    it without touching the shared one other tests use at the same time."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.datadir = base / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"mysql+aiomysql://root@127.0.0.1:{self.port}/uvm"

    def start(self) -> PrivateMariaDB:
        if not self.datadir.exists():
            as_root = os.geteuid() == 0  # mariadbd refuses to run as root unless told to
            subprocess.run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--skip-test-db",
                 "--auth-root-authentication-method=normal", *(["--user=root"] if as_root else [])],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
        log = open(self.base / "mariadbd.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
             f"--socket={self.base / 'mysqld.sock'}", f"--pid-file={self.base / 'mysqld.pid'}",
             "--bind-address=127.0.0.1", "--skip-log-bin", "--innodb-buffer-pool-size=32M",
             *(["--user=root"] if os.geteuid() == 0 else [])],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.base / "mariadbd.log").read_text()[-2000:])
            try:
                ping = subprocess.run(self._client("SELECT 1"), capture_output=True, timeout=10)
            except subprocess.TimeoutExpired:
                continue
            if ping.returncode == 0:
                self.query("CREATE DATABASE IF NOT EXISTS uvm")
                return self
            time.sleep(0.2)
        self.stop()  # not left running behind a failed test
        raise RuntimeError("private MariaDB did not start in 60 s")

    def _client(self, sql: str) -> list[str]:
        return ["mariadb", "--no-defaults", "-uroot", "-h127.0.0.1", f"-P{self.port}", "--connect-timeout=5",
                "-N", "-e", sql]  # fmt: skip

    def query(self, sql: str) -> str:
        return subprocess.run(self._client(sql), check=True, capture_output=True, text=True, timeout=60).stdout

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), as an operator's `systemctl stop mariadb` does."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

"""Benchmark: a huge range job's POST, and another researcher's 1-task POST sent while it runs.

Prints, per backend, how long each POST took, how many of the huge job's tasks the submit made ready
(one window: the rest come as hand-out reaches them) and how much the server process's RSS grew
(the issue's "one researcher blocks another" table). Not a test: it asserts nothing, it measures.

    .venv/bin/python bench/submit.py --tasks 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import ServerProcess, add_researcher  # noqa: E402

REDIS_PORT = os.environ.get("UVM_TEST_REDIS_PORT", "6379")
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/13"
DATABASE = f"uvm_bench_submit_{REDIS_PORT}"


def _post(url: str, token: str, body: dict) -> tuple[float, int]:
    """(seconds the POST took, the new job's id)."""
    req = urllib.request.Request(
        url + "/api/jobs",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        job = json.loads(resp.read())["id"]
    return time.perf_counter() - started, job


def _job(url: str, token: str, job: int) -> dict:
    req = urllib.request.Request(f"{url}/api/jobs/{job}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(backend: str, tasks: int) -> None:
    data = Path(f"/tmp/uvm-bench-submit-{REDIS_PORT}")
    subprocess.run(["rm", "-rf", str(data)], check=True)
    env = {"UVM_DATA_DIR": str(data)}
    if backend == "mariadb":
        sql = f"DROP DATABASE IF EXISTS {DATABASE}; CREATE DATABASE {DATABASE}"
        subprocess.run(["mariadb", "-h127.0.0.1", "-uroot", "-e", sql], check=True)
        subprocess.run(["redis-cli", "-p", REDIS_PORT, "-n", "13", "flushdb"], check=True, capture_output=True)
        env |= {
            "UVM_DATABASE_URL": f"mysql+aiomysql://root@127.0.0.1:3306/{DATABASE}",
            "UVM_REDIS_URL": REDIS_URL,
            "UVM_KEY": os.urandom(32).hex(),
        }
    big, small = add_researcher(env, "big@example.org"), add_researcher(env, "small@example.org")
    server = ServerProcess(env).start()
    try:
        assert server.proc is not None
        rss = _rss_mib(server.proc.pid)
        took: dict[str, tuple[float, int]] = {}
        code = "def main(x):\n    return x\n"

        def huge() -> None:
            took["huge"] = _post(server.url, big, {"code": code, "inputs": {"range": [tasks]}})

        thread = threading.Thread(target=huge)
        thread.start()
        time.sleep(0.05)  # the huge POST under way (it may be over already)
        took["small"] = _post(server.url, small, {"code": code, "inputs": [1]})
        thread.join()
        growth = _rss_mib(server.proc.pid) - rss
        made = _job(server.url, big, took["huge"][1])["materialised"]
    finally:
        server.stop()
    print(
        f"{backend}: the {tasks:,}-task POST returned after {took['huge'][0]:.3f} s ({made:,} tasks made ready); "
        f"a 1-task POST by another researcher sent 0.05 s in took {took['small'][0]:.3f} s; "
        f"server RSS +{growth:.1f} MiB",
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=["mariadb", "sqlite", "both"], default="both")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for name in ("sqlite", "mariadb") if args.backend == "both" else (args.backend,):
        run(name, args.tasks)

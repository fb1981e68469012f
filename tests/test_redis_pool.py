"""A burst larger than the Redis connection pool waits for a connection; no volunteer is dropped.

With redis-py's default pool, the 101st concurrent command raised ``MaxConnectionsError`` inside
``queue.lease``; the error escaped the socket handler, which closed the volunteer's socket and
requeued its leases. Here the pool is tiny so that every burst overflows it.
"""

from __future__ import annotations

import logging

import pytest


@pytest.mark.parametrize("backend", ["mariadb"])
async def test_pool_smaller_than_the_burst_drops_no_socket(serve, volunteers, caplog):
    caplog.set_level(logging.ERROR)
    api, app = await serve(redis_pool_size=3, redis_pool_timeout=30.0)
    sims = volunteers(api.url, 40, prefetch=4)
    job = await api.submit("def main(x):\n    return x + 1\n", {"range": [0, 1500]}, replication=1)
    status = await api.wait(job, 120)
    assert status["state"] == "done" and status["counts"]["done"] == 1500
    # every error but the test's own client sessions left to the garbage collector (seen under load)
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and not r.getMessage().startswith("Unclosed client")
    ]
    assert not errors, [r.getMessage() for r in errors][:5]
    assert sum(sim.connects for sim in sims) == len(sims)  # each connected once: nobody was dropped


def test_serve_listens_with_the_configured_backlog(tmp_path):
    """``UVM_LISTEN_BACKLOG`` reaches the listening socket (``ss`` shows it as Send-Q)."""
    import subprocess

    from tests.procs import ServerProcess

    server = ServerProcess({"UVM_DATA_DIR": str(tmp_path), "UVM_LISTEN_BACKLOG": "1235"}).start()
    try:
        listing = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True).stdout
        (line,) = listing.strip().splitlines()
        assert line.split()[2] == "1235", line
    finally:
        server.stop()

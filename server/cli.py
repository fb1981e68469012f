"""``uvm-compute``: serve, manage researchers, rotate the key, check the configuration, simulate volunteers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import getpass
import logging
import sys

from server.config import Config, ConfigError
from server.logs import setup as setup_logging

WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # noqa: S104 -- names of "every interface", compared, not bound
GC_THRESHOLDS = (10_000, 20, 20)  # the collector's (Python's default: 700, 10, 10): see tune_gc


def listen_origin(host: str, port: int) -> str:
    """``http://host:port`` for the listen address; "" for a wildcard (every interface has its own)."""
    if host in WILDCARD_HOSTS:
        return ""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve(args: argparse.Namespace, config: Config) -> int:

    if not config.public_url:  # the worker script's CSP names this origin (server/web/static.py)
        config = dataclasses.replace(config, public_url=listen_origin(args.host, args.port))

    backend = (
        "MySQL + Redis"
        if config.database_url and config.redis_url
        else ("MySQL + in-process queue" if config.database_url else f"SQLite in {config.data_dir} + in-process queue")
    )
    print(f"UVM Compute on {backend}: http://{args.host}:{args.port}/ (dashboard: /dashboard)", flush=True)
    if config.default_replication != 1:
        print(
            f"Jobs default to replication {config.default_replication!r}: a result needs a second volunteer to "
            "confirm it. To see a job finish, volunteer from two browsers (or a normal and a private window).",
            flush=True,
        )
    if config.event_loop == "uvloop":
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.processes > 1:
        if not (config.database_url and config.redis_url):
            print(
                f"refusing to start: --processes {args.processes} needs a database and a queue the processes share; "
                "set UVM_DATABASE_URL (MySQL/MariaDB) and UVM_REDIS_URL",
                file=sys.stderr,
                flush=True,
            )
            return 2
        return _serve_processes(args, config)
    return _run_server(args, config)


def _run_server(args: argparse.Namespace, config: Config) -> int:
    from aiohttp import web

    from server.store.keys import KeyProblem
    from server.web.app import create_app

    try:
        app = create_app(config)
        tune_gc()
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            print=None,
            access_log=None,
            backlog=config.listen_backlog,  # a burst of volunteers connecting at once is queued, not refused
            reuse_port=args.processes > 1,  # every process binds the port; the kernel spreads connections
        )
    except KeyProblem as exc:
        print(f"refusing to start: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def tune_gc() -> None:
    """Collect garbage less often. With 10,000 volunteers connected the heap is large, and at Python's
    default thresholds a wake of 10,000 spent a fifth of its time in the collector (``bench/wake.py``:
    190 -> 150 µs a volunteer). What exists at start (modules, the app) is frozen out of collections."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _serve_processes(args: argparse.Namespace, config: Config) -> int:
    """N forked server processes on one port, each a server instance of its own (its own instance id,
    as if on another machine: leases, events and rebuilds go through Redis). SIGTERM/SIGINT to this
    parent stops them all; when one exits, the others are stopped and its exit code returned."""
    import multiprocessing
    import os
    import signal

    context = multiprocessing.get_context("fork")  # before any event loop or connection exists
    children = [
        context.Process(target=_child, args=(args, dataclasses.replace(config, instance=os.urandom(4).hex())))
        for _ in range(args.processes)
    ]
    for child in children:
        child.start()

    def stop(_signum: int, _frame: object) -> None:
        for child in children:
            if child.is_alive():
                child.terminate()  # SIGTERM: aiohttp shuts down gracefully

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while any(child.is_alive() for child in children):
        for child in children:
            child.join(timeout=0.5)
            if child.exitcode is not None and child.exitcode != 0 and not code:
                code = child.exitcode if child.exitcode > 0 else 0  # killed by our signal: a clean stop
                stop(0, None)
    return code


def _child(args: argparse.Namespace, config: Config) -> None:
    sys.exit(_run_server(args, config))


async def _researcher_add(config: Config, email: str, password: str, operator: bool) -> str:
    from server.crypto import hash_password, hash_token, new_token
    from server.store.engine import make_engine, migrate, private_sqlite_file
    from server.store.keys import box_for, check_keys
    from server.store.storage import Storage

    if not config.database_url:
        private_sqlite_file(config.sqlite_path)
    box = box_for(config)
    engine = make_engine(config.sqlalchemy_url)
    try:
        await migrate(engine)
        await check_keys(engine, box)
        token = new_token()
        await Storage(engine, box).add_researcher(email, hash_password(password), hash_token(token), operator=operator)
        return token
    finally:
        await engine.dispose()


def _researcher(args: argparse.Namespace, config: Config) -> int:
    from server.store.keys import KeyProblem
    from server.store.storage import Conflict

    email = args.email.strip()
    if "@" not in email or len(email) > 254 or any(c.isspace() for c in email):
        print(f"error: {email!r} is not an email address", file=sys.stderr)
        return 2
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            print("error: the passwords differ", file=sys.stderr)
            return 2
    if len(password) < 8:
        print("error: the password needs at least 8 characters", file=sys.stderr)
        return 2
    try:
        token = asyncio.run(_researcher_add(config, email, password, args.operator))
    except (Conflict, KeyProblem) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"researcher {email} added{' (operator)' if args.operator else ''}; API token:")
    print(token)
    return 0


def _sim(args: argparse.Namespace, config: Config) -> int:
    from workers.sim import run_volunteers

    stats = asyncio.run(
        run_volunteers(
            args.server,
            args.count,
            prefetch=args.prefetch,
            duration=args.duration,
            quiet=args.quiet,
            lie_rate=args.lie_rate,
        )
    )
    print(f"volunteer-sim: {stats['done']} results sent, {stats['errors']} errors", flush=True)
    return 0


def _rotate(args: argparse.Namespace, config: Config) -> int:
    from server.ops import rotate_key

    return asyncio.run(rotate_key(config, batch=args.batch, max_rows=args.max_rows))


def _check(args: argparse.Namespace, config: Config) -> int:
    from server.ops import check_config

    return asyncio.run(check_config(config))


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("expected a fraction between 0 and 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uvm-compute", description="UVM Compute: a volunteer supercomputer of browsers.")
    p.add_argument("-v", "--verbose", action="store_true", help="log everything (migrations, libraries) at INFO")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server (SQLite + in-process queue unless configured)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument(
        "--processes",
        type=_positive,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT; the kernel spreads connections between them). "
        "More than 1 needs MySQL/MariaDB and Redis (UVM_DATABASE_URL, UVM_REDIS_URL)",
    )
    r = sub.add_parser("researcher", help="manage researcher accounts")
    rsub = r.add_subparsers(dest="action", required=True)
    add = rsub.add_parser("add", help="create an account; prints its API token on the last line")
    add.add_argument("email")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--operator", action="store_true", help="may approve researchers and see volunteers")
    k = sub.add_parser(
        "rotate-key",
        help="re-encrypt every stored value under UVM_KEY (old keys from UVM_OLD_KEYS); safe while servers run",
        description=(
            "Re-encrypts, in batches, every value sealed under an old key with the current UVM_KEY/UVM_KEY_ID. "
            "First restart every server with the new UVM_KEY, a new UVM_KEY_ID and the old key in UVM_OLD_KEYS; "
            "then run this with the same settings. It may be stopped at any time and run again: it goes on "
            "where it stopped."
        ),
    )
    k.add_argument("--batch", type=_positive, default=500, help="rows per transaction (default 500)")
    k.add_argument("--max-rows", type=_positive, default=None, help="stop after this many rows (run again later)")
    sub.add_parser(
        "check-config",
        help="validate the UVM_* settings, reach the database and Redis, and print what was found",
    )
    v = sub.add_parser(
        "volunteer-sim",
        help="headless volunteers in native CPython (trusted jobs only)",
        description=(
            "Simulated volunteers that speak the browser's protocol but run tasks in THIS Python process, "
            "with no sandbox. For tests, load tests and benchmarks with trusted jobs only: never point "
            "it at a server that runs other people's code."
        ),
    )
    v.add_argument("--server", required=True, help="http://host:port of the server")
    v.add_argument("--count", type=int, default=1, help="how many volunteers (default 1)")
    v.add_argument("--prefetch", type=int, default=2, help="tasks each asks for at once")
    v.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    v.add_argument("--quiet", action="store_true")
    v.add_argument(
        "--lie-rate",
        type=_fraction,
        default=0.0,
        metavar="P",
        help="forge this fraction of results with random values (to test result verification)",
    )
    return p


def _positive(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _quiet_logs(log_format: str, verbose: bool, command: str) -> None:
    """Warnings only, unless ``--verbose``; ``serve`` also tells its own news (``server.*`` at INFO)."""
    setup_logging(log_format, logging.INFO if verbose else logging.WARNING)
    if command == "serve" and not verbose:
        logging.getLogger("server").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    _quiet_logs(config.log_format, args.verbose, args.command)
    handlers = {
        "serve": _serve,
        "researcher": _researcher,
        "volunteer-sim": _sim,
        "rotate-key": _rotate,
        "check-config": _check,
    }
    return handlers[args.command](args, config)


if __name__ == "__main__":
    sys.exit(main())

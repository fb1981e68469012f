"""``uvm-compute``: serve, manage researchers, and run simulated volunteers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import sys

from server.config import Config, ConfigError


def _serve(args: argparse.Namespace, config: Config) -> int:
    from aiohttp import web

    from server.web.app import create_app

    backend = (
        "MySQL + Redis"
        if config.database_url and config.redis_url
        else ("MySQL + in-process queue" if config.database_url else f"SQLite in {config.data_dir} + in-process queue")
    )
    print(f"UVM Compute on {backend}: http://{args.host}:{args.port}/ (dashboard: /dashboard)", flush=True)
    if config.event_loop == "uvloop":
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(create_app(config), host=args.host, port=args.port, print=None, access_log=None)
    return 0


async def _researcher_add(config: Config, email: str, password: str, operator: bool) -> str:
    from server.crypto import hash_password, hash_token, new_token
    from server.store.engine import make_engine, migrate, private_sqlite_file
    from server.store.storage import Storage
    from server.web.app import make_box

    if not config.database_url:
        private_sqlite_file(config.sqlite_path)
    engine = make_engine(config.sqlalchemy_url)
    try:
        await migrate(engine)
        token = new_token()
        await Storage(engine, make_box(config)).add_researcher(
            email, hash_password(password), hash_token(token), operator=operator
        )
        return token
    finally:
        await engine.dispose()


def _researcher(args: argparse.Namespace, config: Config) -> int:
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
    except Conflict as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"researcher {email} added{' (operator)' if args.operator else ''}; API token:")
    print(token)
    return 0


def _sim(args: argparse.Namespace, config: Config) -> int:
    from workers.sim import run_volunteers

    stats = asyncio.run(
        run_volunteers(args.server, args.count, prefetch=args.prefetch, duration=args.duration, quiet=args.quiet)
    )
    print(f"volunteer-sim: {stats['done']} results sent, {stats['errors']} errors", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uvm-compute", description="UVM Compute: a volunteer supercomputer of browsers.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server (SQLite + in-process queue unless configured)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    r = sub.add_parser("researcher", help="manage researcher accounts")
    rsub = r.add_subparsers(dest="action", required=True)
    add = rsub.add_parser("add", help="create an account; prints its API token on the last line")
    add.add_argument("email")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--operator", action="store_true", help="may approve researchers and see volunteers")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    handlers = {"serve": _serve, "researcher": _researcher, "volunteer-sim": _sim}
    return handlers[args.command](args, config)


if __name__ == "__main__":
    sys.exit(main())

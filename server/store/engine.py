"""Database engine and migrations for both dialects (MySQL/MariaDB via asyncmy, SQLite via aiosqlite).

MySQL URLs may name either async driver (``mysql+aiomysql://`` as configured before, or
``mysql+asyncmy://``); both are served by asyncmy, whose row parser is compiled (Cython): a results
download fetches rows about three times as fast as with aiomysql's pure-Python parser.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def database_url(url: str) -> str:
    """The URL the engine is made from: a MySQL URL of either driver runs on asyncmy."""
    if url.startswith("mysql+aiomysql://"):
        return "mysql+asyncmy://" + url.removeprefix("mysql+aiomysql://")
    return url


def make_engine(url: str) -> AsyncEngine:
    url = database_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # pre_ping: a connection the server killed (wait_timeout, a restart, an operator) is replaced on
    # checkout instead of failing the request that drew it.
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_recycle=3600, pool_pre_ping=True)


def private_sqlite_file(path: Path) -> None:
    """Create the SQLite file (or tighten an existing one) with mode 0600 before SQLite opens it:
    it holds password hashes and ciphertext. SQLite gives its -wal and -shm files the same mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Never open an existing database file here: closing any descriptor of a file drops every POSIX
    # lock this process holds on it, so a SQLite engine already open in this process would lose its
    # locks (seen as "disk I/O error" and lost writes). Create it only when it does not exist yet.
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.chmod(path, 0o600)


def _upgrade(connection, revision: str = "head") -> None:  # noqa: ANN001
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)

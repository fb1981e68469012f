"""Database engine and migrations for both dialects (MySQL/MariaDB via aiomysql, SQLite)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> AsyncEngine:
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

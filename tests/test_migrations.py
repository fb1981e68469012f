"""Migrations: ``alembic upgrade head`` on an empty database builds exactly the declared tables.

The revisions are explicit operations, so a table or column declared in ``server/store/tables.py``
without a revision shows up here as a difference (tried: a column added to ``researchers`` alone
fails ``test_upgrade_head_builds_the_declared_schema`` on both dialects).
"""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

from server.store.engine import MIGRATIONS, _upgrade, make_engine, migrate
from server.store.tables import metadata
from tests.conftest import mysql_url

# Types are compared too (Alembic's default comparison understands the dialect variants in tables.py);
# server defaults are not used by the schema (defaults live in Python), so they are not compared.
COMPARE = {"compare_type": True, "compare_server_default": False}


@pytest.fixture(params=["sqlite", "mariadb"])
async def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "mariadb":
        url = mysql_url(request.getfixturevalue("mariadb_database"))
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'm.sqlite3'}"
    engine = make_engine(url)
    yield engine
    await engine.dispose()


async def _diff(engine: AsyncEngine, target: sa.MetaData) -> list:
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c, opts=COMPARE), target))


async def test_upgrade_head_builds_the_declared_schema(empty_engine: AsyncEngine) -> None:
    await migrate(empty_engine)  # `alembic upgrade head`
    await migrate(empty_engine)  # idempotent: a restart migrates nothing
    assert await _diff(empty_engine, metadata) == []
    async with empty_engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar() == _head()


def _head() -> str:
    return max(p.name.split("_")[0] for p in (MIGRATIONS / "versions").glob("0*.py"))


async def test_0006_renames_cpu_and_stores_unfinished_tasks_as_open(empty_engine: AsyncEngine) -> None:
    """Rows written before 0006 keep their meaning: run time in `elapsed`, a queued task is "open"."""
    async with empty_engine.begin() as conn:
        await conn.run_sync(lambda c: _upgrade(c, "0005"))
        await conn.execute(
            sa.text(
                "INSERT INTO researchers (id, email, password_hash, token_hash, approved, operator, created_at)"
                " VALUES (1, 'a@b.c', 'x', 't', 1, 0, 1.0)"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO jobs (id, researcher_id, name, state, code_ct, code_hash, inputs_kind, n_tasks, n_done,"
                " n_failed, timeout, max_attempts, priority, requirements, replication, quorum, max_replicas,"
                " n_validated, n_pending, n_disagreements, n_results, created_at) VALUES"
                " (1, 1, 'j', 'running', :b, 'h', 'list', 2, 1, 0, 1.0, 3, 0, '[]', 1, 1, 4, 0, 0, 0, 1, 1.0)"
            ),
            {"b": b"x"},
        )
        for idx, state in ((0, "queued"), (1, "done")):
            await conn.execute(
                sa.text(
                    "INSERT INTO tasks (job_id, idx, state, attempts, cpu, replicas) VALUES (1, :i, :s, 0, 2.5, 0)"
                ),
                {"i": idx, "s": state},
            )
        await conn.run_sync(_upgrade)
        rows = (await conn.execute(sa.text("SELECT idx, state, elapsed FROM tasks ORDER BY idx"))).all()
    assert [tuple(r) for r in rows] == [(0, "open", 2.5), (1, "done", 2.5)]


async def test_the_comparison_sees_a_column_without_a_revision(empty_engine: AsyncEngine) -> None:
    """The check above is only worth something if drift shows: declare one column more, see it."""
    await migrate(empty_engine)
    declared = sa.MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(declared)
    declared.tables["researchers"].append_column(sa.Column("nickname", sa.String(40)))
    diff = await _diff(empty_engine, declared)
    assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "researchers", "nickname")]


def test_revisions_do_not_build_from_the_declared_tables() -> None:
    """A revision that imports tables.py (``metadata.create_all``) would compare the schema with itself."""
    for path in (MIGRATIONS / "versions").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m and m.startswith("server") for m in imported), f"{path.name} imports {imported}"
        assert "create_all" not in path.read_text(), path.name

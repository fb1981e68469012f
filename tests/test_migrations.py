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

from server.store.engine import MIGRATIONS, make_engine, migrate
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
        assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar() == "0007"


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
